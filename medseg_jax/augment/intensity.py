"""Intensity augmentation of one sample ``x`` of shape ``(*spatial, C)`` float32, N spatial dims.

Each function applies one transform with given parameters (per channel where nnU-Net draws them per
channel); drawing the parameters and the per-sample probabilities is the pipeline's job. They follow
nnU-Net v2's transforms (batchgeneratorsv2, as configured by ``nnUNetTrainer``) and take the array
namespace ``xp`` (or, for the separable blur and low resolution, the backend) so that the host and
device pipelines share them. Labels are never touched here.
"""

from __future__ import annotations

import math

import numpy as np

# nnU-Net clamps the divisors of range and standard deviation at this value.
_TINY = 1e-7


def _spatial_axes(x) -> tuple[int, ...]:
    return tuple(range(x.ndim - 1))


def add_noise(x, std, noise):
    """``x + std * noise``: ``noise`` a standard normal field ``(*spatial, 1)`` shared by all channels
    (nnU-Net: one field, ``synchronize_channels=True``), ``std`` a scalar."""
    return x + std * noise


def blur_radius(max_sigma: float) -> int:
    """Kernel half-width for the largest sigma: the Gaussian is truncated at 3 sigma."""
    return max(1, math.ceil(3 * max_sigma))


def _reflected_taps(size: int, radius: int) -> np.ndarray:
    """``(size, 2 radius + 1)`` source indices of the taps around each voxel, reflected at the edges
    (``d c b a | a b c d``, SciPy's default ``reflect``; needs ``radius <= size``)."""
    index = np.arange(size)[:, None] + np.arange(-radius, radius + 1)[None, :]
    index = np.where(index < 0, -index - 1, index)
    return np.where(index >= size, 2 * size - 1 - index, index)


def gaussian_blur(backend, x, sigmas, radius: int):
    """Separable Gaussian blur with ``sigmas`` ``(C, D)`` (per channel and axis, nnU-Net's
    ``synchronize_channels=False, synchronize_axes=False``), taps ``-radius..radius`` normalised to sum
    1, edges reflected."""
    xp = backend.xp
    taps = np.arange(-radius, radius + 1, dtype=np.float32)
    channels = []
    for c in range(x.shape[-1]):
        y = x[..., c]
        for axis, size in enumerate(y.shape):
            kernel = xp.exp(-0.5 * (taps / sigmas[c, axis]) ** 2)
            weights = xp.broadcast_to(kernel / xp.sum(kernel), (size, taps.size))
            y = backend.along_axis(y, axis, _reflected_taps(size, radius), weights)
        channels.append(y)
    return xp.stack(channels, axis=-1)


def multiply_brightness(x, multiplier):
    """``x * multiplier`` with one multiplier per channel ``(C,)``."""
    return x * multiplier


def adjust_contrast(xp, x, factor):
    """Scale each channel's deviation from its mean by ``factor`` ``(C,)``, then clip to the channel's
    original ``[min, max]`` (nnU-Net's ``preserve_range=True``)."""
    axes = _spatial_axes(x)
    mean = xp.mean(x, axis=axes)
    low, high = xp.min(x, axis=axes), xp.max(x, axis=axes)
    return xp.clip((x - mean) * factor + mean, low, high)


def _low_resolution_operator(xp, size: int, zoom):
    """One axis of ``size`` voxels at ``zoom`` (a scalar, may be traced) as a 2-tap operator: source
    indices ``(size, 2)`` and weights ``(size, 2)`` of down-then-up sampling.

    Down: ``m = round(size * zoom)`` voxels by nearest neighbour (PyTorch's ``nearest-exact``: low-res
    voxel ``j`` takes source ``floor((j + 0.5) * size / m)``). Up: linear with half-voxel alignment
    (``align_corners=False``): output ``i`` reads low-res coordinate ``max((i + 0.5) m / size - 0.5, 0)``.
    Static shapes, so a data-dependent ``m`` costs no recompilation.
    """
    m = xp.maximum(xp.round(size * zoom), 1.0)
    u = xp.maximum((np.arange(size, dtype=np.float32) + 0.5) * m / size - 0.5, 0.0)
    low = xp.minimum(xp.floor(u), m - 1)
    high = xp.minimum(low + 1, m - 1)

    def source(j):
        return xp.minimum(xp.floor((j + 0.5) * size / m), size - 1).astype(xp.int32)

    weight = u - low
    return xp.stack([source(low), source(high)], axis=1), xp.stack([1 - weight, weight], axis=1)


def simulate_low_resolution(backend, x, zoom, skip_axis=None):
    """Downsample every axis by ``zoom`` ``(C,)`` (nearest) and upsample back (linear), per channel
    (nnU-Net v2: the same zoom on all axes, ``synchronize_axes=True``). nnU-Net v1 upsampled with cubic
    splines; v2 (batchgeneratorsv2) uses linear as here. ``skip_axis``: a spatial axis left at full
    resolution (nnU-Net's ``ignore_axes`` of in-plane augmentation)."""
    channels = []
    for c in range(x.shape[-1]):
        y = x[..., c]
        for axis, size in enumerate(y.shape):
            if axis == skip_axis:
                continue
            y = backend.along_axis(y, axis, *_low_resolution_operator(backend.xp, size, zoom[c]))
        channels.append(y)
    return backend.xp.stack(channels, axis=-1)


def adjust_gamma(xp, x, gamma, invert: bool):
    """Per channel: rescale to ``[0, 1]``, raise to ``gamma`` ``(C,)``, rescale back, then restore the
    channel's mean and standard deviation (nnU-Net's ``p_retain_stats=1``). ``invert``: the same on
    ``-x`` (negated back afterwards), which brightens dark regions instead of bright ones."""
    axes = _spatial_axes(x)
    if invert:
        x = -x
    mean, std = xp.mean(x, axis=axes), xp.std(x, axis=axes)
    low = xp.min(x, axis=axes)
    span = xp.max(x, axis=axes) - low
    x = ((x - low) / xp.maximum(span, _TINY)) ** gamma * span + low
    x = (x - xp.mean(x, axis=axes)) * (std / xp.maximum(xp.std(x, axis=axes), _TINY)) + mean
    return -x if invert else x
