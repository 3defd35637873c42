"""Export: a trained run as jax.export StableHLO + JSON + a standalone predictor that reproduces
``medseg-jax predict`` without medseg-jax, and the refusals of bad export folders."""

import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg_jax.cli import main
from medseg_jax.config import InferenceConfig, load_config
from medseg_jax.data.dataset import load_dataset
from medseg_jax.data.fingerprint import compute_fingerprint
from medseg_jax.data.image_io import read_image
from medseg_jax.data.plan import make_plan
from medseg_jax.data.preprocess import preprocess_case, preprocess_dataset
from medseg_jax.data.store import CaseStore
from medseg_jax.data.synthetic import write_synthetic_dataset
from medseg_jax.errors import ConfigError, DataError
from medseg_jax.inference import predict_exported as standalone
from medseg_jax.inference.export import export_predictor, load_export, portable_model
from medseg_jax.inference.predict import Predictor
from medseg_jax.models.ensemble import Ensemble
from medseg_jax.models.unet import UNet
from medseg_jax.train.loop import train
from tests.inference.test_predict import tiny_plan, untrained_params

# The implementations the export uses: trained with them, `predict` computes exactly what the export does.
PORTABLE = ["model.conv_implementation=xla", "model.upsample_implementation=matmul"]
OVERRIDES = [
    "train.steps=2",
    "train.checkpoint_every=2",
    "train.val_every=2",
    "model.base_features=4",
    "data.batch_size=1",
    *PORTABLE,
]

# Runs a script with every import of medseg_jax failing, as on a machine without the package.
WITHOUT_MEDSEG_JAX = """
import importlib.abc, runpy, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "medseg_jax" or name.startswith("medseg_jax."):
            raise ImportError(f"{name} is not installed here")

sys.meta_path.insert(0, Blocked())
try:
    import medseg_jax
except ImportError:
    pass
else:
    raise SystemExit("medseg_jax is still importable")
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_without_medseg_jax(script, *args, cwd):
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_MEDSEG_JAX, str(script), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 3D run trained for 2 steps on a tiny synthetic CT store, resampled to 12 x 12 x 20 mm."""
    root = tmp_path_factory.mktemp("export")
    dataset = load_dataset(write_synthetic_dataset(root / "raw", 5, seed=3, shape=(24, 24, 12)))
    plan = make_plan(compute_fingerprint(dataset), dim=3, voxel_budget=10 * 10 * 10, max_stages=2)
    plan["target_spacing"] = [12.0, 12.0, 20.0]  # resampled in every axis, both ways
    store = CaseStore(root / "store", chunk_shape=(16, 16, 8))
    preprocess_dataset(dataset, plan, store, progress=False)
    train(load_config(None, OVERRIDES), root / "store", root / "run", progress=False)
    scan_dir = write_synthetic_dataset(root / "test", 1, seed=9, shape=(40, 36, 20)) / "imagesTr"
    return root / "run", next(scan_dir.iterdir())


def test_exported_predictor_reproduces_predict_without_medseg_jax(trained_run, tmp_path, capsys):
    run, scan = trained_run
    export = tmp_path / "export"
    assert main(["export", "--model", str(run), "--out", str(export), "--platforms", "cpu", "cuda", "tpu"]) == 0
    assert "for cpu cuda tpu" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary folder left
    metadata = json.loads((export / "export.json").read_text())
    assert metadata["format_version"] == standalone.FORMAT_VERSION and metadata["platforms"] == ["cpu", "cuda", "tpu"]
    assert metadata["inference"]["mirror_axes"] == [0, 1, 2] and metadata["inference"]["step_size"] == 0.5
    assert metadata["function"]["input"]["shape"] == ["b", *metadata["inference"]["patch_size"], 1]
    assert metadata["plan"]["target_spacing"] == [12.0, 12.0, 20.0] and metadata["labels"]["tumour"] == 2
    assert "medseg_jax" not in (export / "predict_exported.py").read_text().replace("medseg-jax", "")

    predicted = tmp_path / "predict.nii.gz"
    assert main(["predict", "--model", str(run), "-i", str(scan), "-o", str(predicted), "--quiet"]) == 0
    result = run_without_medseg_jax(
        export / "predict_exported.py", "-i", scan, "-o", tmp_path / "exported.nii.gz", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    expected, got = nib.load(predicted), nib.load(tmp_path / "exported.nii.gz")
    expected_labels, got_labels = np.asarray(expected.dataobj), np.asarray(got.dataobj)
    assert got_labels.dtype == np.uint8 and got_labels.shape == read_image(scan).shape
    np.testing.assert_array_equal(got_labels, expected_labels)
    assert len(np.unique(expected_labels)) >= 2  # the comparison covers class boundaries
    np.testing.assert_array_equal(got.affine, expected.affine)


def test_the_artefact_loads_and_runs_in_a_fresh_process(trained_run, tmp_path):
    export = tmp_path / "export"
    assert main(["export", "--model", str(trained_run[0]), "--out", str(export), "--platforms", "cpu"]) == 0
    patch = json.loads((export / "export.json").read_text())["inference"]["patch_size"]
    windows = np.random.default_rng(0).normal(size=(3, *patch, 1)).astype(np.float32)
    np.save(tmp_path / "windows.npy", windows)
    (tmp_path / "load.py").write_text(
        "import sys, numpy as np\n"
        f"sys.path.insert(0, {str(export)!r})\n"
        "import predict_exported\n"
        f"artefact = predict_exported.load_artefact({str(export)!r})\n"
        f"logits = artefact.exported.call(artefact.parameters, np.load({str(tmp_path / 'windows.npy')!r}))\n"
        f"np.save({str(tmp_path / 'logits.npy')!r}, np.asarray(logits))\n"
    )
    result = run_without_medseg_jax(tmp_path / "load.py", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    artefact = load_export(export)  # in this process: the same function on the same windows
    np.testing.assert_array_equal(
        np.load(tmp_path / "logits.npy"), np.asarray(artefact.exported.call(artefact.parameters, windows))
    )
    assert np.load(tmp_path / "logits.npy").shape == (3, *windows.shape[1:-1], 3)


def test_bad_export_folders_and_requests_are_clear_errors(trained_run, tmp_path, capsys):
    run, scan = trained_run
    export = tmp_path / "export"
    assert main(["export", "--model", str(run), "--out", str(export), "--platforms", "cpu"]) == 0
    with pytest.raises(DataError, match=r"exported for cpu, not for tpu; export again with --platforms cpu tpu"):
        load_export(export, platform="tpu")

    older = tmp_path / "older"
    older.mkdir()
    for path in export.iterdir():
        (older / path.name).write_bytes(path.read_bytes())
    metadata = json.loads((older / "export.json").read_text())
    (older / "export.json").write_text(json.dumps({**metadata, "format_version": 0}))
    with pytest.raises(DataError, match=r"export format version 0, but this predictor reads version 1"):
        load_export(older)
    result = run_without_medseg_jax(
        older / "predict_exported.py", "-i", scan, "-o", tmp_path / "x.nii.gz", cwd=tmp_path
    )
    assert result.returncode == 2 and "error:" in result.stderr and "export format version 0" in result.stderr
    assert not (tmp_path / "x.nii.gz").exists()
    with pytest.raises(DataError, match="not an export folder"):
        load_export(tmp_path)

    capsys.readouterr()
    for argv, message in (
        (["--model", str(tmp_path / "no_run"), "--out", str(tmp_path / "a")], "not a training run folder"),
        (["--model", str(run), "--out", str(export)], "exists and is not an empty folder"),
        (["--model", str(run), "--out", str(tmp_path / "b"), "--platforms", "cpu", "metal"], "metal: choose"),
    ):
        assert main(["export", *argv]) == 2
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "older"]


def test_a_failed_export_leaves_nothing(tmp_path):
    # A plan value JSON cannot hold fails the last file written: the folder must not appear half-written.
    model = UNet(num_classes=3, spatial_dims=3, n_stages=2, features=(4, 8))
    plan = tiny_plan()
    plan["normalization"][0]["note"] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        export_predictor(model, untrained_params(model, (1, 16, 16, 8, 1)), plan, tmp_path / "out", platforms=["cpu"])
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="mirror_axes"):
        export_predictor(model, None, tiny_plan(dim=3), tmp_path / "out", InferenceConfig(mirror_axes=(3,)))


def portable_unet(dim):
    return UNet(
        num_classes=3,
        spatial_dims=dim,
        n_stages=2,
        features=(4, 8),
        conv_implementation="xla",
        upsample_implementation="matmul",
    )


def same_labels(model, params, plan, volumes, folder, inference):
    """The standalone predictor's labels equal the Predictor's. The head's bias is first moved by minus each
    class's mean blended logit on this case: a random network's arg-max is one class nearly everywhere, and
    the comparison would then cross no class boundary."""
    image = preprocess_case(volumes, None, plan)[0]
    mean = Predictor(model, params, plan, inference).logits(image).mean(axis=(1, 2, 3))
    head = {**params["params"]["head_0"], "bias": params["params"]["head_0"]["bias"] - mean}
    params = {"params": {**params["params"], "head_0": head}}
    export_predictor(model, params, plan, folder, inference, platforms=["cpu"])
    expected = Predictor(model, params, plan, inference).predict_volume(volumes).label
    got = standalone.predict_volumes(load_export(folder), [v.array for v in volumes], volumes[0].affine)
    assert np.bincount(expected.array.ravel(), minlength=3).min() > 0.05 * expected.array.size  # every class
    np.testing.assert_array_equal(got, expected.array)


def test_2d_plans_with_denoising_clahe_and_a_thick_axis_match_the_predictor(tmp_path):
    dataset = write_synthetic_dataset(tmp_path / "raw", 1, seed=4, shape=(24, 24, 8))
    plan = make_plan(compute_fingerprint(load_dataset(dataset)), dim=2)
    plan.update(
        patch_size=[16, 16], n_stages=2, strides=[[1, 1], [2, 2]], kernel_sizes=[[3, 3]] * 2, features_per_stage=[4, 8]
    )
    plan["target_spacing"] = [6.0, 6.0, None]  # slices 2.5x thicker than the pixels: resampled in-plane only
    plan["preprocessing"].update(denoise={"method": "gaussian", "sigma": 8.0}, clahe={"clip_limit": 0.02})
    model = portable_unet(2)
    scan = read_image(next((dataset / "imagesTr").iterdir()))
    params = untrained_params(model, (1, 16, 16, 1), seed=4)
    same_labels(model, params, plan, [scan], tmp_path / "export", InferenceConfig(batch_size=4))


def test_plans_imported_from_nnunet_match_the_predictor(tmp_path):
    # nnU-Net's steps: its axis order, z-score inside the non-zero mask before resampling, resizes clipped to
    # their input's range, logits (not probabilities) resampled back; with a spacing ratio above 3.
    dataset = write_synthetic_dataset(tmp_path / "raw", 1, seed=5, shape=(20, 18, 8))
    plan = tiny_plan("MR", spacing=(4.0, 4.0, 16.0), patch=(8, 16, 16))
    plan["orientation"] = {"frame": "ras", "axes": [2, 1, 0]}
    plan["target_spacing"] = [30.0, 8.0, 8.0]  # from about 25 x 21 x 21 mm
    plan["normalization"][0].update(scheme="zscore", use_mask=True)
    plan["preprocessing"]["normalize_before_resampling"] = True
    plan["resampling"].update(clip_to_input_range=True, resample_logits=True)
    model = portable_unet(3)
    scan = read_image(next((dataset / "imagesTr").iterdir()))
    params = untrained_params(model, (1, 8, 16, 16, 1), seed=3)
    same_labels(model, params, plan, [scan], tmp_path / "export", InferenceConfig(batch_size=4, mirror_axes=(1, 2)))


def test_the_standalone_predictor_imports_nothing_of_medseg_jax():
    source = Path(standalone.__file__).read_text()
    assert "import medseg_jax" not in source and "from medseg_jax" not in source


def test_the_export_holds_no_custom_call_even_where_auto_would_choose_one(tmp_path):
    # "auto" may pick the oneDNN convolution on a CPU (an XLA custom call that exists only where medseg-jax
    # built it); the export must use XLA's own operations, for every member of an ensemble too.
    from jax import export

    model = Ensemble(UNet(num_classes=3, spatial_dims=3, n_stages=2, features=(4, 8)), 2)
    portable = portable_model(model)
    assert (portable.network.conv_implementation, portable.network.upsample_implementation) == ("xla", "matmul")
    params = untrained_params(model, (1, 16, 16, 8, 1))
    export_predictor(model, params, tiny_plan(), tmp_path / "export", platforms=["cpu", "cuda"])
    exported = export.deserialize(bytearray((tmp_path / "export" / "forward.jaxexport").read_bytes()))
    calls = set(re.findall(r"stablehlo\.custom_call @(\w+)", exported.mlir_module()))
    assert calls <= {"shape_assertion"}, calls  # jax's own check of the symbolic batch size
    assert exported.platforms == ("cpu", "cuda") and str(exported.in_avals[-1].shape[0]) == "b"


def test_predict_statistics_from_the_command_line(trained_run, tmp_path):
    run, scan = trained_run
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(run), "-i", str(scan), "-o", str(out), "--quiet", "--statistics"]) == 0
    case = scan.name.replace("_0000.nii.gz", "")
    stats = json.loads((out / f"{case}.statistics.json").read_text())
    label, image = read_image(out / f"{case}.nii.gz").array, read_image(scan)
    voxel_ml = abs(np.linalg.det(image.affine[:3, :3])) / 1000  # the scan's voxel volume, from its own header
    assert stats["intensity_units"] == {"CT": "HU"} and stats["voxel_volume_ml"] == pytest.approx(voxel_ml)
    assert sum(entry["voxels"] for entry in stats["classes"].values()) == label.size
    for entry in stats["classes"].values():
        inside = label == entry["label"]
        assert entry["voxels"] == inside.sum() and entry["volume_ml"] == pytest.approx(inside.sum() * voxel_ml)
        if inside.any():
            assert entry["mean_intensity"]["CT"] == pytest.approx(image.array[inside].astype(np.float64).mean())
