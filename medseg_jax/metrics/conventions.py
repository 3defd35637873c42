"""What each metric returns when the reference, the prediction or both are empty for a class.

The field disagrees, so the convention is a parameter (``empty``) of every metric:

===============================  ==========================  =================================
case                             ``empty="nnunet"`` (default)  ``empty="monai"``
===============================  ==========================  =================================
both empty                       NaN for every metric          NaN for every metric
reference empty, prediction not  Dice 0, IoU 0, HD95 inf,      NaN for every metric
                                 ASSD inf, NSD 0
prediction empty, reference not  Dice 0, IoU 0, HD95 inf,      Dice 0, IoU 0, HD95 inf,
                                 ASSD inf, NSD 0               ASSD inf, NSD 0
===============================  ==========================  =================================

``"nnunet"`` is nnU-Net's evaluation for Dice / IoU (NaN only when there is nothing to compare, so the
mean over cases skips the case; a false positive or a miss counts as 0), extended to the surface metrics
as the DeepMind ``surface-distance`` package does (a surface with no counterpart is infinitely far:
HD95 / ASSD inf; NSD 0, as also MONAI's NSD). ``"monai"`` is MONAI's ``ignore_empty=True`` default of
``DiceMetric`` applied to every metric: a case whose reference lacks the class is not scored at all.
Volumes and voxel counts are always defined (0 for an empty mask).
"""

from __future__ import annotations

from medseg_jax.errors import ConfigError

EMPTY_CONVENTIONS = ("nnunet", "monai")

# value when exactly one of the two masks is empty (and the convention scores the case)
_ONE_EMPTY = {"dice": 0.0, "iou": 0.0, "hd95": float("inf"), "assd": float("inf"), "nsd": 0.0}


def check_convention(empty: str) -> str:
    """Return ``empty`` if it names a convention, else raise ConfigError listing the valid ones."""
    if empty not in EMPTY_CONVENTIONS:
        raise ConfigError(f"empty-mask convention must be one of {EMPTY_CONVENTIONS}, got {empty!r}")
    return empty


def empty_value(metric: str, reference_empty: bool, prediction_empty: bool, empty: str = "nnunet") -> float | None:
    """The value ``metric`` ("dice", "iou", "hd95", "assd", "nsd") takes for these empty flags.

    Returns None when neither mask is empty (the metric must be computed). Any Hausdorff percentile uses
    the "hd95" entry.
    """
    check_convention(empty)
    if metric not in _ONE_EMPTY:
        raise ConfigError(f"unknown metric {metric!r}; expected one of {sorted(_ONE_EMPTY)}")
    if not (reference_empty or prediction_empty):
        return None
    if reference_empty and prediction_empty:
        return float("nan")
    if reference_empty and empty == "monai":
        return float("nan")
    return _ONE_EMPTY[metric]
