"""Class scores -> label map on the file's grid, one class at a time (memory bounded at scan scale).

Mapping a K-class prediction back to the input's geometry the direct way (softmax of the whole
``(K, *spatial)`` array, every class resampled, then the arg-max over the stacked result) holds several
K x N float32 arrays at once: for 20 classes on a 512x512x400 CT that is tens of GB. Here:

1. the softmax's per-voxel maximum and normaliser come from slabs of at most ``slab_bytes`` of logits
   along the first axis (:func:`slab_rows`), so only one slab of K x float32 is ever materialised;
2. each class's probability ``exp(logit_k - max) / sum`` (the same expression as ``jax.nn.softmax``) is
   formed alone, mapped to the file's grid by the caller's ``to_file_grid`` and folded into a running
   arg-max (strictly greater wins, so ties go to the lower class as with ``np.argmax``).

Peak host memory therefore does not grow with K: besides the logits themselves (on the device in the
default mode; on the host with ``accumulate="host"``, whose accumulator they are) it is a few float32 per
voxel (maximum and normaliser on the network's grid, one class's probability before and after
resampling, the running maximum on the file's grid), one uint8 label map, and one slab.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from medseg_jax.errors import ConfigError

__all__ = [
    "SLAB_BYTES",
    "argmax_on_file_grid",
    "class_logits",
    "class_probabilities",
    "running_argmax",
    "slab_rows",
    "softmax_normaliser",
]

SLAB_BYTES = 256 * 2**20  # one slab of logits (all classes, float32) at most, whatever the scan's size


def slab_rows(shape, num_classes: int, slab_bytes: int = SLAB_BYTES) -> int:
    """Rows of the first axis of a ``(*shape, num_classes)`` float32 array that fit in ``slab_bytes``.

    At least one row (a single row larger than the budget is still processed whole); at most the whole axis.
    """
    row_bytes = 4 * int(num_classes) * math.prod(int(n) for n in shape[1:])
    return int(min(max(1, slab_bytes // max(row_bytes, 1)), int(shape[0])))


@jax.jit
def _max_and_sum(slab):
    top = jnp.max(slab, axis=-1, keepdims=True)
    return top[..., 0], jnp.sum(jnp.exp(slab - top), axis=-1)


@jax.jit
def _probability(class_logits, top, total):
    return jnp.exp(class_logits - top) / total


def softmax_normaliser(logits, slab_bytes: int = SLAB_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """Per-voxel ``(max over classes, sum of exp(logit - max))`` of ``logits (*spatial, K)``, float32
    ``(*spatial)`` each, computed one slab of :func:`slab_rows` rows at a time. ``logits`` may be a numpy
    array (each slab is sent to the device) or a ``jax.Array`` (sliced where it lives)."""
    spatial, k = tuple(logits.shape[:-1]), int(logits.shape[-1])
    top, total = np.empty(spatial, np.float32), np.empty(spatial, np.float32)
    rows = slab_rows(spatial, k, slab_bytes)
    for first in range(0, spatial[0], rows):
        part = slice(first, min(first + rows, spatial[0]))
        slab_top, slab_total = _max_and_sum(logits[part])
        top[part], total[part] = np.asarray(slab_top), np.asarray(slab_total)
    return top, total


def class_probabilities(logits, slab_bytes: int = SLAB_BYTES) -> Iterator[np.ndarray]:
    """``softmax(logits)[..., k]`` for k = 0, 1, ... as float32 numpy ``(*spatial)``, one class at a time.

    Neither the host nor the device ever holds the K x voxels softmax: only the logits, the normaliser of
    :func:`softmax_normaliser` and one class.
    """
    top, total = softmax_normaliser(logits, slab_bytes)
    for index in range(int(logits.shape[-1])):
        yield np.asarray(_probability(logits[..., index], top, total), dtype=np.float32)


def class_logits(logits) -> Iterator[np.ndarray]:
    """``logits[..., k]`` for k = 0, 1, ... as float32 numpy ``(*spatial)``, one class at a time."""
    for index in range(int(logits.shape[-1])):
        yield np.asarray(logits[..., index], dtype=np.float32)


def argmax_on_file_grid(
    logits,
    to_file_grid: Callable[[np.ndarray, int], np.ndarray],
    slab_bytes: int = SLAB_BYTES,
    over: str = "probabilities",
) -> np.ndarray:
    """uint8 arg-max over classes of ``to_file_grid(softmax(logits)[..., k], k)`` for ``logits (*spatial, K)``.

    ``to_file_grid(class_map, k)`` maps one class's probability ``(*spatial)`` (float32, numpy) onto the
    output grid; classes are visited in order and never more than one is held at a time. ``over="logits"``
    hands it the class's logits instead (for a caller that resamples logits, as nnU-Net's export does: the
    softmax on the file's grid keeps each voxel's order of classes, so it is not needed for the arg-max).
    """
    k = int(logits.shape[-1])
    if k > 256:
        raise ConfigError(f"the model predicts {k} classes; a uint8 label map holds at most 256")
    if over not in ("probabilities", "logits"):
        raise ConfigError(f"argmax over {over!r}: expected 'probabilities' or 'logits'")
    class_maps = class_probabilities(logits, slab_bytes) if over == "probabilities" else class_logits(logits)

    def restored_maps() -> Iterator[np.ndarray]:
        for index, class_map in enumerate(class_maps):
            restored = np.asarray(to_file_grid(class_map, index), dtype=np.float32)
            del class_map
            yield restored

    return running_argmax(restored_maps())


def running_argmax(class_maps: Iterable[np.ndarray]) -> np.ndarray:
    """uint8 arg-max over ``class_maps`` (class 0, 1, ... in order, one shape), holding only the running
    maximum and the label map besides the class being folded in. At most 256 classes (uint8)."""
    best: np.ndarray | None = None
    label: np.ndarray | None = None
    for index, class_map in enumerate(class_maps):
        if best is None or label is None:
            best, label = np.array(class_map, dtype=np.float32), np.zeros(class_map.shape, np.uint8)
            continue
        better = class_map > best  # strictly: equal scores keep the lower class, as np.argmax does
        label[better] = index
        np.maximum(best, class_map, out=best)
    if label is None:
        raise ValueError("running_argmax needs at least one class map")
    return label
