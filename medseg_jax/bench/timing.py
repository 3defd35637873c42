"""Timing method of the benchmark suite.

Each measured function is compiled ahead of time (``jax.jit(f).lower(*args).compile()``; the seconds
are reported separately as ``compile_s``), called once to warm up, then called ``runs`` times with
``block_until_ready``. The members of one comparison are called round-robin by the package's one timer
(:func:`medseg_jax.kernels.timing.time_round_robin`), so a change of load on a shared machine hits
every member alike. Reported: median, min, max and spread ``(max - min) / median`` of the runs.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from medseg_jax.kernels.timing import time_round_robin


@dataclasses.dataclass
class Prepared:
    """A ready-to-time member: ``call()`` runs it once to completion; ``info`` carries what was learnt
    while preparing it (compile seconds, XLA's FLOP count, compiled temporary memory)."""

    call: Callable[[], Any]
    info: dict


def xla_cost(compiled) -> dict:
    """XLA's own counts for a compiled program: ``flops_xla`` (which excludes the padded taps of a
    convolution and includes elementwise work) and the compiled temporary buffer size."""
    info: dict[str, Any] = {}
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
            cost = cost[0] if cost else {}
        if cost and cost.get("flops") is not None:
            info["flops_xla"] = float(cost["flops"])
    except Exception:  # cost analysis is best-effort and backend-dependent
        pass
    try:
        memory = compiled.memory_analysis()
        if memory is not None:
            info["temp_bytes"] = int(memory.temp_size_in_bytes)
            info["argument_bytes"] = int(memory.argument_size_in_bytes)
    except Exception:
        pass
    return info


def prepare_jax(fn: Callable, *args) -> Prepared:
    """Compile ``fn`` for ``args`` (timed) and return the compiled call."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    info = {"compile_s": time.perf_counter() - start, **xla_cost(compiled)}
    return Prepared(lambda: jax.block_until_ready(compiled(*args)), info)


def time_members(members: dict[str, Prepared], runs: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each call of each prepared member (see :func:`time_round_robin`)."""
    return time_round_robin({name: member.call for name, member in members.items()}, runs, warmup)


def summarize(times: list[float]) -> dict:
    median = statistics.median(times)
    return {
        "median_s": median,
        "min_s": min(times),
        "max_s": max(times),
        "spread": (max(times) - min(times)) / median if median > 0 else 0.0,
        "runs": len(times),
    }


def peak_memory_bytes() -> int | None:
    """Peak bytes in use on the default device, where the backend reports it (GPU / TPU; not CPU)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:
        return None
    if not stats:
        return None
    value = stats.get("peak_bytes_in_use")
    return int(value) if value is not None else None


def matmul_reference(size: int, dtype: str, runs: int) -> dict:
    """FLOP/s of a ``size x size x size`` matmul (2 size^3 FLOPs): the device's practical peak that
    the other figures are compared with (``fraction_of_matmul``)."""
    keys = jax.random.split(jax.random.key(0))
    a = jax.random.normal(keys[0], (size, size), jnp.dtype(dtype))
    b = jax.random.normal(keys[1], (size, size), jnp.dtype(dtype))
    prepared = prepare_jax(lambda a, b: a @ b, a, b)
    times = time_members({"matmul": prepared}, runs)["matmul"]
    summary = summarize(times)
    flops = 2.0 * size**3
    return {"size": size, "dtype": dtype, "flops": flops, "flop_per_s": flops / summary["median_s"], **summary}
