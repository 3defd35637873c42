"""Batches on the device before the step that needs them.

:class:`DevicePrefetcher` pulls host batches from the loader and starts their (asynchronous) transfer
to the device with the batch shardings, keeping ``depth`` of them in flight. The loop takes a batch,
launches the step, then refills: the host reads and transfers the next batch while the device computes.
Each batch carries the loader's iterator state *after* it, so a checkpoint records exactly the batches
the steps consumed, not the ones prefetched ahead.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any


class DevicePrefetcher:
    """``take()`` returns the oldest prefetched device batch; ``fill()`` tops the queue up to ``depth``.

    ``loader`` is a checkpointable iterator (``get_state()``); ``to_device(host_batch)`` builds the
    global device batch (it returns at once: the copy runs asynchronously).
    """

    def __init__(self, loader: Any, to_device: Callable[[Any], Any], depth: int = 2):
        self.loader, self.to_device, self.depth = loader, to_device, max(1, int(depth))
        self.queue: collections.deque = collections.deque()
        self.consumed_state = loader.get_state()

    def fill(self) -> None:
        while len(self.queue) < self.depth:
            batch = self.to_device(next(self.loader))
            self.queue.append((batch, self.loader.get_state()))

    def take(self):
        if not self.queue:
            self.fill()
        batch, self.consumed_state = self.queue.popleft()
        return batch
