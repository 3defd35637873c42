"""Overlap metrics on integer label maps.

Empty-mask convention (``empty`` argument): when a class is absent from both the reference and the
prediction, Dice and IoU are undefined; ``empty="nan"`` (default, as nnU-Net's evaluation) reports NaN
so that averages skip the case, ``empty="one"`` reports 1.0 (a correct "nothing there").
"""

from __future__ import annotations

import numpy as np


def dice_iou_per_class(prediction: np.ndarray, reference: np.ndarray, classes, empty: str = "nan") -> dict:
    """``{class: {"dice", "iou", "tp", "fp", "fn"}}`` for each class id in ``classes``."""
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from reference shape {reference.shape}")
    if empty not in ("nan", "one"):
        raise ValueError(f"empty must be 'nan' or 'one', got {empty!r}")
    results = {}
    for k in classes:
        pred, ref = prediction == k, reference == k
        tp = int(np.count_nonzero(pred & ref))
        fp = int(np.count_nonzero(pred & ~ref))
        fn = int(np.count_nonzero(~pred & ref))
        if tp + fp + fn == 0:
            value = float("nan") if empty == "nan" else 1.0
            dice = iou = value
        else:
            dice = 2 * tp / (2 * tp + fp + fn)
            iou = tp / (tp + fp + fn)
        results[int(k)] = {"dice": dice, "iou": iou, "tp": tp, "fp": fp, "fn": fn}
    return results
