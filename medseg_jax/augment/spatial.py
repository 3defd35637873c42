"""Spatial augmentation: one coordinate transform, one resampling, N spatial dims.

Convention (nnU-Net v2's ``SpatialTransform``): the output patch has shape ``patch_size`` and its voxel
``o`` is read from the input crop at::

    x_in = centre_in + M @ (r + d(r)),   r = o - (patch_size - 1) / 2,   centre_in = (crop_size - 1) / 2

with ``M = R @ diag(scale * flips)``: ``R`` a product of rotations in each axis plane, ``scale`` the
factor on the sampling coordinates (> 1 samples a larger region, so structures look smaller; nnU-Net's
convention), ``flips`` +-1 per axis (mirroring folded into the same matrix), and ``d`` an optional
smooth elastic displacement in output voxels (a cubic B-spline through random control points).
Images are sampled with linear interpolation, labels with nearest neighbour or linearly on the one-hot
encoding followed by argmax. Outside the crop the image and the one-hot are zero; a crop from
:func:`crop_size_for` is large enough that this never happens.

Functions take the array namespace ``xp`` (``jax.numpy`` or ``numpy``) so the host and device
pipelines share them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

from medseg_jax.errors import ConfigError


def rotation_planes(ndim: int) -> list[tuple[int, int]]:
    """The axis planes rotated in, one angle each: ``[(0, 1)]`` in 2D, ``[(0, 1), (0, 2), (1, 2)]`` in 3D."""
    return list(itertools.combinations(range(ndim), 2))


def rotation_matrix(xp, angles, ndim: int):
    """``(..., n_planes)`` angles in radians -> ``(..., ndim, ndim)`` rotation ``R_0 @ R_1 @ ...``, where
    ``R_k`` rotates by ``angles[..., k]`` in plane ``rotation_planes(ndim)[k]`` (``(i, j)``: the
    ``i`` axis turns towards ``j``)."""
    matrix = None
    for k, (i, j) in enumerate(rotation_planes(ndim)):
        cos, sin = xp.cos(angles[..., k])[..., None, None], xp.sin(angles[..., k])[..., None, None]
        diagonal = np.zeros((ndim, ndim), np.float32)
        diagonal[i, i] = diagonal[j, j] = 1
        skew = np.zeros((ndim, ndim), np.float32)
        skew[j, i], skew[i, j] = 1, -1
        givens = np.eye(ndim, dtype=np.float32) + (cos - 1) * diagonal + sin * skew
        matrix = givens if matrix is None else matrix @ givens
    return matrix


def spatial_matrix(xp, angles, scale, flips, ndim: int):
    """``M = R(angles) @ diag(scale * flips)``: ``angles`` ``(n_planes,)``, ``scale`` a scalar, ``flips``
    ``(ndim,)`` of +-1. Returns ``(ndim, ndim)`` float32."""
    return (rotation_matrix(xp, xp.asarray(angles, xp.float32), ndim) * (scale * flips)[None, :]).astype(xp.float32)


def output_offsets(patch_size: Sequence[int]) -> np.ndarray:
    """``(D, *patch_size)`` float32 offsets of each output voxel from the patch centre."""
    grids = np.meshgrid(*[np.arange(p, dtype=np.float32) - (p - 1) / 2 for p in patch_size], indexing="ij")
    return np.stack(grids)


def control_grid_shape(patch_size: Sequence[int], spacing: int) -> tuple[int, ...]:
    """Control points per axis of the elastic B-spline: one every ``spacing`` voxels plus the border
    points a cubic B-spline needs on each side."""
    return tuple((p - 1) // spacing + 4 for p in patch_size)


def bspline_weights(size: int, spacing: int) -> np.ndarray:
    """``(size, n_control)`` uniform cubic B-spline weights: voxel ``i`` lies at ``u = i / spacing``,
    between control points ``floor(u)`` and ``floor(u) + 1`` of the unpadded grid (index + 1 in the
    padded grid). Rows are non-negative and sum to 1, so the displacement never exceeds the largest
    control-point displacement."""
    u = np.arange(size) / spacing
    base = np.floor(u).astype(int)
    t = u - base
    taps = np.stack([(1 - t) ** 3, 3 * t**3 - 6 * t**2 + 4, -3 * t**3 + 3 * t**2 + 3 * t + 1, t**3], -1) / 6
    weights = np.zeros((size, (size - 1) // spacing + 4))
    for k in range(4):
        weights[np.arange(size), base + k] = taps[:, k]
    return weights.astype(np.float32)


def elastic_displacement(xp, control, patch_size: Sequence[int], spacing: int):
    """Control-point displacements ``(*control_grid_shape, D)`` -> dense displacement ``(D, *patch_size)``
    (separable B-spline evaluation: one small matrix product per axis)."""
    field = control
    for axis, size in enumerate(patch_size):
        weights = bspline_weights(size, spacing)
        field = xp.moveaxis(xp.tensordot(weights, field, axes=([1], [axis])), 0, axis)
    return xp.moveaxis(field, -1, 0)


def sampling_coordinates(xp, matrix, crop_shape: Sequence[int], patch_size: Sequence[int], displacement=None):
    """``(D, *patch_size)`` float32 input coordinates ``centre_in + M @ (r + d)`` (see module docstring)."""
    offsets = output_offsets(patch_size)
    if displacement is not None:
        offsets = offsets + displacement
    centre = np.asarray([(c - 1) / 2 for c in crop_shape], np.float32).reshape((-1,) + (1,) * len(patch_size))
    return (centre + xp.einsum("ij,j...->i...", matrix, offsets)).astype(xp.float32)


def resample(backend, image, label, coordinates, label_interpolation: str = "nearest", num_classes=None):
    """Sample ``image`` ``(*crop, C)`` (linear) and ``label`` ``(*crop)`` at ``coordinates``
    ``(D, *patch)``. Returns float32 ``(*patch, C)`` and ``(*patch)`` of the label's dtype.

    ``label_interpolation``: ``"nearest"`` (coordinates rounded half up, in both backends alike) or
    ``"linear"`` (each class's one-hot channel sampled linearly, then argmax; labels must lie in
    ``[0, num_classes)``; outside the crop every channel is zero and argmax gives class 0).
    """
    xp = backend.xp
    out_image = backend.map_coordinates(image.astype(xp.float32), coordinates, 1)
    if label_interpolation == "nearest":
        out_label = backend.map_coordinates(label, coordinates, 0)
    elif label_interpolation == "linear":
        if num_classes is None:
            raise ConfigError("augment.label_interpolation=linear needs the number of classes (num_classes)")
        one_hot = (label[..., None] == np.arange(num_classes)).astype(xp.float32)
        out_label = xp.argmax(backend.map_coordinates(one_hot, coordinates, 1), axis=-1)
    else:
        raise ConfigError(f"augment.label_interpolation: {label_interpolation!r} is not one of ['nearest', 'linear']")
    return out_image, out_label.astype(label.dtype)


def centre_crop_and_flip(image, label, patch_size: Sequence[int], flips):
    """The same result as :func:`resample` when ``M = diag(flips)`` and no displacement, for crops whose
    size differs from the patch by an even number per axis: a slice and reversals (host fast path;
    ``flips`` concrete)."""
    starts = [(c - p) // 2 for c, p in zip(label.shape, patch_size)]
    index = tuple(
        slice(s, s + p) if f > 0 else slice(s + p - 1, s - 1 if s > 0 else None, -1)
        for s, p, f in zip(starts, patch_size, np.asarray(flips))
    )
    return image[index].astype(np.float32), label[index]


def _rotated_half_extent(half: np.ndarray, max_radians: float) -> np.ndarray:
    """Upper bound, per axis, of ``sum_j |R_ij| half_j`` over all rotations with every plane angle in
    ``[-max_radians, max_radians]``: the half-width of the box holding the rotated patch.

    The maximum over a grid of angles (step <= 0.5 degrees) plus the Lipschitz slack
    ``|half| * n_planes * step / 2`` (each plane angle moves a row of ``R`` by at most that angle),
    capped by ``|half|`` (a unit row of ``R`` can reach no further). Rigorous, and within a few voxels
    of the true value at nnU-Net's patch sizes.
    """
    ndim = half.size
    norm = float(np.linalg.norm(half))
    if max_radians <= 0 or norm == 0:
        return half
    n_planes = len(rotation_planes(ndim))
    points = math.ceil(2 * max_radians / math.radians(0.5)) + 1
    points = max(3, min(points, round(4e6 ** (1 / n_planes))))
    angles = np.linspace(-max_radians, max_radians, points)
    step = angles[1] - angles[0]
    rest = np.zeros((1, 0))  # the other planes' angles, all combinations
    if n_planes > 1:
        rest = np.stack(np.meshgrid(*[angles] * (n_planes - 1), indexing="ij"), -1).reshape(-1, n_planes - 1)
    best = np.zeros(ndim)
    for first in angles:
        grid = np.concatenate([np.full((len(rest), 1), first), rest], axis=1)
        extent = np.abs(rotation_matrix(np, grid.astype(np.float64), ndim)) @ half
        best = np.maximum(best, extent.max(axis=0))
    return np.maximum(half, np.minimum(best + norm * n_planes * step / 2, norm))


def crop_size_for(
    patch_size: Sequence[int], rotation_degrees: float, scale, elastic_magnitude: float = 0.0
) -> tuple[int, ...]:
    """The input crop that holds every voxel a ``patch_size`` output can read, so no output voxel is
    padding.

    With ``h = (patch_size - 1) / 2`` the distance from the patch centre to its outermost voxel centres,
    ``s = max(1, max(scale))`` and ``e = sqrt(D) * elastic_magnitude`` (the largest displacement
    length), the input is read within ``s * (E(h) + e)`` of the crop centre per axis, where ``E(h)`` is
    the half-extent of the rotated patch (:func:`_rotated_half_extent`, for angles up to
    ``rotation_degrees`` in every plane). The crop is the smallest ``n >= 2 s (E(h) + e) + 1`` with
    ``n - patch_size`` even (so that unrotated, unscaled patches sit on whole voxels and are copied
    exactly). ``scale`` is a number or a ``(low, high)`` range.
    """
    patch = np.asarray(patch_size, float)
    max_scale = max(1.0, float(np.max(scale)))
    extent = _rotated_half_extent((patch - 1) / 2, math.radians(abs(rotation_degrees)))
    reach = max_scale * (extent + math.sqrt(patch.size) * max(0.0, elastic_magnitude))
    crop = np.maximum(np.ceil(2 * reach + 1 - 1e-6).astype(int), patch.astype(int))
    crop += (crop - patch.astype(int)) % 2
    return tuple(int(c) for c in crop)
