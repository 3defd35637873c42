"""Overlap metrics (Dice, IoU) and volumes on integer label maps (numpy).

Dice = 2 TP / (2 TP + FP + FN), IoU = TP / (TP + FP + FN), counted in voxels. Empty masks follow the
``empty`` convention (:mod:`medseg_jax.metrics.conventions`): with ``"nnunet"`` (default) both empty ->
NaN (the mean over cases skips the case) and one empty -> 0; with ``"monai"`` reference empty -> NaN.
"""

from __future__ import annotations

import numpy as np

from medseg_jax.errors import DataError
from medseg_jax.metrics.conventions import empty_value


def overlap_counts(prediction: np.ndarray, reference: np.ndarray) -> tuple[int, int, int]:
    """(TP, FP, FN) voxel counts of two boolean masks of equal shape."""
    tp = int(np.count_nonzero(prediction & reference))
    return tp, int(np.count_nonzero(prediction)) - tp, int(np.count_nonzero(reference)) - tp


def dice_iou(tp: int, fp: int, fn: int, empty: str = "nnunet") -> tuple[float, float]:
    """Dice and IoU from voxel counts; empty masks per ``empty`` (see the module docstring)."""
    reference_empty, prediction_empty = tp + fn == 0, tp + fp == 0
    special = empty_value("dice", reference_empty, prediction_empty, empty)
    if special is not None:
        return special, empty_value("iou", reference_empty, prediction_empty, empty)
    return 2 * tp / (2 * tp + fp + fn), tp / (tp + fp + fn)


def dice_iou_per_class(prediction: np.ndarray, reference: np.ndarray, classes, empty: str = "nnunet") -> dict:
    """``{class: {"dice", "iou", "tp", "fp", "fn"}}`` for each class id in ``classes``.

    ``prediction`` and ``reference`` are integer label maps of equal shape (any number of dimensions).
    """
    if prediction.shape != reference.shape:
        raise DataError(f"prediction shape {prediction.shape} differs from reference shape {reference.shape}")
    results = {}
    for k in classes:
        tp, fp, fn = overlap_counts(prediction == k, reference == k)
        dice, iou = dice_iou(tp, fp, fn, empty)
        results[int(k)] = {"dice": dice, "iou": iou, "tp": tp, "fp": fp, "fn": fn}
    return results


def volume(count: int, spacing) -> float:
    """Volume of ``count`` voxels: mL for 3D spacing (mm^3 / 1000), mm^2 for 2D spacing."""
    size = float(np.prod([float(s) for s in spacing]))
    return count * size / 1000.0 if len(spacing) == 3 else count * size
