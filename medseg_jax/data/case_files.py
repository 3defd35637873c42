"""Finding cases in a folder of NIfTI files by their names (nnU-Net's naming).

Two different jobs, so two functions:

- :func:`find_image_cases`: images to predict, one file per channel, ``{case}_{XXXX}.nii.gz`` with a
  4-digit channel index (nnU-Net's ``imagesTr`` / ``imagesTs``); returns each case's channel files.
- :func:`find_label_files`: label maps (references or predictions), one ``{case}.nii.gz`` per case
  (nnU-Net's ``labelsTr``, and what ``predict`` writes); returns each case's file.

Both look only directly inside the folder, skip hidden files (macOS ``._x.nii.gz`` resource forks ship
inside the MSD archives) and accept ``.nii.gz`` and ``.nii``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from medseg_jax.data.image_io import NIFTI_SUFFIXES, is_nifti
from medseg_jax.errors import DataError

CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})(?P<ending>\.nii\.gz|\.nii)$")


def nifti_stem(name: str) -> str | None:
    """``name`` without its ``.nii.gz`` / ``.nii`` ending, or None for another (or an empty) name."""
    for ending in NIFTI_SUFFIXES:
        if name.endswith(ending) and len(name) > len(ending):
            return name[: -len(ending)]
    return None


def _visible_nifti_files(folder: Path) -> list[Path]:
    return [
        path for path in sorted(folder.iterdir()) if not path.name.startswith(".") and is_nifti(path) and path.is_file()
    ]


def find_image_cases(folder: str | os.PathLike, num_channels: int) -> dict[str, list[Path]]:
    """``{case: [channel files in channel order]}`` of the ``{case}_{XXXX}`` NIfTI files of ``folder``.

    Raises :class:`DataError` naming the file or case for a NIfTI file without a channel suffix, a case
    whose channels are not exactly ``_0000`` .. ``_{num_channels - 1}``, or a folder without cases.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    channels: dict[str, dict[int, Path]] = {}
    for path in _visible_nifti_files(folder):
        match = CHANNEL_FILE.match(path.name)
        if not match:
            raise DataError(f"{path}: expected nnU-Net naming {{case}}_{{XXXX}}.nii.gz (4-digit channel)")
        channels.setdefault(match["case"], {})[int(match["channel"])] = path
    if not channels:
        raise DataError(f"{folder}: no NIfTI files to predict")
    cases = {}
    for case, found in sorted(channels.items()):
        if sorted(found) != list(range(num_channels)):
            raise DataError(
                f"case {case} in {folder}: found channel(s) {[f'{c:04d}' for c in sorted(found)]}, "
                f"the plan expects {num_channels} ({', '.join(f'{c:04d}' for c in range(num_channels))})"
            )
        cases[case] = [found[c] for c in range(num_channels)]
    return cases


def find_label_files(folder: str | os.PathLike) -> dict[str, Path]:
    """``{case: file}`` of the ``{case}.nii.gz`` / ``{case}.nii`` files of ``folder`` (sorted by case).

    Raises :class:`DataError` for a missing folder, or a case with both a ``.nii.gz`` and a ``.nii`` file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found")
    cases: dict[str, Path] = {}
    for path in _visible_nifti_files(folder):
        case = nifti_stem(path.name) or path.name  # never empty: the listing holds NIfTI names only
        if case in cases:
            raise DataError(f"{folder}: case {case!r} has two files ({cases[case].name}, {path.name})")
        cases[case] = path
    return cases
