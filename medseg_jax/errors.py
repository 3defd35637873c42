"""The exception family of medseg-jax.

Library functions raise these instead of printing; the CLI turns them into a one-line message and a
non-zero exit status. Every message names the file, case or config field at fault and what is wrong.
"""


class MedsegError(Exception):
    """Base class of every error medseg-jax raises on purpose."""


class ConfigError(MedsegError):
    """A config file or override is invalid (unknown key, wrong type, bad value)."""


class DataError(MedsegError):
    """An input scan, label or dataset folder is unreadable or inconsistent."""


class DatasetValidationError(DataError):
    """A dataset folder has one or more problems; ``problems`` lists all of them."""

    def __init__(self, dataset_dir, problems):
        self.dataset_dir = str(dataset_dir)
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"dataset {self.dataset_dir} has {len(self.problems)} problem(s):\n{lines}")


class CheckpointError(MedsegError):
    """A checkpoint is missing, incomplete or corrupted."""


class TrainingError(MedsegError):
    """Training cannot continue (for example a non-finite loss)."""


def os_error_message(exc: OSError) -> str:
    """``"PATH: reason"`` for an operating-system error (unwritable folder, a file where a folder is
    expected, disk full), naming the path(s) involved."""
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    reason = exc.strerror or str(exc)
    return f"{' -> '.join(paths)}: {reason}" if paths else reason
