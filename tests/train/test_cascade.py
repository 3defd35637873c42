"""nnU-Net's cascade on a tiny synthetic set: a 2-fold 3d_lowres cross-validation, the cascade store made from its
predictions, a 2-fold cascade cross-validation, and two-stage prediction.

What is checked against an independent computation: the store's extra channels are the one-hot masks of the
lowres fold's own validation prediction preprocessed as a label; the automatic two-stage ``predict`` equals
predicting the 3d_lowres runs first and giving their label maps to the cascade network by hand.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from medseg_jax.cascade import bind_previous_stage, degrade_masks, mask_channels
from medseg_jax.config import load_config
from medseg_jax.data.dataset import load_dataset
from medseg_jax.data.fingerprint import compute_fingerprint
from medseg_jax.data.image_io import read_case, read_nifti, write_nifti
from medseg_jax.data.plan import make_plan, write_plan
from medseg_jax.data.preprocess import preprocess_case, preprocess_dataset
from medseg_jax.data.splits import make_splits
from medseg_jax.data.store import CaseStore
from medseg_jax.data.synthetic import write_synthetic_dataset
from medseg_jax.data.volume import Volume
from medseg_jax.errors import ConfigError, DataError
from medseg_jax.train import cross_validation

OVERRIDES = [
    "train.steps=4",
    "train.checkpoint_every=4",
    "train.val_every=4",
    "train.log_every=2",
    "model.base_features=4",
    "data.batch_size=2",
    "data.num_workers=0",
]
# 32x32x16 phantoms with a budget whose 3d_fullres patch holds under 25% of the median image: nnU-Net's
# rule then plans 3d_lowres, and so the cascade
VOXEL_BUDGET = 4096


def cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "medseg_jax.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd
    )


@pytest.fixture(scope="module")
def cascade(tmp_path_factory):
    root = tmp_path_factory.mktemp("cascade")
    dataset = load_dataset(write_synthetic_dataset(root / "raw", 4, seed=5, shape=(32, 32, 16)))
    fingerprint = compute_fingerprint(dataset)
    lowres = make_plan(fingerprint, configuration="3d_lowres", voxel_budget=VOXEL_BUDGET)
    plan = make_plan(fingerprint, configuration="3d_cascade_fullres", voxel_budget=VOXEL_BUDGET)
    write_plan(plan, root / "plan_cascade.json")
    store = CaseStore(root / "store_lowres")
    preprocess_dataset(dataset, lowres, store, progress=False)
    store.write_json("splits.json", make_splits(store.case_ids(), n_folds=2))
    cross_validation.cross_validate(
        load_config(None, OVERRIDES), root / "store_lowres", root / "cv_lowres", progress=False
    )
    result = cli(
        "preprocess",
        dataset.root,
        "--plan",
        root / "plan_cascade.json",
        "--previous-stage",
        root / "cv_lowres",
        "--out",
        root / "store_cascade",
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    CaseStore(root / "store_cascade").write_json("splits.json", make_splits(store.case_ids(), n_folds=2))
    summary = cross_validation.cross_validate(
        load_config(None, OVERRIDES), root / "store_cascade", root / "cv_cascade", progress=False
    )
    return root, dataset, plan, summary


def test_the_cascade_is_planned_where_3d_lowres_is(cascade):
    _, dataset, plan, _ = cascade
    fingerprint = compute_fingerprint(dataset)
    fullres = make_plan(fingerprint, configuration="3d_fullres", voxel_budget=VOXEL_BUDGET)
    assert plan["previous_stage"] == {"configuration": "3d_lowres", "foreground_labels": [1, 2]}
    assert {k: v for k, v in plan.items() if k not in ("configuration", "previous_stage")} == {
        k: v for k, v in fullres.items() if k != "configuration"
    }
    with pytest.raises(ConfigError, match="no 3d_cascade_fullres without its first stage"):
        make_plan(fingerprint, configuration="3d_cascade_fullres", voxel_budget=8 * VOXEL_BUDGET)


def test_the_store_holds_the_lowres_validation_prediction_as_masks(cascade):
    root, dataset, plan, _ = cascade
    store = CaseStore(root / "store_cascade")
    recorded = store.read_plan()["previous_stage"]
    assert recorded["cross_validation"] == str((root / "cv_lowres").resolve())
    assert recorded["runs"] == [str((root / "cv_lowres" / f"fold_{k}").resolve()) for k in range(2)]
    lowres_cases = cross_validation.validation_cases(root / "cv_lowres")
    for case in dataset.cases:
        image, _ = store.read_case(case.case_id)
        assert image.shape[0] == 1 + 2  # CT, then one mask per foreground class
        properties = store.read_properties(case.case_id)
        predicted_file = lowres_cases[case.case_id][0]
        assert properties["previous_stage_file"] == str(predicted_file.resolve())
        images, _ = read_case(case.image_paths, None)
        # the lowres label map preprocessed as a label on the cascade's grid, independently
        fullres = {k: v for k, v in plan.items() if k != "previous_stage"} | {"configuration": "3d_fullres"}
        _, as_label, _ = preprocess_case(images, read_nifti(predicted_file), fullres)
        expected = np.stack([as_label == 1, as_label == 2]).astype(np.float32)
        np.testing.assert_array_equal(image[1:], expected)


def test_cascade_folds_train_on_scan_and_masks_and_validate(cascade):
    root, _, _, summary = cascade
    assert summary is not None and np.isfinite(summary["foreground_mean"]["dice"])
    config = (root / "cv_cascade" / "fold_0" / "config.yaml").read_text()
    assert "in_channels: 3" in config
    assert mask_channels(json.loads((root / "cv_cascade" / "fold_0" / "plan.json").read_text())) == 2


def test_predict_runs_the_lowres_stage_first(cascade, tmp_path):
    root, dataset, _, _ = cascade
    images = dataset.root / "imagesTr"
    cascade_runs = [root / "cv_cascade" / f"fold_{k}" for k in range(2)]
    lowres_runs = [root / "cv_lowres" / f"fold_{k}" for k in range(2)]
    result = cli("predict", "--model", *cascade_runs, "-i", images, "-o", tmp_path / "auto", "--quiet")
    assert result.returncode == 0, result.stderr
    # by hand: the lowres folds first, their label maps then given to the cascade folds
    result = cli("predict", "--model", *lowres_runs, "-i", images, "-o", tmp_path / "lowres", "--quiet")
    assert result.returncode == 0, result.stderr
    from medseg_jax.inference.model_sets import build_predictor
    from medseg_jax.inference.predict import EnsemblePredictor

    ensemble = build_predictor(cascade_runs, log=lambda message: None)
    assert isinstance(ensemble, EnsemblePredictor)
    for case in dataset.cases:
        scans, _ = read_case(case.image_paths, None)
        first_stage = read_nifti(tmp_path / "lowres" / f"{case.case_id}.nii.gz")
        prepared = [member.prepare(scans, first_stage) for member in ensemble.members]
        by_hand = ensemble.finish_case(ensemble.infer(prepared), prepared).label.array
        automatic = np.asarray(nib.load(str(tmp_path / "auto" / f"{case.case_id}.nii.gz")).dataobj)
        np.testing.assert_array_equal(automatic, by_hand)
    # nnU-Net's -prev_stage_predictions: the saved lowres label maps read instead of predicted
    saved = ["--previous-stage-predictions", tmp_path / "lowres"]
    result = cli("predict", "--model", *cascade_runs, *saved, "-i", images, "-o", tmp_path / "saved", "--quiet")
    assert result.returncode == 0, result.stderr
    for case in dataset.cases:
        name = f"{case.case_id}.nii.gz"
        read = np.asarray(nib.load(str(tmp_path / "saved" / name)).dataobj)
        np.testing.assert_array_equal(read, np.asarray(nib.load(str(tmp_path / "auto" / name)).dataobj))
    missing = sorted(dataset.cases, key=lambda c: c.case_id)[-1].case_id
    (tmp_path / "lowres" / f"{missing}.nii.gz").unlink()
    result = cli("predict", "--model", *cascade_runs, *saved, "-i", images, "-o", tmp_path / "partial", "--quiet")
    assert result.returncode != 0 and f"no 3d_lowres prediction {tmp_path / 'lowres' / missing}.nii.gz" in result.stderr
    assert not (tmp_path / "partial" / f"{missing}.nii.gz").exists()
    result = cli("predict", "--model", *lowres_runs, *saved, "-i", images, "-o", tmp_path / "other", "--quiet")
    assert result.returncode != 0 and "none of the --model runs is one" in result.stderr
    # a first-stage label map on another grid than the scan's
    first = sorted(dataset.cases, key=lambda c: c.case_id)[0].case_id
    wrong = read_nifti(tmp_path / "lowres" / f"{first}.nii.gz")
    write_nifti(Volume(wrong.array[:16], wrong.affine), tmp_path / "lowres" / f"{first}.nii.gz")
    result = cli("predict", "--model", *cascade_runs, *saved, "-i", images, "-o", tmp_path / "grid", "--quiet")
    assert result.returncode != 0 and "is not on the grid of the scan" in result.stderr
    assert not (tmp_path / "grid" / f"{first}.nii.gz").exists()


def test_find_best_compares_the_cascade_and_its_model_folder_predicts(cascade, tmp_path):
    root, dataset, _, _ = cascade
    result = cli("find-best", root / "cv_lowres", root / "cv_cascade", "--out", tmp_path / "best")
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "best" / "find_best.json").read_text())
    assert set(record["options"]) == {"cv_lowres", "cv_cascade", "cv_lowres+cv_cascade"}
    result = cli(
        "predict", "--model", tmp_path / "best" / "model", "-i", dataset.root / "imagesTr", "-o", tmp_path / "p"
    )
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "p").glob("*.nii.gz"))) == len(dataset.cases)


def test_bad_previous_stages_are_refused_before_anything_is_written(cascade, tmp_path):
    root, dataset, plan, _ = cascade
    # a cascade plan without its first stage
    result = cli("preprocess", dataset.root, "--plan", root / "plan_cascade.json", "--out", tmp_path / "s1")
    assert result.returncode != 0 and "--previous-stage CV_LOWRES" in result.stderr
    assert not (tmp_path / "s1").exists()
    # a first stage that is no 3d_lowres cross-validation: the cascade's own
    with pytest.raises(DataError, match="must be a 3d_lowres cross-validation"):
        bind_previous_stage(plan, root / "cv_cascade")
    # a plan that is no cascade
    lowres_plan = json.loads((root / "cv_lowres" / "fold_0" / "plan.json").read_text())
    write_plan(lowres_plan, tmp_path / "lowres.json")
    result = cli(
        "preprocess",
        dataset.root,
        "--plan",
        tmp_path / "lowres.json",
        "--previous-stage",
        root / "cv_lowres",
        "--out",
        tmp_path / "s2",
    )
    assert result.returncode != 0 and "is for a 3d_cascade_fullres plan" in result.stderr
    assert not (tmp_path / "s2").exists()
    # an incomplete first stage: a fold's validation missing
    import shutil

    shutil.copytree(root / "cv_lowres", tmp_path / "cv_partial")
    (tmp_path / "cv_partial" / "fold_1" / "validation" / "summary.json").unlink()
    with pytest.raises(DataError, match=r"fold\(s\) 1 of 2"):
        bind_previous_stage(plan, tmp_path / "cv_partial")
    # the cascade network cannot be exported (no first stage in the standalone predictor)
    result = cli("export", "--model", root / "cv_cascade" / "fold_0", "--out", tmp_path / "export")
    assert result.returncode != 0 and "cannot be exported" in result.stderr
    assert not (tmp_path / "export").exists()


def test_a_case_without_a_first_stage_prediction_is_refused_before_anything_is_written(cascade, tmp_path):
    root, dataset, plan, _ = cascade
    bound, predicted = bind_previous_stage(plan, root / "cv_lowres")
    missing = sorted(predicted)[0]
    del predicted[missing]
    store = CaseStore(tmp_path / "store")
    with pytest.raises(DataError, match=f"the previous stage predicted no {missing} "):
        preprocess_dataset(dataset, bound, store, progress=False, previous_stage=predicted)
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())


def test_a_mangled_or_unbound_previous_stage_is_named(cascade):
    from medseg_jax.cascade import previous_stage_runs
    from medseg_jax.data.plan import check_plan

    _, _, plan, _ = cascade
    wrong = {**plan, "previous_stage": {**plan["previous_stage"], "foreground_labels": [1]}}
    with pytest.raises(DataError, match=r"plan\.json: 'previous_stage.foreground_labels' \[1\] must be"):
        check_plan(wrong, "plan.json")
    with pytest.raises(DataError, match="'previous_stage' belongs to a 3d_cascade_fullres plan only"):
        check_plan({**plan, "configuration": "3d_fullres"}, "plan.json")
    with pytest.raises(DataError, match="a 3d_cascade_fullres plan needs 'previous_stage'"):
        check_plan({k: v for k, v in plan.items() if k != "previous_stage"}, "plan.json")
    with pytest.raises(ConfigError, match="names no 3d_lowres runs: preprocess with `--previous-stage"):
        previous_stage_runs(plan)  # planned, never bound to a cross-validation


def test_a_cascade_predictor_without_its_first_stage_says_so(cascade):
    root, dataset, _, _ = cascade
    from medseg_jax.inference.predict import Predictor
    from medseg_jax.inference.run_folder import load_run

    model, params, plan, config = load_run(root / "cv_cascade" / "fold_0")
    scans, _ = read_case(dataset.cases[0].image_paths, None)
    with pytest.raises(ConfigError, match="no 3d_lowres runs"):
        Predictor(model, params, plan, config.inference).prepare(scans)


def test_degraded_masks_follow_nnunets_operations():
    masks = np.zeros((40, 40, 20, 2), np.float32)
    masks[5:30, 5:30, 3:17, 0] = 1  # a large organ
    masks[12:16, 12:16, 8:11, 0] = 0
    masks[12:16, 12:16, 8:11, 1] = 1  # a lesion inside it
    masks[34:37, 34:37, 2:4, 1] = 1  # a second lesion
    changed = 0
    for seed in range(40):
        out = degrade_masks(np.random.default_rng(seed), masks)
        assert out.shape == masks.shape and set(np.unique(out)) <= {0.0, 1.0}
        assert not np.any(out.sum(axis=-1) > 1)  # still disjoint
        changed += not np.array_equal(out, masks)
    # P(nothing drawn) = 0.6 * 0.8; a drawn operation can leave a mask as it was (e.g. closing of a box)
    assert 10 <= changed <= 35
    # the removal alone (a draw that skips the binary operators): one small component of a mask
    for seed in range(200):
        rng = np.random.default_rng(seed)
        if rng.random() >= 0.4 and rng.random() < 0.2:
            out = degrade_masks(np.random.default_rng(seed), masks)
            lesions_left = int(out[..., 1].sum())
            assert lesions_left in (int(masks[..., 1].sum()) - 4 * 4 * 3, int(masks[..., 1].sum()) - 3 * 3 * 2)
            assert out[..., 0].sum() == masks[..., 0].sum()  # the organ covers over 15%: kept
            break
    else:
        pytest.fail("no seed drew the removal alone")


def test_dilation_and_erosion_are_with_a_ball():
    from scipy import ndimage

    from medseg_jax.cascade import _binary_operator

    rng = np.random.default_rng(0)
    mask = ndimage.binary_opening(rng.random((30, 30, 30)) > 0.6)
    for radius in (1, 2, 3):
        grid = np.indices((2 * radius + 1,) * 3) - radius
        ball = (grid**2).sum(axis=0) <= radius**2
        np.testing.assert_array_equal(_binary_operator(mask, "dilation", radius), ndimage.binary_dilation(mask, ball))
        # inside the volume (scipy's erosion also erodes from the border, the distance transform does not)
        inner = (slice(radius, -radius),) * 3
        eroded = ndimage.binary_erosion(mask, ball, border_value=1)
        np.testing.assert_array_equal(_binary_operator(mask, "erosion", radius)[inner], eroded[inner])


def test_augmentation_keeps_masks_binary_and_out_of_intensity_transforms():
    from medseg_jax.augment import AugmentConfig, augment_numpy

    rng = np.random.default_rng(0)
    image = rng.normal(size=(2, 24, 24, 3)).astype(np.float32)
    image[..., 1:] = 0
    image[:, 6:14, 6:14, 1] = 1
    image[:, 16:20, 4:9, 2] = 1
    label = np.zeros((2, 24, 24), np.int32)
    config = AugmentConfig(
        mode="cpu",
        rotation_probability=1.0,
        scale_probability=1.0,
        brightness_probability=1.0,
        noise_probability=1.0,
        gamma_probability=1.0,
    )
    out, _ = augment_numpy(np.random.default_rng(1), image, label, config, (24, 24), mask_channels=2)
    assert set(np.unique(out[..., 1:])) <= {0.0, 1.0}
    assert 0 < out[..., 1].sum() and 0 < out[..., 2].sum()
    # without the spatial transform the masks come out exactly as they went in, the scan does not
    still = dataclasses.replace(
        config, rotation_probability=0.0, scale_probability=0.0, elastic_probability=0.0, mirror_probability=0.0
    )
    out, _ = augment_numpy(np.random.default_rng(1), image, label, still, (24, 24), mask_channels=2)
    np.testing.assert_array_equal(out[..., 1:], image[..., 1:])
    assert not np.allclose(out[..., 0], image[..., 0])


def test_device_augmentation_keeps_masks_binary():
    import jax

    from medseg_jax.augment import AugmentConfig, make_augmentation

    image = np.zeros((2, 24, 24, 2), np.float32)
    image[..., 0] = np.random.default_rng(0).normal(size=(2, 24, 24))
    image[:, 6:14, 6:14, 1] = 1
    config = AugmentConfig(rotation_probability=1.0, scale_probability=1.0, gamma_probability=1.0)
    augment = make_augmentation(config, (24, 24), mask_channels=1)
    out, _ = jax.jit(augment)(jax.random.key(0), image, np.zeros((2, 24, 24), np.int32))
    masks = np.asarray(out[..., 1])
    assert set(np.unique(masks)) == {0.0, 1.0}
    assert abs(masks.sum() - image[..., 1].sum()) < 0.5 * image[..., 1].sum()  # moved, not lost
