"""One way to run per-case work in worker processes (fingerprinting, preprocessing, evaluation).

:func:`map_in_processes` yields ``function(*job)`` for each job, in job order, computed in the calling
process (``num_workers <= 1``) or in a pool of ``num_workers`` processes. Rules shared by every caller:

- Workers are started with "spawn", never "fork": a forked child of a process that has started JAX
  (or any other threads) can deadlock, and spawned workers start free of the parent's state.
- At most ``2 * num_workers`` jobs are in flight, so finished results (whole volumes) do not pile up in
  memory while the caller consumes them.
- After a job fails no new job starts; the results of the jobs already in flight are still yielded (a
  resumable caller keeps that finished work), then the first failure is raised.
- A caller that stops early (an exception in its loop, Ctrl-C) cancels the jobs not yet started.

``function`` must be defined at module level (workers import it by name).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any


def map_in_processes(function: Callable[..., Any], jobs: Iterable[tuple], num_workers: int = 1) -> Iterator[Any]:
    """``function(*job)`` for each of ``jobs``, in order (see the module docstring for the rules)."""
    if num_workers <= 1:
        for job in jobs:
            yield function(*job)
        return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as pool:
        pending: deque[concurrent.futures.Future] = deque()
        remaining = iter(jobs)
        failure: BaseException | None = None
        try:
            while True:
                while failure is None and len(pending) < 2 * num_workers:
                    try:
                        job = next(remaining)
                    except StopIteration:
                        break
                    pending.append(pool.submit(function, *job))
                if not pending:
                    break
                future = pending.popleft()
                try:
                    result = future.result()
                except Exception as exc:  # raised below, after the jobs already in flight are yielded
                    failure = failure or exc
                    continue
                yield result
        finally:
            for future in pending:
                future.cancel()
        if failure is not None:
            raise failure
