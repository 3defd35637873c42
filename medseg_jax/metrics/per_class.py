"""All metrics of a segmentation, per class, on integer label maps with their voxel spacing.

One call gives, for each class: ``dice``, ``iou`` (voxel overlap), ``hd95``, ``assd`` (mm), ``nsd`` (at a
tolerance in mm), ``volume_ref``, ``volume_pred`` and ``volume_diff`` (prediction minus reference; mL
for 3D maps, mm^2 for 2D maps) and the voxel counts ``tp``, ``fp``, ``fn``. Surface metrics follow the
surface-element definition (:mod:`medseg_jax.metrics.surface`), empty masks the ``empty`` convention
(:mod:`medseg_jax.metrics.conventions`).
"""

from __future__ import annotations

from typing import cast

import numpy as np

from medseg_jax.errors import DataError
from medseg_jax.metrics.conventions import check_convention, empty_value
from medseg_jax.metrics.overlap import binary_tp_fp_fn, dice_iou_from_counts, volume
from medseg_jax.metrics.surface import (
    average_symmetric_surface_distance,
    hausdorff_distance,
    normalized_surface_dice,
    surface_distances,
)

METRIC_NAMES = ("dice", "iou", "hd95", "assd", "nsd", "volume_ref", "volume_pred", "volume_diff", "tp", "fp", "fn")
DEFAULT_NSD_TOLERANCE_MM = 1.0  # FLARE challenge convention; set it per structure where a protocol says so


def segmentation_metrics(
    prediction: np.ndarray,
    reference: np.ndarray,
    spacing,
    classes,
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
    empty: str = "nnunet",
    surface: str = "element",
    distances: bool = True,
) -> dict[int, dict[str, float]]:
    """``{class: {metric: value}}`` for every class id in ``classes`` (keys in :data:`METRIC_NAMES`).

    ``prediction``, ``reference``: integer label maps of equal shape, 2D or 3D; ``spacing``: voxel size in
    mm per array axis. ``empty``: "nnunet" (default) or "monai"; ``surface``: "element" (default) or
    "voxel" (MONAI's edge voxels). ``distances=False`` skips the surface distances (the costly part on
    large volumes): ``hd95``, ``assd`` and ``nsd`` are then NaN.
    """
    check_convention(empty)
    prediction, reference = np.asarray(prediction), np.asarray(reference)
    if prediction.shape != reference.shape:
        raise DataError(f"prediction shape {prediction.shape} differs from reference shape {reference.shape}")
    results = {}
    for k in classes:
        pred, ref = prediction == k, reference == k
        tp, fp, fn = binary_tp_fp_fn(pred, ref)
        dice, iou = (float(v) for v in dice_iou_from_counts(tp, fp, fn, empty))
        if distances:
            found = surface_distances(ref, pred, spacing, surface=surface)
            surface_scores = {
                "hd95": hausdorff_distance(found, 95.0, empty),
                "assd": average_symmetric_surface_distance(found, empty),
                "nsd": normalized_surface_dice(found, nsd_tolerance_mm, empty),
            }
        else:
            surface_scores = dict.fromkeys(("hd95", "assd", "nsd"), float("nan"))
        volume_ref, volume_pred = volume(tp + fn, spacing), volume(tp + fp, spacing)
        results[int(k)] = {
            "dice": dice,
            "iou": iou,
            **surface_scores,
            "volume_ref": volume_ref,
            "volume_pred": volume_pred,
            "volume_diff": volume_pred - volume_ref,
            "tp": tp,
            "fp": fp,
            "fn": fn,
        }
    return results


def empty_case_metrics(empty: str = "nnunet") -> dict[str, float]:
    """The metrics of a class absent from both maps (scores per ``empty``: NaN; volumes and counts 0).

    Lets a caller fill in classes it did not compute because neither map contains them.
    """
    # Both maps empty: empty_value never returns None (that means "compute it"), only a float.
    scores = {m: cast(float, empty_value(m, True, True, empty)) for m in ("dice", "iou", "hd95", "assd", "nsd")}
    return {**scores, "volume_ref": 0.0, "volume_pred": 0.0, "volume_diff": 0.0, "tp": 0, "fp": 0, "fn": 0}
