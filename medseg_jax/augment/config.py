"""``AugmentConfig``: which augmentations run where, with nnU-Net v2's default probabilities and ranges.

Every probability is per sample (nnU-Net's ``RandomTransform(apply_probability=...)``); ranges are
``(low, high)`` of a uniform draw. Ranges marked "(nnU-Net BGContrast)" are drawn as nnU-Net does:
with probability 1/2 from ``(low, 1)``, otherwise from ``(1, high)``, so that values below and above 1
are equally likely although the range is asymmetric.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

from medseg_jax.config import field
from medseg_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    mode: Literal["device", "cpu", "none"] = field("device", "where augmentation runs: inside the jitted step (device), in the loader (cpu), or not at all (none)")
    rotation_probability: float = field(0.2, "probability of a random rotation")
    rotation_degrees: Optional[float] = field(None, "largest rotation per axis plane in degrees; null = nnU-Net's 180 in 2D, 30 in 3D")
    scale_probability: float = field(0.2, "probability of random scaling (one factor for all axes)")
    scale_range: tuple[float, float] = field((0.7, 1.4), "range of the factor on sampling coordinates (> 1 shows more context: structures look smaller)")
    elastic_probability: float = field(0.0, "probability of an elastic deformation (off in nnU-Net v2)")
    elastic_control_spacing: int = field(16, "voxels between the control points of the elastic B-spline")
    elastic_magnitude: tuple[float, float] = field((0.0, 4.0), "range of the largest control-point displacement in voxels")
    mirror_probability: float = field(0.5, "probability of mirroring, drawn per axis")
    mirror_axes: Optional[tuple[int, ...]] = field(None, "spatial axes that may be mirrored; null = all")
    label_interpolation: Literal["nearest", "linear"] = field("nearest", "labels: nearest neighbour, or linear on the one-hot encoding then argmax")
    noise_probability: float = field(0.1, "probability of additive Gaussian noise")
    noise_std: tuple[float, float] = field((0.0, 0.1), "range of the noise standard deviation (nnU-Net names it variance but uses it as the std)")
    blur_probability: float = field(0.2, "probability of Gaussian blur")
    blur_channel_probability: float = field(0.5, "probability that a channel is blurred when blur is applied")
    blur_sigma: tuple[float, float] = field((0.5, 1.0), "range of the blur sigma in voxels, drawn per channel and axis")
    brightness_probability: float = field(0.15, "probability of a multiplicative brightness change")
    brightness_range: tuple[float, float] = field((0.75, 1.25), "range of the brightness multiplier per channel (nnU-Net BGContrast)")
    contrast_probability: float = field(0.15, "probability of a contrast change (range preserved)")
    contrast_range: tuple[float, float] = field((0.75, 1.25), "range of the contrast factor per channel (nnU-Net BGContrast)")
    low_resolution_probability: float = field(0.25, "probability of simulated low resolution")
    low_resolution_channel_probability: float = field(0.5, "probability that a channel is degraded when low resolution is applied")
    low_resolution_zoom: tuple[float, float] = field((0.5, 1.0), "range of the downsampling factor per channel")
    gamma_inverted_probability: float = field(0.1, "probability of a gamma change of the inverted image")
    gamma_probability: float = field(0.3, "probability of a gamma change (applied after the inverted one)")
    gamma_range: tuple[float, float] = field((0.7, 1.5), "range of gamma per channel (nnU-Net BGContrast)")


_PROBABILITIES = [f.name for f in dataclasses.fields(AugmentConfig) if f.name.endswith("probability")]
_RANGES = ["scale_range", "elastic_magnitude", "noise_std", "blur_sigma", "brightness_range", "contrast_range",
           "low_resolution_zoom", "gamma_range"]
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
    for axis in config.mirror_axes or ():
        if not 0 <= axis < spatial_dims:
            raise ConfigError(f"augment.mirror_axes: axis {axis} is not a spatial axis of {spatial_dims}D patches")


def max_rotation_degrees(config: AugmentConfig, spatial_dims: int) -> float:
    """The configured largest rotation per plane, or nnU-Net's default for the dimensionality."""
    if config.rotation_degrees is not None:
        return float(config.rotation_degrees)
    return 180.0 if spatial_dims == 2 else 30.0
