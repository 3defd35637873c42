"""``AugmentConfig``: which augmentations run where, with nnU-Net v2's default probabilities and ranges.

Every probability is per sample (nnU-Net's ``RandomTransform(apply_probability=...)``); ranges are
``(low, high)`` of a uniform draw. Ranges marked "(nnU-Net BGContrast)" are drawn as nnU-Net does:
with probability 1/2 from ``(low, 1)``, otherwise from ``(1, high)``, so that values below and above 1
are equally likely although the range is asymmetric.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from medseg_jax.config import AugmentConfig  # noqa: F401  (defined with the other run configs)

# nnU-Net's ANISO_THRESHOLD, the one the plan and resampling use: a 3D patch whose largest side exceeds
# this many times its smallest is augmented in-plane only (rotating it out of plane would interpolate
# across thick slices).
from medseg_jax.data.resample import ANISOTROPY_THRESHOLD
from medseg_jax.errors import ConfigError

_PROBABILITIES = [f.name for f in dataclasses.fields(AugmentConfig) if f.name.endswith("probability")]
_RANGES = [
    "scale_range",
    "elastic_magnitude",
    "noise_std",
    "blur_sigma",
    "brightness_range",
    "contrast_range",
    "low_resolution_zoom",
    "gamma_range",
]
_POSITIVE_RANGES = ["scale_range", "blur_sigma", "brightness_range", "low_resolution_zoom", "gamma_range"]


def check_augment_config(config: AugmentConfig, spatial_dims: int) -> None:
    """Raise :class:`ConfigError` naming ``augment.<field>`` for values no transform can use."""
    for name in _PROBABILITIES:
        value = getattr(config, name)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"augment.{name}: {value} is not a probability in [0, 1]")
    for name in _RANGES:
        low, high = getattr(config, name)
        if low > high:
            raise ConfigError(f"augment.{name}: low {low} is above high {high}")
        if low < 0 or (name in _POSITIVE_RANGES and low <= 0):
            raise ConfigError(f"augment.{name}: {(low, high)} must be positive")
    if config.low_resolution_zoom[1] > 1:
        raise ConfigError(f"augment.low_resolution_zoom: {config.low_resolution_zoom} must not exceed 1")
    if config.elastic_control_spacing < 1:
        raise ConfigError(f"augment.elastic_control_spacing: {config.elastic_control_spacing} must be >= 1")
    if config.rotation_degrees is not None and config.rotation_degrees < 0:
        raise ConfigError(f"augment.rotation_degrees: {config.rotation_degrees} must be >= 0")
    if config.in_plane_only and spatial_dims != 3:
        raise ConfigError(f"augment.in_plane_only: only for 3D patches (these are {spatial_dims}D)")
    for axis in config.mirror_axes or ():
        if not 0 <= axis < spatial_dims:
            raise ConfigError(f"augment.mirror_axes: axis {axis} is not a spatial axis of {spatial_dims}D patches")


def fixed_axis(config: AugmentConfig, patch_size: Sequence[int]) -> int | None:
    """The patch axis that spatial transforms leave alone (the through-plane axis of in-plane
    augmentation: the smallest patch side), or None when they act on every axis."""
    patch = [int(p) for p in patch_size]
    if len(patch) != 3 or config.in_plane_only is False:
        return None
    if config.in_plane_only is None and max(patch) <= ANISOTROPY_THRESHOLD * min(patch):
        return None
    return int(np.argmin(patch))


def max_rotation_degrees(config: AugmentConfig, spatial_dims: int, in_plane: bool = False) -> float:
    """The configured largest rotation per plane, or nnU-Net's default: 180 degrees in 2D and for
    in-plane augmentation of 3D patches, 30 degrees per plane otherwise."""
    if config.rotation_degrees is not None:
        return float(config.rotation_degrees)
    return 180.0 if spatial_dims == 2 or in_plane else 30.0
