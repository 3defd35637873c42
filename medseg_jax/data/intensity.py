"""Intensity operations of the preprocessing: denoising, CLAHE and normalisation.

All functions act on one channel ``(*spatial)`` (2D or 3D, axes in RAS order, the last axis of a 3D array
being the slice axis) and return float32. Denoising and CLAHE run on the raw intensities (HU for CT),
*before* normalisation, so that their parameters (a window in HU, a sigma in mm) mean the same for
every case.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import numpy as np
from scipy import ndimage

from medseg_jax.errors import ConfigError

# Guards the z-score against constant images (all voxels equal -> output 0, not NaN).
_MIN_STD = 1e-8


def normalize_channel(channel: np.ndarray, scheme: dict, mask: np.ndarray | None = None) -> np.ndarray:
    """Normalise one channel according to a plan's per-channel ``scheme`` dict.

    - ``"ct"``: clip to the dataset's foreground ``[percentile_00_5, percentile_99_5]``, then
      ``(x - mean) / std`` with the dataset's foreground mean and std (nnU-Net's CTNormalization).
    - ``"zscore"``: ``(x - mean) / std`` with this case's own mean and std over all voxels; with
      ``"use_mask": true`` (nnU-Net's ``use_mask_for_norm``) only the voxels of ``mask`` are used and
      changed, the others stay as they are (zero: the mask is the non-zero region).
    - ``"hu_window"``: clip to the fixed window ``[lower, upper]`` and map it linearly to ``[0, 1]``
      (MONAI's ``ScaleIntensityRange`` convention, e.g. the abdominal window -175..250 HU).
    - ``"rescale_01"``: ``(x - min) / max(x - min)`` of this case (nnU-Net's RescaleTo01Normalization).
    - ``"none"``: unchanged (nnU-Net's NoNormalization).
    """
    x = np.asarray(channel, dtype=np.float32)
    name = scheme.get("scheme")
    if name == "ct":
        x = np.clip(x, scheme["percentile_00_5"], scheme["percentile_99_5"])
        return ((x - scheme["mean"]) / max(float(scheme["std"]), _MIN_STD)).astype(np.float32)
    if name == "zscore" and scheme.get("use_mask"):
        if mask is None or mask.shape != x.shape:
            raise ConfigError("normalization scheme 'zscore' with use_mask needs the non-zero mask of the image")
        out = x.copy()
        inside = x[mask]
        out[mask] = (inside - inside.mean()) / max(float(inside.std()), _MIN_STD)
        return out
    if name == "zscore":
        return ((x - x.mean()) / max(float(x.std()), _MIN_STD)).astype(np.float32)
    if name == "hu_window":
        lower, upper = float(scheme["lower"]), float(scheme["upper"])
        return ((np.clip(x, lower, upper) - lower) / (upper - lower)).astype(np.float32)
    if name == "rescale_01":
        shifted = x - x.min()
        return (shifted / max(float(shifted.max()), _MIN_STD)).astype(np.float32)
    if name == "none":
        return x.copy()
    raise ConfigError(
        f"normalization scheme {name!r} is unknown (expected 'ct', 'zscore', 'hu_window', 'rescale_01' or 'none')"
    )


def denoise(channel: np.ndarray, options: dict, spacing: Sequence[float], in_plane_only: bool = False) -> np.ndarray:
    """Smooth one channel with the plan's ``denoise`` options.

    - ``{"method": "gaussian", "sigma": s}``: Gaussian with standard deviation ``s`` in *millimetres*,
      converted per axis with ``spacing`` so thick and thin axes are smoothed alike in physical space.
    - ``{"method": "median", "size": n}``: median over ``n`` voxels along each axis.

    ``in_plane_only`` (2D plans) leaves the last axis alone so neighbouring slices are not mixed.
    """
    x = np.asarray(channel, dtype=np.float32)
    method = options.get("method")
    if method == "gaussian":
        sigma = np.float64(options["sigma"]) / np.asarray(spacing, dtype=np.float64)
        if in_plane_only and x.ndim == 3:
            sigma[-1] = 0.0
        return ndimage.gaussian_filter(x, sigma=tuple(sigma), mode="nearest").astype(np.float32)
    if method == "median":
        size = [int(options["size"])] * x.ndim
        if in_plane_only and x.ndim == 3:
            size[-1] = 1
        return ndimage.median_filter(x, size=tuple(size), mode="nearest").astype(np.float32)
    raise ConfigError(f"denoise method {method!r} is unknown (expected 'gaussian' or 'median')")


def _clahe_slice(image: np.ndarray, clip_limit: float, kernel_size: Sequence[int], n_bins: int) -> np.ndarray:
    """CLAHE of one 2D image with values in [0, 1] (Zuiderveld's algorithm, uniform excess redistribution).

    The image is tiled into ``kernel_size`` blocks (edge-padded to whole tiles); each tile's histogram is
    clipped at ``clip_limit * voxels_per_tile`` (at least 1 count), the excess spread evenly over all
    bins, and its cumulative histogram is the tile's mapping. Each pixel's output interpolates bilinearly
    between the mappings of the four nearest tile centres, so there are no seams at tile borders.
    """
    ky, kx = (int(k) for k in kernel_size)
    h, w = image.shape
    ty, tx = -(-h // ky), -(-w // kx)
    bins = np.minimum((image * n_bins).astype(np.int64), n_bins - 1)
    padded = np.pad(bins, ((0, ty * ky - h), (0, tx * kx - w)), mode="edge")
    tiles = padded.reshape(ty, ky, tx, kx).transpose(0, 2, 1, 3).reshape(ty * tx, ky * kx)
    tile_ids = np.repeat(np.arange(ty * tx), ky * kx)
    hist = np.bincount(tile_ids * n_bins + tiles.ravel(), minlength=ty * tx * n_bins)
    hist = hist.reshape(ty * tx, n_bins).astype(np.float64)
    limit = max(clip_limit * ky * kx, 1.0)
    excess = np.maximum(hist - limit, 0.0).sum(axis=1, keepdims=True)
    hist = np.minimum(hist, limit) + excess / n_bins
    maps = (np.cumsum(hist, axis=1) / (ky * kx)).reshape(ty, tx, n_bins)

    def neighbours(n_pixels, k, n_tiles):
        # Position of each pixel in tile-centre units; clamped so border pixels use the border tile.
        pos = np.clip((np.arange(n_pixels) + 0.5) / k - 0.5, 0, n_tiles - 1)
        low = np.floor(pos).astype(np.int64)
        return low, np.minimum(low + 1, n_tiles - 1), (pos - low)

    y0, y1, wy = neighbours(h, ky, ty)
    x0, x1, wx = neighbours(w, kx, tx)
    wy, wx = wy[:, None], wx[None, :]
    top = (1 - wx) * maps[y0[:, None], x0[None, :], bins] + wx * maps[y0[:, None], x1[None, :], bins]
    bottom = (1 - wx) * maps[y1[:, None], x0[None, :], bins] + wx * maps[y1[:, None], x1[None, :], bins]
    return np.clip((1 - wy) * top + wy * bottom, 0.0, 1.0)


def clahe(channel: np.ndarray, options: dict, window: tuple[float, float] | None = None) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation, slice by slice along the last axis of a 3D array.

    ``options``: ``{"clip_limit": 0.01, "kernel_size": None | int | [ky, kx], "n_bins": 256}`` with
    ``clip_limit`` normalised to (0, 1] as in scikit-image and ``kernel_size`` the tile size in voxels
    (default 1/8 of each in-plane size, at least 2). Intensities are clipped to ``window`` (e.g. the HU
    window; default the channel's min..max), rescaled to [0, 1], equalised, and mapped back to the
    window, so the output range stays inside the input's and normalisation can follow unchanged.
    """
    x = np.asarray(channel, dtype=np.float32)
    lower, upper = (float(x.min()), float(x.max())) if window is None else (float(window[0]), float(window[1]))
    if upper <= lower:
        return x.copy()
    unit = (np.clip(x, lower, upper) - lower) / (upper - lower)
    in_plane = x.shape[:2]
    kernel = options.get("kernel_size")
    if kernel is None:
        kernel = [max(2, n // 8) for n in in_plane]
    elif np.isscalar(kernel):
        # np.isscalar's TypeGuard includes complex/memoryview, which int() rejects in the stubs only.
        kernel = [int(cast(Any, kernel))] * 2
    clip_limit = float(options.get("clip_limit", 0.01))
    n_bins = int(options.get("n_bins", 256))
    if x.ndim == 2:
        out = _clahe_slice(unit, clip_limit, kernel, n_bins)
    else:
        out = np.stack([_clahe_slice(unit[..., k], clip_limit, kernel, n_bins) for k in range(x.shape[-1])], -1)
    return (lower + out * (upper - lower)).astype(np.float32)
