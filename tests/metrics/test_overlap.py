"""Overlap metrics, volumes, per-class metrics and the empty-mask conventions (numpy)."""

import math

import numpy as np
import pytest

from medseg_jax.errors import ConfigError, DataError
from medseg_jax.metrics import (
    METRIC_NAMES,
    dice_iou_from_counts,
    dice_iou_per_class,
    empty_case_metrics,
    empty_value,
    segmentation_metrics,
)

NAN, INF = float("nan"), float("inf")


def test_dice_iou_by_hand():
    reference = np.array([[0, 1, 1, 1], [0, 2, 2, 0]])
    prediction = np.array([[1, 1, 1, 0], [0, 2, 0, 0]])
    scores = dice_iou_per_class(prediction, reference, [1, 2])
    # class 1: TP 2, FP 1, FN 1 -> Dice 4/6, IoU 2/4; class 2: TP 1, FP 0, FN 1 -> Dice 2/3, IoU 1/2
    assert (scores[1]["tp"], scores[1]["fp"], scores[1]["fn"]) == (2, 1, 1)
    assert scores[1]["dice"] == pytest.approx(4 / 6) and scores[1]["iou"] == pytest.approx(0.5)
    assert (scores[2]["tp"], scores[2]["fp"], scores[2]["fn"]) == (1, 0, 1)
    assert scores[2]["dice"] == pytest.approx(2 / 3) and scores[2]["iou"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "convention,expected",
    [
        # (both empty, reference only empty, prediction only empty) -> (dice, iou)
        ("nnunet", [(NAN, NAN), (0.0, 0.0), (0.0, 0.0)]),
        ("monai", [(NAN, NAN), (NAN, NAN), (0.0, 0.0)]),
    ],
)
def test_dice_iou_empty_masks(convention, expected):
    empty, some = np.zeros((4, 4), int), np.eye(4, dtype=int)
    cases = [(empty, empty), (some, empty), (empty, some)]  # (prediction, reference)
    for (prediction, reference), want in zip(cases, expected):
        got = dice_iou_per_class(prediction, reference, [1], empty=convention)[1]
        np.testing.assert_array_equal((got["dice"], got["iou"]), want)


def test_empty_value_table():
    assert empty_value("dice", False, False) is None
    for metric in ("dice", "iou", "hd95", "assd", "nsd"):
        for convention in ("nnunet", "monai"):
            assert math.isnan(empty_value(metric, True, True, convention))
    assert empty_value("hd95", True, False, "nnunet") == INF and math.isnan(empty_value("hd95", True, False, "monai"))
    assert empty_value("nsd", False, True, "monai") == 0.0 and empty_value("assd", False, True, "monai") == INF
    with pytest.raises(ConfigError, match="convention"):
        empty_value("dice", True, True, "one")
    with pytest.raises(ConfigError, match="unknown metric"):
        empty_value("hd100", True, True)


def test_segmentation_metrics_3d_volumes_and_keys():
    spacing = (0.5, 2.0, 3.0)  # 3 mm^3 per voxel
    reference = np.zeros((10, 8, 6), np.int16)
    reference[2:6, 2:5, 1:4] = 1  # 36 voxels
    prediction = np.zeros_like(reference)
    prediction[3:7, 2:5, 1:4] = 1  # 36 voxels, 27 shared
    prediction[0, 0, 0] = 2  # class 2 only predicted
    results = segmentation_metrics(prediction, reference, spacing, [1, 2, 3])
    assert set(results) == {1, 2, 3} and all(tuple(r) == METRIC_NAMES for r in results.values())
    one = results[1]
    assert (one["tp"], one["fp"], one["fn"]) == (27, 9, 9)
    assert one["dice"] == pytest.approx(54 / 72) and one["iou"] == pytest.approx(27 / 45)
    assert one["volume_ref"] == pytest.approx(36 * 3.0 / 1000) and one["volume_diff"] == pytest.approx(0.0)
    assert one["hd95"] == pytest.approx(0.5)  # shifted by one voxel of 0.5 mm along axis 0
    assert 0.0 < one["assd"] < 0.5 and one["nsd"] == 1.0
    two = results[2]
    assert two["dice"] == 0.0 and two["hd95"] == INF and two["nsd"] == 0.0
    assert two["volume_pred"] == pytest.approx(3.0 / 1000) and two["volume_diff"] == pytest.approx(3.0 / 1000)
    np.testing.assert_equal(results[3], empty_case_metrics())
    monai = segmentation_metrics(prediction, reference, spacing, [2], empty="monai")[2]
    assert all(math.isnan(monai[m]) for m in ("dice", "iou", "hd95", "assd", "nsd"))


def test_segmentation_metrics_2d_area_in_mm2():
    reference = np.zeros((6, 6), np.uint8)
    reference[1:3, 1:4] = 1
    results = segmentation_metrics(reference, reference, (0.5, 4.0), [1])[1]
    assert results["volume_ref"] == pytest.approx(6 * 2.0)
    assert (results["dice"], results["hd95"], results["assd"], results["nsd"]) == (1.0, 0.0, 0.0, 1.0)


def test_segmentation_metrics_rejects_mismatched_shapes():
    with pytest.raises(DataError, match="shape"):
        segmentation_metrics(np.zeros((3, 3)), np.zeros((3, 4)), (1.0, 1.0), [1])
    with pytest.raises(DataError, match="shape"):
        dice_iou_per_class(np.zeros((3, 3)), np.zeros((3, 4)), [1])


@pytest.mark.parametrize("convention", ["nnunet", "monai"])
def test_dice_from_counts_follows_the_convention_table(convention):
    # (tp, fp, fn) with: both empty, reference only empty, prediction only empty, neither empty
    counts = {(True, True): (0, 0, 0), (True, False): (0, 3, 0), (False, True): (0, 0, 2), (False, False): (2, 1, 1)}
    for (reference_empty, prediction_empty), (tp, fp, fn) in counts.items():
        dice, iou = dice_iou_from_counts(tp, fp, fn, convention)
        for metric, got in (("dice", dice), ("iou", iou)):
            want = empty_value(metric, reference_empty, prediction_empty, convention)
            if want is None:
                want = 2 * tp / (2 * tp + fp + fn) if metric == "dice" else tp / (tp + fp + fn)
            np.testing.assert_equal(float(got), want)
