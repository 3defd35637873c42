"""Segmentation metrics on label maps: overlap, surface distances and volumes, with stated conventions.

numpy (CPU, evaluation): :func:`segmentation_metrics` (every metric per class), :func:`dice_iou_per_class`,
:func:`dice_iou_from_counts` (also the JAX scores, with ``xp=jax.numpy``),
:func:`surface_distances` with :func:`hausdorff_distance`, :func:`average_symmetric_surface_distance`,
:func:`normalized_surface_dice`. JAX (inside jit): :mod:`medseg_jax.metrics.jax_overlap`. Empty-mask
conventions: :mod:`medseg_jax.metrics.conventions`.
"""

from medseg_jax.metrics.conventions import EMPTY_CONVENTIONS, empty_value
from medseg_jax.metrics.overlap import binary_tp_fp_fn, dice_iou_from_counts, dice_iou_per_class, volume
from medseg_jax.metrics.per_class import (
    DEFAULT_NSD_TOLERANCE_MM,
    METRIC_NAMES,
    empty_case_metrics,
    segmentation_metrics,
)
from medseg_jax.metrics.surface import (
    SurfaceDistances,
    average_symmetric_surface_distance,
    hausdorff_distance,
    normalized_surface_dice,
    surface_distances,
)

__all__ = [
    "DEFAULT_NSD_TOLERANCE_MM",
    "EMPTY_CONVENTIONS",
    "METRIC_NAMES",
    "SurfaceDistances",
    "average_symmetric_surface_distance",
    "binary_tp_fp_fn",
    "dice_iou_from_counts",
    "dice_iou_per_class",
    "empty_case_metrics",
    "empty_value",
    "hausdorff_distance",
    "normalized_surface_dice",
    "segmentation_metrics",
    "surface_distances",
    "volume",
]
