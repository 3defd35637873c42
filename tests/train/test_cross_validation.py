"""nnU-Net's workflow on a tiny synthetic set: final validation of a fold, cross-validation, find-best.

Two 2-fold cross-validations of a tiny 2D network (4 cases, a few steps each) are the inputs; every Dice the
code reports is recomputed here with numpy from the files it wrote.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medseg_jax.config import load_config
from medseg_jax.data.dataset import load_dataset
from medseg_jax.data.fingerprint import compute_fingerprint
from medseg_jax.data.plan import make_plan
from medseg_jax.data.preprocess import preprocess_dataset
from medseg_jax.data.splits import make_splits
from medseg_jax.data.store import CaseStore
from medseg_jax.data.synthetic import write_synthetic_dataset
from medseg_jax.errors import ConfigError, DataError
from medseg_jax.find_best import find_best
from medseg_jax.train import cross_validation
from medseg_jax.train.final_validation import VALIDATION_DIR

OVERRIDES = [
    "train.steps=6",
    "train.checkpoint_every=6",
    "train.val_every=6",
    "train.log_every=3",
    "model.base_features=4",
    "data.batch_size=2",
    "data.patch_size=[32, 32]",
    "data.num_workers=0",
]
LABELS = {"liver": 1, "tumour": 2}


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    root = tmp_path_factory.mktemp("cv")
    dataset = load_dataset(write_synthetic_dataset(root / "raw", 4, seed=5, shape=(32, 32, 10)))
    plan = make_plan(compute_fingerprint(dataset), dim=2, voxel_budget=2 * 32 * 32, max_stages=3)
    store = CaseStore(root / "store", chunk_shape=(32, 32, 1))
    preprocess_dataset(dataset, plan, store, progress=False)
    store.write_json("splits.json", make_splits(store.case_ids(), n_folds=2))  # a reduced cross-validation
    summaries = {}
    for name, seed in (("cv_a", 0), ("cv_b", 1)):
        config = load_config(None, [*OVERRIDES, f"train.seed={seed}"])
        summaries[name] = cross_validation.cross_validate(config, root / "store", root / name, progress=False)
    return root, summaries


def label_array(path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj).astype(np.int64)


def dice(prediction: np.ndarray, reference: np.ndarray, value: int) -> float:
    p, r = prediction == value, reference == value
    denominator = p.sum() + r.sum()
    return float("nan") if denominator == 0 else 2.0 * float((p & r).sum()) / float(denominator)


def mean_foreground_dice(pairs) -> float:
    """nnU-Net's criterion: per class the mean over cases (NaN skipped), then the mean over classes."""
    per_class = [np.nanmean([dice(p, r, v) for p, r in pairs]) for v in LABELS.values()]
    return float(np.nanmean(per_class))


def cv_pairs(cv_dir):
    cases = cross_validation.validation_cases(cv_dir)
    return {case: (label_array(pred), label_array(ref)) for case, (pred, ref) in cases.items()}


def test_each_fold_validates_its_cases_as_predict_does(workflow):
    root, _ = workflow
    splits = json.loads((root / "store" / "splits.json").read_text())
    for fold, split in enumerate(splits):
        folder = root / "cv_a" / f"fold_{fold}" / VALIDATION_DIR
        summary = json.loads((folder / "summary.json").read_text())
        assert sorted(summary["references"]) == sorted(split["val"])
        assert set(summary["reference_source"].values()) == {"dataset"}  # the raw label files
        pairs = []
        for case in split["val"]:
            reference_file = root / "raw" / "Dataset001_SynthLiver" / "labelsTr" / f"{case}.nii.gz"
            assert summary["references"][case] == str(reference_file.resolve())
            predicted = nib.load(str(folder / f"{case}.nii.gz"))
            reference = nib.load(str(reference_file))
            assert predicted.shape == reference.shape  # on the scan's own grid
            np.testing.assert_allclose(predicted.affine, reference.affine, atol=1e-4)
            saved = np.load(folder / f"{case}.npz")
            assert saved["probabilities"].shape == (3, *reference.shape)
            predicted_labels = np.asarray(predicted.dataobj).astype(np.int64)
            np.testing.assert_array_equal(np.argmax(saved["probabilities"], axis=0), predicted_labels)
            assert json.loads(saved["labels"].item()) == {"background": 0, **LABELS}
            pairs.append((predicted_labels, label_array(reference_file)))
        assert summary["foreground_mean"]["dice"] == pytest.approx(mean_foreground_dice(pairs), abs=1e-9)


def test_a_finished_run_completes_an_interrupted_validation_only(workflow):
    root, _ = workflow
    from medseg_jax.train.loop import train

    run = root / "cv_a" / "fold_0"
    folder = run / VALIDATION_DIR
    cases = sorted(json.loads((folder / "summary.json").read_text())["references"])
    kept, lost = folder / f"{cases[0]}.nii.gz", folder / f"{cases[1]}.nii.gz"
    before = (kept.stat().st_mtime_ns, lost.read_bytes())
    (folder / "summary.json").unlink()
    lost.unlink()  # as if killed while this case was predicted
    result = train(load_config(None, OVERRIDES), root / "store", run, fold=0, progress=False)
    assert result.final_validation_dice is not None and (folder / "summary.json").is_file()
    assert kept.stat().st_mtime_ns == before[0]  # not predicted again
    assert lost.read_bytes() == before[1]  # the same checkpoint predicts the same label


def test_cross_validation_summary_covers_every_case_once(workflow):
    root, summaries = workflow
    for name in ("cv_a", "cv_b"):
        summary = json.loads((root / name / "crossval" / "summary.json").read_text())
        pairs = cv_pairs(root / name)
        assert sorted(pairs) == sorted(CaseStore(root / "store").case_ids())
        assert summary["num_cases"] == 4 and sorted(summary["folds"]) == ["0", "1"]
        assert summary["foreground_mean"]["dice"] == pytest.approx(mean_foreground_dice(pairs.values()), abs=1e-9)
        assert summaries[name]["foreground_mean"]["dice"] == summary["foreground_mean"]["dice"]


def test_a_cross_validation_folder_serves_one_experiment(workflow):
    root, _ = workflow
    other = load_config(None, [*OVERRIDES, "train.seed=7"])
    with pytest.raises(ConfigError, match=r"cv\.json: this cross-validation folder was made with another config"):
        cross_validation.cross_validate(other, root / "store", root / "cv_a", progress=False)
    with pytest.raises(ConfigError, match=r"fold\(s\) \[2\] do not exist"):
        cross_validation.cross_validate(other, root / "store", root / "cv_new", folds=[2], progress=False)


def largest_component_of(label: np.ndarray, group) -> np.ndarray:
    mask = np.isin(label, group)
    components, count = ndimage.label(mask, structure=np.ones((3,) * label.ndim))
    if count <= 1:
        return label
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    out = label.copy()
    out[mask & (components != np.argmax(sizes))] = 0
    return out


def test_find_best_chooses_the_best_option_recomputed_independently(workflow, tmp_path):
    root, _ = workflow
    out = tmp_path / "best"
    record = find_best([root / "cv_a", root / "cv_b"], out, log=lambda message: None)

    # every option recomputed from the files: the two configurations and their ensemble
    singles = {name: cv_pairs(root / name) for name in ("cv_a", "cv_b")}
    recomputed = {name: mean_foreground_dice(pairs.values()) for name, pairs in singles.items()}
    cases = cross_validation.validation_cases(root / "cv_a")
    other = cross_validation.validation_cases(root / "cv_b")
    ensemble = []
    for case, (predicted, reference) in cases.items():
        mean = (
            np.load(predicted.with_name(f"{case}.npz"))["probabilities"]
            + np.load(other[case][0].with_name(f"{case}.npz"))["probabilities"]
        ) / 2
        ensemble.append((np.argmax(mean, axis=0), label_array(reference)))
    recomputed["cv_a+cv_b"] = mean_foreground_dice(ensemble)
    assert record["options"] == pytest.approx(recomputed, abs=1e-9)
    best = max(recomputed, key=lambda name: (recomputed[name], -list(recomputed).index(name)))
    assert record["best"]["name"] == best and record["best"]["dice"] == pytest.approx(max(recomputed.values()))

    # the postprocessing follows nnU-Net's rule, recomputed on the chosen predictions
    chosen = ensemble if best == "cv_a+cv_b" else list(singles[best].values())
    steps = []
    current = chosen
    trial = [(largest_component_of(p, [1, 2]), r) for p, r in current]
    per_class = lambda pairs: [np.nanmean([dice(p, r, v) for p, r in pairs]) for v in (1, 2)]  # noqa: E731
    if mean_foreground_dice(trial) > mean_foreground_dice(current) and all(
        not a < b for a, b in zip(per_class(trial), per_class(current))
    ):
        steps.append([1, 2])
        current = trial
    for value in (1, 2):
        trial = [(largest_component_of(p, [value]), r) for p, r in current]
        if per_class(trial)[value - 1] > per_class(current)[value - 1]:
            steps.append([value])
            current = trial
    assert record["postprocessing"]["steps"] == steps
    assert record["postprocessing"]["after"]["foreground_dice"] == pytest.approx(mean_foreground_dice(current))

    model = json.loads((out / "model" / "model.json").read_text())
    members = best.split("+")
    assert model["runs"] == [str((root / m / f"fold_{k}").resolve()) for m in members for k in (0, 1)]
    assert model["postprocessing"] == steps
    assert json.loads((out / "postprocessing.json").read_text()) == {"postprocessing": steps}
    assert f"medseg-jax predict --model {(out / 'model').resolve()}" in (out / "inference_instructions.txt").read_text()


def test_predict_with_the_chosen_model_folder_averages_its_runs(workflow, tmp_path):
    root, _ = workflow
    out = tmp_path / "best"
    find_best([root / "cv_a"], out, log=lambda message: None)  # one configuration: its two folds
    model = json.loads((out / "model" / "model.json").read_text())
    image = root / "raw" / "Dataset001_SynthLiver" / "imagesTr" / "synth_000_0000.nii.gz"
    cli = [sys.executable, "-m", "medseg_jax.cli", "predict", "-i", str(image), "--quiet", "--no-mirror"]
    subprocess.run([*cli, "--model", str(out / "model"), "-o", str(tmp_path / "ens.nii.gz")], check=True)
    probabilities = []
    for index, run in enumerate(model["runs"]):
        target = tmp_path / f"run{index}" / "synth_000.nii.gz"
        subprocess.run([*cli, "--model", run, "-o", str(target), "--save-probabilities"], check=True)
        probabilities.append(np.load(target.with_name("synth_000.npz"))["probabilities"])
    expected = np.argmax(sum(probabilities) / len(probabilities), axis=0)
    for group in model["postprocessing"]:
        expected = largest_component_of(expected, group)
    np.testing.assert_array_equal(label_array(tmp_path / "ens.nii.gz"), expected)


def test_bad_cross_validations_are_refused_and_nothing_is_written(workflow, tmp_path):
    root, _ = workflow
    incomplete = tmp_path / "incomplete"
    shutil.copytree(root / "cv_a", incomplete)
    (incomplete / "fold_1" / VALIDATION_DIR / "summary.json").unlink()
    with pytest.raises(DataError, match=r"fold\(s\) 1 of 2 have no complete final validation"):
        find_best([root / "cv_b", incomplete], tmp_path / "out1", log=lambda message: None)
    with pytest.raises(DataError, match=r"fold\(s\) 1 of 2"):
        cross_validation.summarize(incomplete)

    relabelled = tmp_path / "relabelled"
    shutil.copytree(root / "cv_a", relabelled)
    record = json.loads((relabelled / "cv.json").read_text())
    record["labels"] = {"background": 0, "kidney": 1, "tumour": 2}
    (relabelled / "cv.json").write_text(json.dumps(record))
    with pytest.raises(DataError, match="same labels"):
        find_best([root / "cv_b", relabelled], tmp_path / "out2", log=lambda message: None)

    with pytest.raises(DataError, match="not a cross-validation folder"):
        find_best([root / "cv_b", root / "store"], tmp_path / "out3", log=lambda message: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["incomplete", "relabelled"]


def test_cv_and_find_best_on_the_command_line(workflow, tmp_path):
    root, _ = workflow
    cli = [sys.executable, "-m", "medseg_jax.cli"]
    summarized = subprocess.run(
        [*cli, "cv", "--out", str(root / "cv_a"), "--summarize"], capture_output=True, text=True
    )
    assert summarized.returncode == 0, summarized.stderr
    assert "cross-validation of 4 case(s): mean foreground Dice" in summarized.stdout
    missing = subprocess.run(
        [*cli, "cv", "--out", str(tmp_path / "none"), "--summarize"], capture_output=True, text=True
    )
    assert missing.returncode == 2 and "not a cross-validation folder" in missing.stderr
    chosen = subprocess.run(
        [*cli, "find-best", str(root / "cv_a"), str(root / "cv_b"), "--out", str(tmp_path / "best"), "--workers", "2"],
        capture_output=True,
        text=True,
    )
    assert chosen.returncode == 0, chosen.stderr
    assert "best: " in chosen.stdout and "medseg-jax predict --model" in chosen.stdout
    # worker processes change nothing in what is compared and chosen
    parallel = json.loads((tmp_path / "best" / "find_best.json").read_text())
    serial = find_best([root / "cv_a", root / "cv_b"], tmp_path / "serial", log=lambda message: None)
    assert parallel["options"] == serial["options"] and parallel["best"] == serial["best"]
    for key in ("steps", "before", "after", "decisions"):
        assert parallel["postprocessing"][key] == serial["postprocessing"][key]
    again = subprocess.run(
        [*cli, "find-best", str(root / "cv_a"), "--out", str(tmp_path / "best")], capture_output=True, text=True
    )
    assert again.returncode == 2 and "exists and is not an empty folder" in again.stderr
