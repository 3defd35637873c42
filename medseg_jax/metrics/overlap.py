"""Overlap metrics (Dice, IoU) and volumes on integer label maps.

Dice = 2 TP / (2 TP + FP + FN), IoU = TP / (TP + FP + FN), counted in voxels. Empty masks follow the
``empty`` convention (:mod:`medseg_jax.metrics.conventions`): with ``"nnunet"`` (default) both empty ->
NaN (the mean over cases skips the case) and one empty -> 0; with ``"monai"`` reference empty -> NaN.

:func:`dice_iou_from_counts` is the only place Dice and IoU are computed from counts: evaluation, the
training loop's validation (numpy) and :mod:`medseg_jax.metrics.jax_overlap` (``xp=jax.numpy``, inside
jit) all call it.
"""

from __future__ import annotations

import numpy as np

from medseg_jax.errors import DataError
from medseg_jax.metrics.conventions import check_convention


def binary_tp_fp_fn(prediction: np.ndarray, reference: np.ndarray) -> tuple[int, int, int]:
    """(TP, FP, FN) voxel counts of two boolean masks of equal shape, as Python ints."""
    tp = int(np.count_nonzero(prediction & reference))
    return tp, int(np.count_nonzero(prediction)) - tp, int(np.count_nonzero(reference)) - tp


def dice_iou_from_counts(tp, fp, fn, empty: str = "nnunet", xp=np):
    """Dice and IoU from voxel counts, element-wise: ``(dice, iou)`` arrays of the counts' shape.

    Counts may be scalars or per-class arrays. ``xp`` is the array module: ``numpy`` (float64 results)
    or ``jax.numpy`` (float32, traceable inside jit; ``empty`` is then static). Undefined values per
    ``empty`` (see the module docstring) are NaN; an absent class is never a division by zero.
    """
    check_convention(empty)
    tp, fp, fn = (xp.asarray(x) * 1.0 for x in (tp, fp, fn))  # float64 in numpy, float32 in JAX
    union = tp + fp + fn
    undefined = union == 0
    if empty == "monai":
        undefined = undefined | (tp + fn == 0)
    safe = xp.where(union == 0, 1.0, union)
    dice = xp.where(undefined, xp.nan, 2 * tp / (safe + tp))
    iou = xp.where(undefined, xp.nan, tp / safe)
    return dice, iou


def dice_iou_per_class(prediction: np.ndarray, reference: np.ndarray, classes, empty: str = "nnunet") -> dict:
    """``{class: {"dice", "iou", "tp", "fp", "fn"}}`` for each class id in ``classes``.

    ``prediction`` and ``reference`` are integer label maps of equal shape (any number of dimensions).
    """
    if prediction.shape != reference.shape:
        raise DataError(f"prediction shape {prediction.shape} differs from reference shape {reference.shape}")
    results = {}
    for k in classes:
        tp, fp, fn = binary_tp_fp_fn(prediction == k, reference == k)
        dice, iou = dice_iou_from_counts(tp, fp, fn, empty)
        results[int(k)] = {"dice": float(dice), "iou": float(iou), "tp": tp, "fp": fp, "fn": fn}
    return results


def volume(count: int, spacing) -> float:
    """Volume of ``count`` voxels: mL for 3D spacing (mm^3 / 1000), mm^2 for 2D spacing."""
    size = float(np.prod([float(s) for s in spacing]))
    return count * size / 1000.0 if len(spacing) == 3 else count * size
