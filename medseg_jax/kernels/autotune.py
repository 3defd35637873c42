"""Per-operation autotuning: time each implementation of an operation for given shapes, and cache the
timings on disk. Choosing implementations for a whole model's layers sits above the models, in
:func:`medseg_jax.bench.model_tuning.autotune_model` (kernels never import models).

What is timed: one jitted forward + backward (the VJP for a fixed cotangent, with respect to input
and kernel) per implementation -- or the forward pass alone for a case with ``backward=False``
(inference) -- after one warm-up call, the median of ``runs`` calls, implementations called
round-robin (:func:`medseg_jax.kernels.timing.time_round_robin`).

Cache: a JSON file, ``$MEDSEG_JAX_CACHE/autotune.json`` when that variable is set, else
``$XDG_CACHE_HOME/medseg_jax/autotune.json`` (``~/.cache/...`` without it), written atomically. One
entry per device kind, operation, shapes, strides, dtype (and ``forward`` for forward-only timings);
entries are reused unless ``refresh``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp

from medseg_jax.atomic import write_json_atomic
from medseg_jax.cache import cache_dir
from medseg_jax.kernels.select import backend_name, implementations, pallas_interpreted, resolve, unavailable_reason
from medseg_jax.kernels.timing import time_round_robin

CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class OpCase:
    """One call of an operation: input ``(N, *S, C_in)``, kernel ``(*k, C_in, C_out)``, strides, dtype.
    For ``upsample`` the kernel's spatial shape equals the strides. ``backward``: timed with its
    gradients (training) or the forward pass alone (inference)."""

    operation: str
    input_shape: tuple[int, ...]
    kernel_shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: str = "float32"
    backward: bool = True

    def key(self, device: str) -> str:
        shape = lambda s: "x".join(map(str, s))
        # forward-only timings get their own entries; forward + backward keys stay as they always were
        return (
            f"{device}|{self.operation}|in={shape(self.input_shape)}|kernel={shape(self.kernel_shape)}"
            f"|strides={shape(self.strides)}|{self.dtype}" + ("" if self.backward else "|forward")
        )


def device_id() -> str:
    """``backend:device kind`` of the default device, e.g. ``cpu:cpu`` or ``gpu:NVIDIA H200``."""
    device = jax.devices()[0]
    return f"{backend_name()}:{device.device_kind}"


def cache_path() -> Path:
    """Where autotune timings are kept (see the module docstring)."""
    return cache_dir() / "autotune.json"


def load_cache(path: str | os.PathLike) -> dict:
    """The cached entries at ``path`` (empty when there is no file, or it is from another version or
    unreadable -- a cache is never worth failing a run over)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def save_cache(path: str | os.PathLike, entries: dict) -> None:
    write_json_atomic(path, {"version": CACHE_VERSION, "entries": entries})


def default_candidates(operation: str, spatial_dims: int | None = None) -> list[str]:
    """Every registered implementation that can run here (the optional oneDNN convolution only where
    it is installed), less Pallas where it would run interpreted (orders of magnitude slower: timing
    it on CPU is a waste), and less the ``depth_*`` convolutions below 3 ``spatial_dims`` (they run
    ``xla`` there: timing them would time one program three times)."""
    names = sorted(implementations(operation))
    runnable = [n for n in names if unavailable_reason(operation, n) is None]
    if operation == "conv" and spatial_dims is not None and spatial_dims < 3:
        runnable = [n for n in runnable if not n.startswith("depth_")]
    return [n for n in runnable if not (n == "pallas" and pallas_interpreted())]


def case_function(case: OpCase, implementation: str):
    """``f(x, kernel, bias, cotangent) -> (y, dx, dkernel)`` for ``case``, jitted; ``-> y`` when
    ``case.backward`` is False (the cotangent is then unused)."""
    fn = implementations(case.operation)[implementation]

    def forward_backward(x, kernel, bias, cotangent):
        y, vjp = jax.vjp(lambda x, k: fn(x, k, bias, case.strides), x, kernel)
        return (y, *vjp(cotangent))

    def forward(x, kernel, bias, cotangent):
        return fn(x, kernel, bias, case.strides)

    return jax.jit(forward_backward if case.backward else forward)


def case_arguments(case: OpCase, key=None):
    """Random ``(x, kernel, bias, cotangent)`` with the case's shapes and dtype."""
    dtype = jnp.dtype(case.dtype)
    keys = jax.random.split(jax.random.key(0) if key is None else key, 3)
    x = jax.random.normal(keys[0], case.input_shape, dtype)
    kernel = (jax.random.normal(keys[1], case.kernel_shape, jnp.float32) * 0.05).astype(dtype)
    bias = jnp.zeros(case.kernel_shape[-1], dtype)
    reference = implementations(case.operation)["xla" if case.operation == "conv" else "matmul"]
    y = jax.eval_shape(lambda x, k, b: reference(x, k, b, case.strides), x, kernel, bias)
    cotangent = jax.random.normal(keys[2], y.shape, dtype)
    return x, kernel, bias, cotangent


def time_case(case: OpCase, candidates: Sequence[str], runs: int = 3) -> dict[str, float]:
    """Median seconds of one forward + backward (forward only when ``case.backward`` is False) per
    implementation (one warm-up round, which compiles, then ``runs`` rounds round-robin)."""
    args = case_arguments(case)
    calls = {}
    for name in candidates:
        fn = case_function(case, name)
        calls[name] = lambda fn=fn: jax.block_until_ready(fn(*args))
    samples = time_round_robin(calls, runs, warmup=1)
    return {name: statistics.median(times) for name, times in samples.items()}


def autotune_case(
    case: OpCase,
    candidates: Sequence[str] | None = None,
    *,
    cache: str | os.PathLike | None = None,
    runs: int = 3,
    refresh: bool = False,
) -> tuple[str, dict[str, float]]:
    """The fastest of ``candidates`` for ``case`` and the seconds of each (cached timings are reused
    unless ``refresh``; new timings are merged into the cache file)."""
    candidates = list(candidates or default_candidates(case.operation))
    for name in candidates:
        resolve(case.operation, name)  # a clear error for an unknown name
    path = Path(cache) if cache is not None else cache_path()
    entries = load_cache(path)
    key = case.key(device_id())
    seconds = {} if refresh else dict(entries.get(key, {}).get("seconds", {}))
    missing = [name for name in candidates if name not in seconds]
    if missing:
        seconds.update(time_case(case, missing, runs))
        entries = load_cache(path)  # another process may have written meanwhile: merge, do not clobber
        entries[key] = {"seconds": seconds, "jax": jax.__version__}
        save_cache(path, entries)
    timed = {name: seconds[name] for name in candidates}
    return min(timed, key=timed.__getitem__), timed
