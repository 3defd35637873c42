"""``medseg-jax import-nnunet`` end to end on small model folders written without torch: the run folder
predicts, fold ensembles average logits, and bad inputs fail clearly with nothing written."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medseg_jax.cli import main
from medseg_jax.config import InferenceConfig
from medseg_jax.data.image_io import read_image, write_nifti
from medseg_jax.data.volume import Volume
from medseg_jax.errors import ConfigError
from medseg_jax.inference.predict import Predictor
from medseg_jax.inference.run_folder import load_run
from medseg_jax.nnunet.architecture import architecture
from tests.nnunet.model_folder import arch_kwargs, plans, write_model_folder

PATCH = [16, 16, 16]
SPACING = [2.0, 1.0, 1.0]


def _folder(tmp_path, encoder="plain", folds=(0,), mirror_axes=(0, 1, 2)):
    kwargs = arch_kwargs(3, encoder)
    config = plans("3d_fullres", kwargs, encoder, PATCH, SPACING)["configurations"]["3d_fullres"]
    arch = architecture(config, "plans")
    return write_model_folder(tmp_path / "results", arch, kwargs, "3d_fullres", PATCH, SPACING, folds, mirror_axes)


def _image(tmp_path) -> str:
    rng = np.random.default_rng(3)
    array = np.zeros((20, 18, 9), np.float32)  # file voxels (x, y, z), z spacing 2 mm
    array[2:18, 1:17, 1:8] = rng.uniform(-200, 300, size=(16, 16, 7))
    path = tmp_path / "case_0000.nii.gz"
    write_nifti(Volume(array, np.diag([-1.0, -1.0, 2.0, 1.0])), path, dtype=np.float32)
    return str(path)


def _import(folder, out, *extra) -> int:
    return main(["import-nnunet", str(folder), "--out", str(out), *extra])


def test_imported_model_predicts_through_the_cli(tmp_path, capsys):
    folder = _folder(tmp_path, encoder="residual")
    run_dir = tmp_path / "run"
    assert _import(folder, run_dir) == 0
    assert "3D 3d_fullres, folds 0, checkpoint_final.pth" in capsys.readouterr().out
    source = json.loads((run_dir / "nnunet_import.json").read_text())
    assert source["trainer"] == "nnUNetTrainer" and source["folds"] == ["0"]
    image = _image(tmp_path)
    output = tmp_path / "pred.nii.gz"
    assert main(["predict", "--model", str(run_dir), "-i", image, "-o", str(output), "--quiet"]) == 0
    label = read_image(output)
    source_image = read_image(image)
    assert label.shape == source_image.shape
    np.testing.assert_array_equal(label.affine, source_image.affine)
    assert set(np.unique(label.array)) <= {0, 1, 2}


def test_fold_ensemble_averages_the_folds_logits(tmp_path):
    folder = _folder(tmp_path, folds=(0, 1), mirror_axes=None)
    runs = {}
    for name, folds in (("both", ["0", "1"]), ("f0", ["0"]), ("f1", ["1"])):
        assert _import(folder, tmp_path / name, "--folds", *folds) == 0
        runs[name] = load_run(tmp_path / name)
    model, params, plan, config = runs["both"]
    assert config.model.ensemble == 2 and config.inference.mirror_axes == ()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, *PATCH, 1)), jnp.float32)
    single = [run[0].apply(run[1], x) for run in (runs["f0"], runs["f1"])]
    np.testing.assert_allclose(model.apply(params, x), (single[0] + single[1]) / 2, rtol=1e-5, atol=1e-5)
    image = np.random.default_rng(1).normal(size=(1, 20, 16, 16)).astype(np.float32)
    predictors = [Predictor(m, p, pl, InferenceConfig(mirror_axes=())) for m, p, pl, _ in runs.values()]
    logits = [predictor.logits(image) for predictor in predictors]
    np.testing.assert_allclose(logits[0], (logits[1] + logits[2]) / 2, rtol=1e-4, atol=1e-5)


def test_ensembles_are_for_prediction_not_training(tmp_path):
    from medseg_jax.train.setup import resolve_model

    folder = _folder(tmp_path, folds=(0, 1))
    assert _import(folder, tmp_path / "run") == 0
    config = load_run(tmp_path / "run")[3]
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    with pytest.raises(ConfigError, match="model.ensemble: 2 networks"):
        resolve_model(config.model, plan)


def _expect_failure(capsys, code, out, *messages):
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    for message in messages:
        assert message in err, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")]


def test_bad_model_folders_fail_clearly_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    empty = tmp_path / "empty"
    empty.mkdir()
    _expect_failure(capsys, _import(empty, out), out, "not an nnU-Net v2 trained-model folder", "plans.json")

    folder = _folder(tmp_path)
    _expect_failure(capsys, _import(folder, out, "--folds", "3"), out, "fold_3/checkpoint_final.pth", "missing fold")
    _expect_failure(capsys, _import(folder, out, "--checkpoint", "best"), out, "no fold_X/checkpoint_best.pth")

    plans_path = folder / "plans.json"
    good_plans = plans_path.read_text()
    unknown = json.loads(good_plans)
    unknown["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "my_networks.MambaUNet"
    plans_path.write_text(json.dumps(unknown))
    _expect_failure(capsys, _import(folder, out), out, "network_class_name", "my_networks.MambaUNet")

    other = json.loads(good_plans)
    other["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] = [4, 8, 16]
    plans_path.write_text(json.dumps(other))
    _expect_failure(
        capsys, _import(folder, out), out, "encoder.stages.2.0.convs.0.conv.weight has shape [8, 8, 3, 3, 3]"
    )
    plans_path.write_text(good_plans)

    checkpoint = folder / "fold_0" / "checkpoint_final.pth"
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) - 100])
    _expect_failure(capsys, _import(folder, out), out, str(checkpoint), "truncated or damaged")
    checkpoint.write_bytes(data)

    out.mkdir()
    (out / "keep.txt").write_text("user file")
    assert _import(folder, out) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_jax_sees_the_same_parameters_orbax_restored(tmp_path):
    """The run folder's checkpoint restores to exactly the converted weights."""
    from medseg_jax.nnunet.importer import build_run

    folder = _folder(tmp_path)
    assert _import(folder, tmp_path / "run") == 0
    _, restored, _, _ = load_run(tmp_path / "run")
    _, _, converted, _ = build_run(folder)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(converted)):
        np.testing.assert_array_equal(np.asarray(a), b)
