"""nnU-Net v2's summary.json layout (``--format nnunet``), checked against counts made here with numpy."""

import csv
import json
import math

import numpy as np
import pytest

from medseg_jax.cli import main
from medseg_jax.data.image_io import write_nifti
from medseg_jax.data.volume import Volume
from medseg_jax.errors import ConfigError, DataError
from medseg_jax.evaluation import COLUMNS, evaluate_folders, nnunet_summary, write_evaluation

AFFINE = np.diag([0.8, 1.2, 2.5, 1.0])
SHAPE = (6, 5, 4)
NNUNET_METRICS = {"Dice", "IoU", "FP", "TP", "FN", "TN", "n_pred", "n_ref"}


def expected_counts(prediction, reference, label):
    """nnU-Net's compute_metrics for one label, written out with numpy."""
    pred, ref = prediction == label, reference == label
    tp, fp = int(np.sum(pred & ref)), int(np.sum(pred & ~ref))
    fn, tn = int(np.sum(~pred & ref)), int(np.sum(~pred & ~ref))
    union = tp + fp + fn
    return {
        "Dice": 2 * tp / (2 * tp + fp + fn) if union else math.nan,
        "IoU": tp / union if union else math.nan,
        "TP": tp,
        "FP": fp,
        "FN": fn,
        "TN": tn,
        "n_pred": tp + fp,
        "n_ref": tp + fn,
    }


@pytest.fixture()
def folders(tmp_path):
    """Three cases: partial overlap of both labels; label 2 in neither map; label 1 missed entirely."""
    rng = np.random.default_rng(3)
    arrays = {}
    for case in ("overlap", "no_tumour", "missed"):
        reference = rng.integers(0, 3, SHAPE).astype(np.uint8)
        prediction = np.where(rng.random(SHAPE) < 0.3, rng.integers(0, 3, SHAPE), reference).astype(np.uint8)
        if case == "no_tumour":
            reference[reference == 2], prediction[prediction == 2] = 0, 0
        if case == "missed":
            prediction[prediction == 1] = 0
        arrays[case] = (prediction, reference)
        write_nifti(Volume(prediction, AFFINE), tmp_path / "pred" / f"{case}.nii.gz")
        write_nifti(Volume(reference, AFFINE), tmp_path / "ref" / f"{case}.nii.gz")
    return tmp_path / "pred", tmp_path / "ref", arrays


def test_nnunet_summary_matches_numpy_counts_and_nnunet_layout(folders, tmp_path):
    pred_dir, ref_dir, arrays = folders
    rows, summary = evaluate_folders(pred_dir, ref_dir, {"liver": 1, "tumour": 2}, progress=False)
    paths = write_evaluation(tmp_path / "eval", rows, summary, summary_format="nnunet")
    assert paths["nnunet"] == tmp_path / "eval" / "summary.json"
    text = paths["nnunet"].read_text()
    stored = json.loads(text)  # nnU-Net writes NaN as the bare token NaN, which json.loads reads back

    assert set(stored) == {"metric_per_case", "mean", "foreground_mean"}
    assert text.startswith('{\n    "foreground_mean": {\n        "Dice": ')  # sort_keys, indent 4, as nnU-Net
    assert text == json.dumps(stored, sort_keys=True, indent=4)
    assert '"Dice": NaN' in text
    cases = sorted(arrays)
    assert [entry["prediction_file"] for entry in stored["metric_per_case"]] == [
        str(pred_dir / f"{case}.nii.gz") for case in cases
    ]
    for case, entry in zip(cases, stored["metric_per_case"]):
        assert set(entry) == {"prediction_file", "reference_file", "metrics"}
        assert entry["reference_file"] == str(ref_dir / f"{case}.nii.gz")
        assert set(entry["metrics"]) == {"1", "2"}
        for key, metrics in entry["metrics"].items():
            want = expected_counts(*arrays[case], int(key))
            assert set(metrics) == NNUNET_METRICS
            assert metrics["TN"] + metrics["TP"] + metrics["FP"] + metrics["FN"] == np.prod(SHAPE)
            np.testing.assert_equal(metrics, want)  # NaN equals NaN here
    tumour_free = stored["metric_per_case"][cases.index("no_tumour")]["metrics"]["2"]
    assert math.isnan(tumour_free["Dice"]) and math.isnan(tumour_free["IoU"]) and tumour_free["TN"] == np.prod(SHAPE)
    assert stored["metric_per_case"][cases.index("missed")]["metrics"]["1"]["Dice"] == 0.0

    for key in ("1", "2"):
        for metric in NNUNET_METRICS:
            values = [expected_counts(*arrays[case], int(key))[metric] for case in cases]
            assert stored["mean"][key][metric] == pytest.approx(np.nanmean(values))
    for metric in NNUNET_METRICS:
        assert stored["foreground_mean"][metric] == pytest.approx(
            (stored["mean"]["1"][metric] + stored["mean"]["2"][metric]) / 2
        )
    # ours is kept beside it, and metrics.csv carries the same counts, TN included
    assert set(json.loads(paths["summary"].read_text())["classes"]) == {"liver", "tumour"}
    assert paths["summary"].name == "summary_medseg.json"
    with open(paths["metrics"], newline="") as f:
        written = list(csv.DictReader(f))
    assert tuple(written[0]) == COLUMNS
    for row in written:
        assert int(row["tn"]) == expected_counts(*arrays[row["case"]], int(row["label"]))["TN"]


def test_tn_of_a_class_absent_from_a_case_without_declared_labels(folders):
    """Labels found in the references: a case holding neither mask of a class still counts its TN."""
    pred_dir, ref_dir, arrays = folders
    declared, _ = evaluate_folders(pred_dir, ref_dir, {"1": 1, "2": 2}, progress=False)
    found, _ = evaluate_folders(pred_dir, ref_dir, progress=False)
    counts = [{k: row[k] for k in ("case", "label", "tp", "fp", "fn", "tn")} for row in found]
    assert counts == [{k: row[k] for k in ("case", "label", "tp", "fp", "fn", "tn")} for row in declared]
    absent = next(row for row in found if row["case"] == "no_tumour" and row["label"] == 2)
    assert (absent["tp"], absent["fp"], absent["fn"], absent["tn"]) == (0, 0, 0, int(np.prod(SHAPE)))


def rows_of(counts):
    """Rows as evaluate_folders gives them, from ``{case: {label: (tp, fp, fn, tn)}}``."""
    return [
        {
            "case": case,
            "label": label,
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "tn": tn,
            "prediction_file": f"p/{case}",
            "reference_file": f"r/{case}",
        }
        for case, per_label in counts.items()
        for label, (tp, fp, fn, tn) in per_label.items()
    ]


def test_a_label_empty_in_every_case_makes_its_mean_and_the_foreground_mean_nan():
    summary = nnunet_summary(
        rows_of({"a": {1: (3, 1, 2, 10), 4: (0, 0, 0, 16)}, "b": {1: (0, 2, 0, 14), 4: (0, 0, 0, 16)}})
    )
    assert list(summary["mean"]) == ["1", "4"]
    assert summary["mean"]["1"]["Dice"] == pytest.approx((6 / 9 + 0.0) / 2)
    assert math.isnan(summary["mean"]["4"]["Dice"]) and summary["mean"]["4"]["TN"] == 16.0
    assert math.isnan(summary["foreground_mean"]["Dice"])  # nnU-Net's plain mean over the labels' means
    assert summary["foreground_mean"]["FP"] == pytest.approx((1.5 + 0.0) / 2)


def test_incomplete_or_missing_rows_are_refused():
    with pytest.raises(DataError, match=r"cases \['b'\] lack a row"):
        nnunet_summary(rows_of({"a": {1: (1, 0, 0, 3), 2: (1, 0, 0, 3)}, "b": {1: (1, 0, 0, 3)}}))
    with pytest.raises(DataError, match="no evaluated case"):
        nnunet_summary([])


def test_cli_format_option(folders, tmp_path, capsys):
    pred_dir, ref_dir, _ = folders
    evaluate = ["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "--quiet"]
    assert main([*evaluate, "--format", "nnunet", "--out", str(tmp_path / "nnunet")]) == 0
    assert "summary_medseg.json" in capsys.readouterr().out
    assert set(json.loads((tmp_path / "nnunet" / "summary.json").read_text())) == {
        "metric_per_case",
        "mean",
        "foreground_mean",
    }
    assert main([*evaluate, "--out", str(tmp_path / "medseg")]) == 0  # the default: ours, as before
    assert sorted(p.name for p in (tmp_path / "medseg").iterdir()) == ["metrics.csv", "summary.json"]
    assert "classes" in json.loads((tmp_path / "medseg" / "summary.json").read_text())
    with pytest.raises(SystemExit) as refused:
        main([*evaluate, "--format", "nnU-Net", "--out", str(tmp_path / "bad")])
    assert refused.value.code == 2 and "--format" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="summary format"):
        write_evaluation(tmp_path / "bad", [], {}, summary_format="csv")
    assert not (tmp_path / "bad").exists()
