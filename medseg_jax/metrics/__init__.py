"""Segmentation metrics on label maps (numpy)."""

from medseg_jax.metrics.overlap import dice_iou_per_class  # noqa: F401
