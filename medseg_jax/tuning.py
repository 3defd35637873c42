"""Autotuning a run's network before it is compiled (``medseg-jax train --autotune`` and
``medseg-jax predict --autotune``).

The candidate conv and upsampling implementations are timed for the layer shapes the network really
meets -- one device's rows of a training batch (forward and backward), or one sliding-window call
(forward only) -- by :func:`medseg_jax.bench.model_tuning.autotune_model`; the timings are cached per
device kind and shape (:mod:`medseg_jax.kernels.autotune`), so a second run with the same shapes
times nothing. Only fields left at ``"auto"`` are tuned.

Implementations change the arithmetic (rounding), never the parameters: the tuned model is what gets
compiled, while the run's config (``config.yaml``, the checkpoints' metadata) keeps what the user
wrote, so a run resumes with or without ``--autotune`` and prediction rebuilds the network from the
config as trained. What a training session ran is recorded in ``RUN/autotune.json``.

Several processes: each one times on its own devices (the wall time is that of timing on one process
while the others wait, and no process sits in a collective for minutes), then every process takes
process 0's choice, so all of them compile the same program.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from medseg_jax.atomic import write_json_atomic
from medseg_jax.errors import ConfigError

RECORD_NAME = "autotune.json"


def training_input_shape(run) -> tuple[int, ...]:
    """What the network sees on one device in a training step of ``run`` (a
    :class:`~medseg_jax.train.setup.ResolvedRun`): its rows of the global batch (split over the
    mesh's data axis), the patch and the input channels. A spatial mesh axis splits the patch as well;
    the layers are then timed on the whole patch, which a split may not divide by the network's
    stride."""
    return (run.batch_size // run.mesh_shape[0], *run.patch_size, run.model.in_channels)


def inference_input_shape(plan: dict, inference_config, in_channels: int) -> tuple[int, ...]:
    """What one network call of the sliding window sees: ``batch_size`` windows of the plan's patch,
    each mirrored copy joining the batch (:mod:`medseg_jax.inference.sliding_window`)."""
    from medseg_jax.inference.sliding_window import _mirror_subsets

    batch = int(inference_config.batch_size)
    if batch < 1:
        raise ConfigError(f"inference.batch_size (--batch-size) must be >= 1, got {batch}")
    mirrors = len(_mirror_subsets(inference_config.mirror_axes, int(plan["dim"])))  # also checks the axes
    return (batch * mirrors, *(int(p) for p in plan["patch_size"]), int(in_channels))


def planned_timings(model, input_shape: Sequence[int], backward: bool) -> dict[str, tuple[int, list[str]]]:
    """``{operation: (distinct layer shapes, candidates)}`` for the operations left at ``"auto"``."""
    from medseg_jax.bench.model_tuning import IMPLEMENTATION_FIELDS, layer_cases
    from medseg_jax.kernels.autotune import default_candidates

    cases = layer_cases(model, input_shape, jnp.dtype(model.dtype).name, backward)
    return {
        operation: (
            len({c for c in cases if c.operation == operation}),
            default_candidates(operation, len(input_shape) - 2),
        )
        for operation, field_name in IMPLEMENTATION_FIELDS.items()
        if getattr(model, field_name) == "auto"
    }


def agree_across_processes(model, report: dict):
    """``(model, report)`` with process 0's choice for every tuned operation, on every process (all
    must call it together). Names travel as indices into the registries, which every process has."""
    from medseg_jax import parallel
    from medseg_jax.bench.model_tuning import IMPLEMENTATION_FIELDS
    from medseg_jax.kernels.select import implementations

    operations = sorted(report)
    if not operations:  # the same on every process: they share the config
        return model, report
    names = {operation: sorted(implementations(operation)) for operation in operations}
    codes = np.asarray([names[op].index(report[op]["chosen"]) for op in operations], np.int32)
    agreed = parallel.gather_from_processes(codes)[0]
    chosen = {op: names[op][int(index)] for op, index in zip(operations, agreed)}
    report = {op: report[op] | {"chosen": chosen[op]} for op in operations}
    return model.clone(**{IMPLEMENTATION_FIELDS[op]: chosen[op] for op in operations}), report


def describe_choice(report: dict) -> str:
    """``conv -> depth_stack (depth_stack 0.0123 s, xla 0.031 s), upsample -> ...``: each candidate's
    summed seconds over the layers (one call of each), fastest first."""
    parts = []
    for operation, entry in report.items():
        totals = sorted(entry["total_seconds"].items(), key=lambda item: item[1])
        timings = ", ".join(f"{name} {seconds:.4g} s" for name, seconds in totals)
        parts.append(f"{operation} -> {entry['chosen']} ({timings})")
    return ", ".join(parts)


def tune_model(
    model,
    input_shape: Sequence[int],
    *,
    backward: bool,
    log: Callable[[str], None] = lambda message: None,
    cache=None,
    runs: int = 3,
):
    """``(model, record)``: ``model`` with the fastest implementations for ``input_shape`` (the same
    on every process), and a plain record of the choice and the timings behind it.

    ``backward``: time forward and backward (training) or the forward pass alone (inference).
    ``cache``: the timing cache file (default ``$MEDSEG_JAX_CACHE/autotune.json``).
    """
    from medseg_jax.bench.model_tuning import IMPLEMENTATION_FIELDS, autotune_model
    from medseg_jax.kernels.autotune import device_id

    input_shape = tuple(int(n) for n in input_shape)
    dtype = jnp.dtype(model.dtype).name
    timed = "forward and backward" if backward else "forward"
    planned = planned_timings(model, input_shape, backward)
    if planned:
        sizes = " and ".join(
            f"{shapes} {op} shapes x {len(names)} candidates" for op, (shapes, names) in planned.items()
        )
        log(f"autotune: timing {sizes} ({timed}, input {input_shape} {dtype}; cached timings are reused)")
    else:
        log("autotune: nothing to tune (model.conv_implementation and model.upsample_implementation are explicit)")
    started = time.perf_counter()
    tuned, report = autotune_model(model, input_shape, cache=cache, runs=runs, backward=backward)
    tuned, report = agree_across_processes(tuned, report)
    seconds = time.perf_counter() - started
    if report:
        log(f"autotune: {describe_choice(report)}; {seconds:.1f} s")
    record = {
        "implementations": {field: getattr(tuned, field) for field in IMPLEMENTATION_FIELDS.values()},
        "timed": timed,
        "input_shape": list(input_shape),
        "dtype": dtype,
        "device": device_id(),
        "jax": jax.__version__,
        "chosen_by": f"process 0 of {jax.process_count()}",
        "operations": report,
        "seconds": round(seconds, 2),
    }
    return tuned, record


def write_record(run_dir, record: dict | None, from_step: int) -> None:
    """``RUN/autotune.json``: the implementations this training session runs from ``from_step`` on.
    A session without ``--autotune`` removes an earlier session's record: it runs what
    ``config.yaml`` says."""
    path = Path(run_dir) / RECORD_NAME
    if record is None:
        path.unlink(missing_ok=True)
    else:
        write_json_atomic(path, record | {"from_step": int(from_step)})
