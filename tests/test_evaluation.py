"""Folder-versus-folder evaluation on tiny NIfTI files."""

import csv
import json
import math

import numpy as np
import pytest

from medseg_jax.cli import main
from medseg_jax.data.image_io import write_nifti
from medseg_jax.data.volume import Volume
from medseg_jax.errors import ConfigError, DataError
from medseg_jax.evaluation import (
    COLUMNS,
    LESION_COLUMNS,
    evaluate_folders,
    evaluate_pairs,
    format_table,
    read_labels,
    write_evaluation,
)
from medseg_jax.metrics import segmentation_metrics

SPACING = (0.8, 1.2, 2.5)
AFFINE = np.diag([*SPACING, 1.0])
LABELS = {"background": 0, "liver": 1, "tumour": 2}


def make_case(rng, shape=(16, 12, 8)):
    reference = np.zeros(shape, np.uint8)
    start = rng.integers(1, 4, size=3)
    reference[start[0] : start[0] + 8, start[1] : start[1] + 6, start[2] : start[2] + 4] = 1
    reference[start[0] + 2 : start[0] + 4, start[1] + 2 : start[1] + 4, start[2] + 1 : start[2] + 3] = 2
    prediction = np.roll(reference, int(rng.integers(0, 2)), axis=0)
    return prediction, reference


@pytest.fixture()
def folders(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for case in ("case_a", "case_b", "case_c"):
        prediction, reference = make_case(rng)
        if case == "case_c":
            prediction[prediction == 2] = 1  # tumour missed: Dice 0, HD95 inf
        arrays[case] = (prediction, reference)
        write_nifti(Volume(prediction, AFFINE), tmp_path / "pred" / f"{case}.nii.gz")
        write_nifti(Volume(reference, AFFINE), tmp_path / "ref" / f"{case}.nii.gz")
    return tmp_path / "pred", tmp_path / "ref", arrays


def test_round_trip_matches_the_array_metrics(folders, tmp_path):
    pred_dir, ref_dir, arrays = folders
    rows, summary = evaluate_folders(pred_dir, ref_dir, LABELS, nsd_tolerance_mm=2.0, progress=False)
    assert [(r["case"], r["class"]) for r in rows] == [(c, n) for c in sorted(arrays) for n in ("liver", "tumour")]
    for row in rows:
        prediction, reference = arrays[row["case"]]
        want = segmentation_metrics(prediction, reference, SPACING, [row["label"]], nsd_tolerance_mm=2.0)[row["label"]]
        # the affine is stored as float32: spacing (and volumes) agree to float32 precision
        np.testing.assert_allclose([row[k] for k in want], list(want.values()), rtol=1e-6)
    tumour = summary["classes"]["tumour"]
    assert tumour["dice"]["count"] == 3 and tumour["hd95"]["count_inf"] == 1 and tumour["hd95"]["mean"] == math.inf
    dice = [r["dice"] for r in rows if r["class"] == "liver"]
    assert summary["classes"]["liver"]["dice"]["mean"] == pytest.approx(np.mean(dice))
    assert summary["classes"]["liver"]["dice"]["std"] == pytest.approx(np.std(dice))
    assert summary["conventions"]["empty"] == "nnunet" and summary["conventions"]["volume_unit"] == "mL"
    # global Dice pools the voxels: recomputed here from the masks themselves
    masks = [(arrays[c][0] == 2, arrays[c][1] == 2) for c in sorted(arrays)]
    overlap = sum(int((p & r).sum()) for p, r in masks)
    total = sum(int(p.sum() + r.sum()) for p, r in masks)
    assert tumour["dice_global"] == pytest.approx(2 * overlap / total)
    assert tumour["dice_global"] > tumour["dice"]["mean"]  # case_c's missed tumour counts by its size only

    paths = write_evaluation(tmp_path / "eval", rows, summary)
    with open(paths["metrics"], newline="") as f:
        written = list(csv.DictReader(f))
    assert tuple(written[0]) == COLUMNS and len(written) == len(rows)
    assert float(written[1]["dice"]) == pytest.approx(rows[1]["dice"])
    stored = json.loads(paths["summary"].read_text())  # strict JSON: inf as a string
    assert stored["classes"]["tumour"]["hd95"]["mean"] == "inf"
    assert stored["classes"]["tumour"]["hd95"]["std"] is None
    table = format_table(summary)
    assert "liver" in table and "tumour" in table and "nnunet" in table and "global Dice" in table
    assert f"{tumour['dice_global']:.4f}" in table


def test_labels_default_to_values_in_the_references(folders):
    pred_dir, ref_dir, arrays = folders
    prediction, reference = arrays["case_a"]
    reference = np.where(reference == 2, 1, reference).astype(np.uint8)  # no tumour in this reference
    prediction = prediction.copy()
    prediction[0, 0, 0] = 5  # a value no reference has
    write_nifti(Volume(reference, AFFINE), ref_dir / "case_a.nii.gz")
    write_nifti(Volume(prediction, AFFINE), pred_dir / "case_a.nii.gz")
    rows, summary = evaluate_folders(pred_dir, ref_dir, progress=False)
    assert sorted(summary["classes"]) == ["1", "2"]
    tumour_a = next(r for r in rows if r["case"] == "case_a" and r["label"] == 2)
    assert tumour_a["dice"] == 0.0 and tumour_a["fn"] == 0 and tumour_a["fp"] > 0  # predicted, not in reference
    monai_rows, _ = evaluate_folders(pred_dir, ref_dir, empty="monai", progress=False)
    assert math.isnan(next(r for r in monai_rows if r["case"] == "case_a" and r["label"] == 2)["dice"])


def test_worker_pool_gives_the_same_rows(folders):
    pred_dir, ref_dir, _ = folders
    serial, _ = evaluate_folders(pred_dir, ref_dir, LABELS, progress=False)
    pooled, _ = evaluate_folders(pred_dir, ref_dir, LABELS, num_workers=2, progress=False)
    np.testing.assert_equal(pooled, serial)


def test_without_distances_the_overlap_and_volumes_are_the_same(folders):
    pred_dir, ref_dir, arrays = folders
    full, _ = evaluate_folders(pred_dir, ref_dir, LABELS, progress=False)
    preds = {case: pred_dir / f"{case}.nii.gz" for case in arrays}
    refs = {case: ref_dir / f"{case}.nii.gz" for case in arrays}
    overlap, summary = evaluate_pairs(preds, refs, LABELS, progress=False, distances=False)
    kept = ("dice", "iou", "volume_ref", "volume_pred", "tp", "fp", "fn", "tn")
    np.testing.assert_equal([[r[k] for k in kept] for r in overlap], [[r[k] for k in kept] for r in full])
    assert all(math.isnan(r[k]) for r in overlap for k in ("hd95", "assd", "nsd"))
    assert summary["conventions"]["surface_distances"].startswith("not computed")


def test_missing_predictions_are_listed(folders, tmp_path):
    pred_dir, ref_dir, _ = folders
    (pred_dir / "case_a.nii.gz").unlink()
    (pred_dir / "case_c.nii.gz").unlink()
    with pytest.raises(DataError, match="2 reference case.*case_a, case_c"):
        evaluate_folders(pred_dir, ref_dir, LABELS, progress=False)


def test_geometry_mismatch_names_the_case(folders, tmp_path):
    pred_dir, ref_dir, arrays = folders
    prediction, _ = arrays["case_b"]
    write_nifti(Volume(prediction, np.diag([0.8, 1.2, 3.0, 1.0])), pred_dir / "case_b.nii.gz")
    write_nifti(Volume(prediction[:, :, :6], AFFINE), pred_dir / "case_c.nii.gz")
    with pytest.raises(DataError) as error:
        evaluate_folders(pred_dir, ref_dir, LABELS, progress=False)
    message = str(error.value)
    assert "case case_b: prediction affine" in message and "case case_c: prediction shape" in message
    assert "case_a" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred", "ref"]  # nothing written


def test_single_slice_files_are_evaluated_as_2d(tmp_path):
    reference = np.zeros((10, 10, 1), np.uint8)
    reference[2:6, 3:8, 0] = 1
    write_nifti(Volume(reference, AFFINE), tmp_path / "ref" / "x.nii.gz")
    write_nifti(Volume(reference, AFFINE), tmp_path / "pred" / "x.nii")
    rows, summary = evaluate_folders(tmp_path / "pred", tmp_path / "ref", {"a": 1}, progress=False)
    assert rows[0]["volume_ref"] == pytest.approx(20 * 0.8 * 1.2) and summary["conventions"]["volume_unit"] == "mm^2"
    assert (rows[0]["dice"], rows[0]["hd95"], rows[0]["nsd"]) == (1.0, 0.0, 1.0)


def test_read_labels_both_layouts_and_errors(tmp_path):
    nnunet, msd, bad = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    nnunet.write_text(json.dumps({"labels": LABELS}))
    msd.write_text(json.dumps({"labels": {"0": "background", "1": "liver", "2": "tumour"}}))
    bad.write_text(json.dumps({"labels": {"background": 0, "both": [1, 2]}}))
    assert read_labels(nnunet) == read_labels(msd) == {"liver": 1, "tumour": 2}
    with pytest.raises(ConfigError, match="c.json"):
        read_labels(bad)


def test_read_labels_refuses_regions_and_the_ignore_label_naming_file_and_field(tmp_path):
    regions, ignore = tmp_path / "regions.json", tmp_path / "ignore.json"
    regions.write_text(
        json.dumps({"labels": {"background": 0, "liver": 1, "tumour": 2}, "regions_class_order": [1, 2]})
    )
    ignore.write_text(json.dumps({"labels": {**LABELS, "ignore": 3}}))
    with pytest.raises(ConfigError, match=r"regions.json: field 'regions_class_order'"):
        read_labels(regions)
    with pytest.raises(ConfigError, match=r"ignore.json: field 'labels': the 'ignore' label"):
        read_labels(ignore)


def test_images_or_undeclared_values_given_as_label_maps_are_refused_naming_the_file(folders, tmp_path, capsys):
    pred_dir, ref_dir, arrays = folders
    labels_file = tmp_path / "dataset.json"
    labels_file.write_text(json.dumps({"labels": LABELS}))
    _, reference = arrays["case_b"]
    # MSD names images and labels alike: a CT image (negative HU) given as the reference
    ct = np.random.default_rng(1).integers(-1024, 1500, reference.shape).astype(np.int16)
    write_nifti(Volume(ct, AFFINE), ref_dir / "case_b.nii.gz")
    with pytest.raises(DataError, match=r"case case_b: .*ref/case_b.nii.gz is not a label map.*negative"):
        evaluate_folders(pred_dir, ref_dir, LABELS, progress=False)
    out = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                "--pred",
                str(pred_dir),
                "--ref",
                str(ref_dir),
                "--labels",
                str(labels_file),
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error:") and "case_b.nii.gz is not a label map" in err and not out.exists()

    # an image of non-negative integers (MR-like) holds values the labels do not declare
    write_nifti(Volume(np.abs(ct), AFFINE), ref_dir / "case_b.nii.gz")
    with pytest.raises(DataError, match=r"ref/case_b.nii.gz .*not declared in the labels \[0, 1, 2\].*an image"):
        evaluate_folders(pred_dir, ref_dir, LABELS, progress=False)
    write_nifti(Volume(reference, AFFINE), ref_dir / "case_b.nii.gz")

    # one undeclared value in a prediction, and a prediction of non-integer values
    prediction = arrays["case_a"][0].copy()
    prediction[0, 0, 0] = 7
    write_nifti(Volume(prediction, AFFINE), pred_dir / "case_a.nii.gz")
    with pytest.raises(DataError, match=r"pred/case_a.nii.gz .*values \[7\] not declared"):
        evaluate_folders(pred_dir, ref_dir, LABELS, progress=False)
    write_nifti(Volume(prediction.astype(np.float32) / 2, AFFINE), pred_dir / "case_a.nii.gz")
    for labels in (LABELS, None):  # non-integer values are no label map, whatever the labels
        with pytest.raises(DataError, match=r"pred/case_a.nii.gz .*non-integer"):
            evaluate_folders(pred_dir, ref_dir, labels, progress=False)


def test_lesion_detection_is_counted_per_case_and_pooled_per_class(tmp_path):
    reference = np.zeros((20, 20, 6), np.uint8)
    reference[2:5, 2:5, 2:4] = 1  # lesion A: found
    reference[12:15, 12:15, 2:4] = 1  # lesion B: missed
    prediction = np.zeros_like(reference)
    prediction[3:6, 3:6, 2:4] = 1  # overlaps A
    prediction[8:10, 16:18, 1] = 1  # touches no lesion: a false positive
    empty = np.zeros_like(reference)
    for case, (pred, ref) in {"one": (prediction, reference), "two": (empty, reference[:, ::-1].copy())}.items():
        write_nifti(Volume(pred, AFFINE), tmp_path / "pred" / f"{case}.nii.gz")
        write_nifti(Volume(ref, AFFINE), tmp_path / "ref" / f"{case}.nii.gz")
    rows, summary = evaluate_folders(tmp_path / "pred", tmp_path / "ref", {"lesion": 1}, progress=False)
    counts = {r["case"]: tuple(r[k] for k in LESION_COLUMNS) for r in rows}
    assert counts == {"one": (2, 1, 2, 1), "two": (2, 0, 0, 0)}  # reference, detected, predicted, false positive
    pooled = summary["classes"]["lesion"]["lesions"]
    assert pooled == {
        "reference_lesions": 4,
        "detected": 1,
        "predicted_lesions": 2,
        "false_positives": 1,
        "sensitivity": 0.25,
        "precision": 0.5,
    }
    assert "1/4, 1 FP" in format_table(summary)
    paths = write_evaluation(tmp_path / "eval", rows, summary)
    with open(paths["metrics"], newline="") as f:
        written = {r["case"]: r for r in csv.DictReader(f)}
    assert written["one"]["false_positive_lesions"] == "1" and written["two"]["reference_lesions"] == "2"
    assert json.loads(paths["summary"].read_text())["classes"]["lesion"]["lesions"] == pooled


def test_bad_settings_fail_before_reading_files(tmp_path):
    with pytest.raises(ConfigError, match="surface"):
        evaluate_folders(tmp_path / "nowhere", tmp_path / "nowhere", surface="mesh", progress=False)
    with pytest.raises(ConfigError, match="tolerance"):
        evaluate_folders(tmp_path / "nowhere", tmp_path / "nowhere", nsd_tolerance_mm=-1.0, progress=False)
    with pytest.raises(ConfigError, match="share a value"):
        evaluate_folders(tmp_path / "nowhere", tmp_path / "nowhere", {"a": 1, "b": 1}, progress=False)
    for bad in ("far", -1.0, 0, float("inf")):
        with pytest.raises(ConfigError, match="inf_distance"):
            evaluate_folders(tmp_path / "nowhere", tmp_path / "nowhere", inf_distance=bad, progress=False)
    with pytest.raises(DataError, match="nowhere: folder not found"):
        evaluate_folders(tmp_path / "nowhere", tmp_path / "nowhere", progress=False)


def test_inf_distances_can_be_replaced_by_a_worst_value(folders, tmp_path, capsys):
    pred_dir, ref_dir, arrays = folders
    kept, _ = evaluate_folders(pred_dir, ref_dir, LABELS, progress=False)
    fixed, summary = evaluate_folders(pred_dir, ref_dir, LABELS, inf_distance=50.0, progress=False)
    missed = [i for i, row in enumerate(kept) if row["hd95"] == math.inf]
    assert [(kept[i]["case"], kept[i]["class"]) for i in missed] == [("case_c", "tumour")]
    for i, (before, after) in enumerate(zip(kept, fixed)):
        if i in missed:
            assert after["hd95"] == after["assd"] == 50.0 and after["dice"] == before["dice"] == 0.0
        else:
            assert after == before
    tumour_hd95 = [r["hd95"] for r in fixed if r["class"] == "tumour"]
    assert summary["classes"]["tumour"]["hd95"]["mean"] == pytest.approx(np.mean(tumour_hd95))
    assert summary["conventions"]["inf_distance"] == 50.0 and "replaced by 50 mm" in format_table(summary)

    diagonal, _ = evaluate_folders(pred_dir, ref_dir, LABELS, inf_distance="diagonal", progress=False)
    shape = arrays["case_c"][1].shape
    want = math.sqrt(sum(((n - 1) * s) ** 2 for n, s in zip(shape, SPACING)))
    # the affine is stored as float32: the spacing agrees to float32 precision
    assert diagonal[missed[0]]["hd95"] == pytest.approx(want, rel=1e-6)

    evaluate = ["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "--quiet"]
    assert main([*evaluate, "--inf-distance", "373.13", "--out", str(tmp_path / "eval")]) == 0
    stored = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert stored["classes"]["2"]["hd95"]["count_inf"] == 0 and stored["conventions"]["inf_distance"] == 373.13
    assert main([*evaluate, "--inf-distance", "far", "--out", str(tmp_path / "bad")]) == 2
    assert "inf_distance" in capsys.readouterr().err and not (tmp_path / "bad").exists()
