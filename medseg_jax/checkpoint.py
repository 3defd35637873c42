"""Checkpoints of a training run (Orbax ``CheckpointManager``).

One checkpoint holds, under a step-numbered folder: ``state`` (the TrainState pytree: step, params,
optimiser state, rng, EMA), ``data`` (the data iterator's JSON state, so the patch stream continues
exactly) and ``meta`` (config, plan and versions as JSON). Saving is asynchronous; Orbax writes into
a temporary folder and renames it when complete, so a run killed mid-save leaves the previous
checkpoints intact and no half-written one that looks finished.

Retention: the latest ``keep`` checkpoints, plus the one with the best validation Dice when metrics are
given. Restoring walks from the newest step down and skips (with a warning) any checkpoint that fails
to restore -- truncated or deleted files, a corrupted array -- so one bad checkpoint never ends a run;
a skipped one is renamed ``corrupt-{step}-{time}`` once an older one has been restored.
Restoring onto other devices (8 -> 1 device, another mesh) works by passing target shardings.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from medseg_jax.errors import CheckpointError

logger = logging.getLogger(__name__)
BEST_METRIC = "val_dice"


def _preservation_policy(keep: int):
    policies = getattr(ocp.checkpoint_managers, "AnyPreservationPolicy", None)
    if policies is None:  # older orbax: no composite policies, keep the latest only
        return None
    return ocp.checkpoint_managers.AnyPreservationPolicy(
        [
            ocp.checkpoint_managers.LatestN(n=keep),
            # BestN sorts ascending and keeps the last n, i.e. the highest Dice
            ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda metrics: metrics[BEST_METRIC],
                reverse=False,
                n=1,
                keep_checkpoints_without_metrics=False,
            ),
        ]
    )


def make_manager(directory, keep: int = 2, async_save: bool = True) -> ocp.CheckpointManager:
    """An Orbax manager over ``directory`` (created if needed) with the retention described above."""
    directory = Path(directory).absolute()
    policy = _preservation_policy(keep)
    options = ocp.CheckpointManagerOptions(
        create=True,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        **({"preservation_policy": policy} if policy is not None else {"max_to_keep": keep}),
    )
    return ocp.CheckpointManager(directory, options=options)


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state,
    data_state: dict,
    meta: dict,
    val_dice: float | None = None,
    force: bool = True,
) -> bool:
    """Start saving ``state``, ``data_state`` and ``meta`` as checkpoint ``step`` (returns at once when
    asynchronous; call ``manager.wait_until_finished()`` before exiting)."""
    metrics = None if val_dice is None else {BEST_METRIC: float(val_dice)}
    return manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)
        ),
        metrics=metrics,
        force=force,
    )


def abstract_with_shardings(abstract_state, shardings):
    """ShapeDtypeStructs carrying the target shardings, to restore straight onto a (different) mesh."""
    return jax.tree_util.tree_map(
        lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), abstract_state, shardings
    )


def restore_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    """Only the JSON ``meta`` item of checkpoint ``step`` (config, plan): cheap, and readable whatever
    the arrays' shapes, so a caller can refuse an incompatible run before touching the state."""
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore_step(manager: ocp.CheckpointManager, step: int, abstract_state) -> tuple[Any, dict, dict]:
    """Restore checkpoint ``step`` onto ``abstract_state``'s shapes, dtypes and shardings."""
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()
        ),
    )
    return restored["state"], restored["data"], restored["meta"]


def set_aside(manager: ocp.CheckpointManager, step: int) -> Path:
    """Rename a damaged checkpoint to ``corrupt-{step}-{time}`` (kept for inspection, invisible to the
    manager) so that the resumed run can save that step again."""
    import time

    source = Path(manager.directory) / str(step)
    target = source.with_name(f"corrupt-{step}-{int(time.time())}")
    source.rename(target)
    manager.reload()
    return target


# What a damaged or incomplete checkpoint looks like when read: missing or truncated files, undecodable
# chunks or JSON. Anything else (out of memory, a transient storage error, a target mesh or shape that
# does not fit) is reported as an error and never a reason to set a checkpoint aside.
_DAMAGE = re.compile(
    r"not found|no such file|corrupt|checksum|decod|truncat|unexpected end|DATA_LOSS|malformed|"
    r"Expecting value|Unterminated|invalid (zarr|json|metadata|header|chunk)|Error reading|Failed to read|"
    r"Error opening|OUT_OF_RANGE|zstd|blosc|zlib|gzip",
    re.IGNORECASE,
)
_NOT_DAMAGE = re.compile(
    r"RESOURCE_EXHAUSTED|out of memory|DEADLINE_EXCEEDED|UNAVAILABLE|sharding|mesh|topology|"
    r"Requested shape|not compatible with the stored",
    re.IGNORECASE,
)


def is_damage(exc: BaseException) -> bool:
    """Whether ``exc``, raised while restoring, means the checkpoint's files are damaged or incomplete."""
    if isinstance(exc, MemoryError):
        return False
    if isinstance(exc, (FileNotFoundError, EOFError, json.JSONDecodeError)):
        return True
    text = f"{type(exc).__name__}: {exc}"
    return not _NOT_DAMAGE.search(text) and bool(_DAMAGE.search(text))


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def restore_latest_good(manager: ocp.CheckpointManager, abstract_state, check_meta=None):
    """``(step, state, data_state, meta, skipped)`` of the newest checkpoint that restores, or ``None``
    when there is none. ``skipped`` lists ``(step, reason)`` of the damaged ones passed over.

    ``check_meta(meta)`` runs on each checkpoint's metadata before its arrays are read; an exception it
    raises (say, the run's model config changed) propagates: a mismatch is the caller's error, not damage.

    Several processes decide together: a checkpoint is used only when every process restored it; it is
    passed over when the failures were all damage (:func:`is_damage`), and any other failure on any
    process is a :class:`CheckpointError` on every process. Only process 0 renames a damaged
    checkpoint, after every process is done reading.
    """
    skipped = []
    for step in sorted(manager.all_steps(), reverse=True):
        # A metadata failure is kept and judged with the arrays' below, while check_meta's own
        # exceptions (a config mismatch) still propagate.
        meta_error: Exception | None = None
        try:
            meta = restore_meta(manager, step)
        except Exception as exc:
            meta_error = exc
        if check_meta is not None and meta_error is None:
            check_meta(meta)
        error: Exception | None = meta_error
        if error is None:
            try:
                state, data_state, meta = restore_step(manager, step, abstract_state)
            except Exception as exc:  # Orbax / tensorstore raise many types for damaged files
                error = exc
        outcome = 0 if error is None else (1 if is_damage(error) else 2)
        outcomes = parallel_outcomes(outcome)
        if max(outcomes) == 2:
            where = "this process" if outcome == 2 else f"process {outcomes.index(2)}"
            detail = _reason(error) if error is not None and outcome == 2 else "see that process's error"
            raise CheckpointError(
                f"{manager.directory}: checkpoint {step} could not be restored on {where} ({detail}); this does "
                "not look like damaged files, so it was not set aside: check memory, storage and the device mesh"
            ) from error
        if max(outcomes) == 1:
            reason = _reason(error) if error is not None else "damaged on another process"
            logger.warning(
                "checkpoint %s in %s is unreadable (%s); trying an older one", step, manager.directory, reason
            )
            skipped.append((step, reason))
            continue
        _barrier("medseg-restore-done")
        if jax.process_index() == 0:
            for bad_step, _ in skipped:
                set_aside(manager, bad_step)
        _barrier("medseg-set-aside-done")
        if jax.process_index() != 0 and skipped:
            manager.reload()
        return step, state, data_state, meta, skipped
    if skipped:
        raise CheckpointError(
            f"{manager.directory}: no readable checkpoint; every one failed to restore: "
            + "; ".join(f"step {s}: {r}" for s, r in skipped)
        )
    return None


def parallel_outcomes(outcome: int) -> list[int]:
    """Every process's restore outcome (0 restored, 1 damaged, 2 other error), in process order."""
    from medseg_jax.parallel import gather_from_processes

    return [int(v) for v in gather_from_processes(np.asarray([outcome], dtype=np.int32)).reshape(-1)]


def _barrier(name: str) -> None:
    from medseg_jax.parallel import barrier

    barrier(name)
