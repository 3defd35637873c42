"""Flax U-Nets. Importing this package pulls in nothing from training, data or the CLI."""

from medseg_jax.models.unet import UNet, count_parameters, default_features, default_strides  # noqa: F401
