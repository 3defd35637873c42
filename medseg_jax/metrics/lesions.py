"""Lesion-level detection: how many reference lesions (connected components) a prediction finds.

Convention: a reference lesion is *detected* when at least one predicted voxel of the class overlaps it;
a predicted component is a *false positive* when it overlaps no reference lesion. Components use full
connectivity (26 neighbours in 3D, 8 in 2D). Sensitivity is NaN when the reference has no lesion,
precision NaN when the prediction has none.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def lesion_detection(prediction: np.ndarray, reference: np.ndarray, class_id: int) -> dict:
    """``{"reference_lesions", "detected", "predicted_lesions", "false_positives", "sensitivity", "precision"}``."""
    structure = ndimage.generate_binary_structure(reference.ndim, reference.ndim)
    pred, ref = prediction == class_id, reference == class_id
    ref_components, n_ref = ndimage.label(ref, structure)
    pred_components, n_pred = ndimage.label(pred, structure)
    detected = len(np.setdiff1d(np.unique(ref_components[pred]), [0]))
    matched_predictions = len(np.setdiff1d(np.unique(pred_components[ref]), [0]))
    return {
        "reference_lesions": int(n_ref),
        "detected": int(detected),
        "predicted_lesions": int(n_pred),
        "false_positives": int(n_pred - matched_predictions),
        "sensitivity": detected / n_ref if n_ref else float("nan"),
        "precision": matched_predictions / n_pred if n_pred else float("nan"),
    }
