"""The package's one timer: members called round-robin, each call to completion.

One call of each member per round (rather than all calls of one member, then the next) so that a
change of load on a shared machine hits every member alike. Used by :mod:`medseg_jax.kernels.autotune`
(per-op timings) and by the benchmark suite (:mod:`medseg_jax.bench`); it lives here, in the lowest
layer that times anything, so that kernels never import what sits above them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any


def time_round_robin(calls: Mapping[str, Callable[[], Any]], runs: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each call of each member: ``warmup`` untimed rounds, then ``max(1, runs)`` timed ones.

    Every callable must return only when its work is done (``jax.block_until_ready`` inside), else the
    figures time the dispatch, not the computation.
    """
    for _ in range(warmup):
        for call in calls.values():
            call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(max(1, runs)):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            samples[name].append(time.perf_counter() - start)
    return samples
