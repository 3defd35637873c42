"""Resampling of images, label maps and class probabilities between voxel grids (nnU-Net conventions).

Grid convention: voxel *edges* are aligned (scikit-image ``resize`` / ``scipy.ndimage.zoom(grid_mode=True)``),
so output voxel ``o`` along an axis samples input coordinate ``(o + 0.5) * n_in / n_out - 0.5``, and
values beyond the border repeat the edge voxel. The new shape for a change of spacing is
``round(shape * old_spacing / new_spacing)`` (at least 1 voxel).

Anisotropic data (nnU-Net rule): when ``max(spacing) / min(spacing) > 3`` for the old or the new
spacing, the thickest axis is resampled separately. Each slice across it is resampled in-plane with
the requested order, then that axis alone with order 0 (nearest), so intensities of thick slices are not
smeared into each other.

Labels are resampled as nnU-Net does: each class's one-hot mask with order 1 (linear), then the arg-max
(``order=0`` gives plain nearest neighbour instead). Everything here is numpy / scipy and works for any
number of spatial dims.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

# nnU-Net's ANISO_THRESHOLD: a spacing ratio above it marks thick slices. Defined here only; the plan
# (target spacing) and the augmentation (in-plane only for flat patches) import it.
ANISOTROPY_THRESHOLD = 3.0


def shape_for_spacing(shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]) -> tuple[int, ...]:
    """The grid size covering the same extent at ``new_spacing``: ``round(shape * spacing / new_spacing)``."""
    ratio = np.asarray(spacing, dtype=np.float64) / np.asarray(new_spacing, dtype=np.float64)
    return tuple(max(1, int(round(n * r))) for n, r in zip(shape, ratio))


def separate_axis(
    spacing: Sequence[float], new_spacing: Sequence[float], threshold: float = ANISOTROPY_THRESHOLD
) -> int | None:
    """The axis to resample on its own with order 0, or ``None`` (nnU-Net's ``get_do_separate_z``).

    The old spacing decides first: if its largest / smallest ratio exceeds ``threshold`` the thickest old
    axis is returned; otherwise the same test on the new spacing. Only 3D grids have such an axis, and only
    when one axis alone is the thickest: with two equally thick axes (say 0.24 x 1.25 x 1.25 mm) nnU-Net
    resamples all axes together (``determine_do_sep_z_and_axis``).
    """
    for candidate in (spacing, new_spacing):
        values = np.asarray(candidate, dtype=np.float64)
        if values.size == 3 and values.max() / values.min() > threshold:
            thickest = np.flatnonzero(values == values.max())
            return int(thickest[0]) if thickest.size == 1 else None
    return None


def _zoom(array: np.ndarray, new_shape: Sequence[int], order: int, clip: bool = False) -> np.ndarray:
    """Spline resampling of a float array to exactly ``new_shape`` (edge-aligned grids, edge padding);
    ``clip``: the result clipped to the input's range, as scikit-image's ``resize`` (nnU-Net's) does."""
    if tuple(array.shape) == tuple(new_shape):
        return array
    factors = np.asarray(new_shape, dtype=np.float64) / np.asarray(array.shape, dtype=np.float64)
    out = ndimage.zoom(array, factors, order=order, mode="nearest", grid_mode=True, prefilter=order > 1)
    assert out.shape == tuple(new_shape), (out.shape, new_shape)
    if clip:
        np.clip(out, array.min(), array.max(), out=out)
    return out


def resample_array(
    array: np.ndarray,
    new_shape: Sequence[int],
    order: int,
    axis: int | None = None,
    axis_order: int = 0,
    clip: bool = False,
) -> np.ndarray:
    """Resample a float array ``(*spatial)`` to ``new_shape``.

    With ``axis`` set, slices across ``axis`` are resampled in-plane with ``order`` and then ``axis``
    alone with ``axis_order`` (the anisotropic path described in the module docstring). ``clip``: every
    resize is clipped to its input's range (the whole array, or each slice in-plane), as nnU-Net's
    scikit-image ``resize`` calls are.
    """
    array = np.asarray(array, dtype=np.float32)
    new_shape = tuple(int(n) for n in new_shape)
    if array.shape == new_shape:
        return array.copy()
    if axis is None:
        return _zoom(array, new_shape, order, clip)
    moved = np.moveaxis(array, axis, 0)
    in_plane = new_shape[:axis] + new_shape[axis + 1 :]
    slices = np.stack([_zoom(s, in_plane, order, clip) for s in moved])
    # The factor along the in-plane axes is now exactly 1, so order `axis_order` leaves them untouched.
    stacked = _zoom(slices, (new_shape[axis],) + in_plane, axis_order)
    return np.ascontiguousarray(np.moveaxis(stacked, 0, axis))


def resample_image(
    image: np.ndarray,
    spacing: Sequence[float],
    new_spacing: Sequence[float],
    order: int = 3,
    new_shape: Sequence[int] | None = None,
    clip: bool = False,
) -> np.ndarray:
    """Resample a multi-channel image ``(C, *spatial)`` from ``spacing`` to ``new_spacing`` (float32).

    ``new_shape`` overrides the computed grid size (used to go back to an exact original shape); ``clip``
    as in :func:`resample_array`.
    """
    spatial = image.shape[1:]
    new_shape = tuple(new_shape) if new_shape is not None else shape_for_spacing(spatial, spacing, new_spacing)
    axis = separate_axis(spacing, new_spacing)
    return np.stack([resample_array(c, new_shape, order, axis, clip=clip) for c in image]).astype(np.float32)


def resample_label(
    label: np.ndarray,
    spacing: Sequence[float],
    new_spacing: Sequence[float],
    order: int = 1,
    new_shape: Sequence[int] | None = None,
) -> np.ndarray:
    """Resample an integer label map ``(*spatial)``: one-hot per class with ``order``, then arg-max.

    Returns the same dtype as ``label``. Classes are the values present in ``label``; ties between
    classes go to the smaller value (``np.argmax`` picks the first).
    """
    new_shape = tuple(new_shape) if new_shape is not None else shape_for_spacing(label.shape, spacing, new_spacing)
    if tuple(label.shape) == new_shape:
        return label.copy()
    axis = separate_axis(spacing, new_spacing)
    if order == 0:
        return resample_array(label, new_shape, 0, axis).astype(label.dtype)
    classes = np.unique(label)
    if classes.size == 1:
        return np.full(new_shape, classes[0], dtype=label.dtype)
    scores = np.stack([resample_array(label == c, new_shape, order, axis) for c in classes])
    return classes[np.argmax(scores, axis=0)].astype(label.dtype)


def resample_probabilities(
    probabilities: np.ndarray,
    spacing: Sequence[float],
    new_spacing: Sequence[float],
    new_shape: Sequence[int] | None = None,
) -> np.ndarray:
    """Resample class probabilities ``(K, *spatial)`` linearly (nnU-Net's order 1 for soft outputs)."""
    return resample_image(probabilities, spacing, new_spacing, order=1, new_shape=new_shape)
