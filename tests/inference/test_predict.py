"""Scan -> mask prediction: geometry of the output, 2D / 3D plans, postprocessing, files and bad inputs."""

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from medseg_jax.config import InferenceConfig
from medseg_jax.data.case_files import find_image_cases
from medseg_jax.data.dataset import load_dataset
from medseg_jax.data.fingerprint import compute_fingerprint
from medseg_jax.data.image_io import read_image, write_nifti
from medseg_jax.data.plan import make_plan
from medseg_jax.data.synthetic import write_synthetic_dataset
from medseg_jax.data.volume import Volume
from medseg_jax.errors import DataError
from medseg_jax.inference.predict import Predictor, predict_folder, predict_input, predict_path
from medseg_jax.models.unet import UNet

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "real"
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"real test scans not found at {REAL}")
LABELS = {"background": 0, "organ": 1, "lesion": 2}
NO_TTA = InferenceConfig(batch_size=4, mirror_axes=())


def tiny_plan(channel="MR", spacing=(2.0, 2.0, 2.0), dim=3, hu_window=None, patch=(16, 16, 8)):
    """A plan from a hand-made fingerprint, with a 2-stage topology for the tiny test networks."""
    fingerprint = {
        "channel_names": [channel],
        "labels": LABELS,
        "spacings": [list(spacing)] * 2,
        "shapes_after_crop": [[32, 32, 16]] * 2,
        "foreground_intensity_properties_per_channel": {"0": None},
    }
    plan = make_plan(fingerprint, dim=dim, hu_window=hu_window)
    plan.update(
        patch_size=list(patch[:dim]),
        n_stages=2,
        strides=[[1] * dim, [2] * dim],
        kernel_sizes=[[3] * dim] * 2,
        features_per_stage=[4, 8],
    )
    return plan


def untrained_params(model, input_shape, seed=0):
    """Random parameters of the right shapes (skips compiling ``model.init``, which is slow on CPU)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(input_shape, jnp.float32))
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.3, s.shape), s.dtype), shapes)


@pytest.fixture(scope="module")
def unet3d():
    model = UNet(num_classes=3, spatial_dims=3, n_stages=2, features=(4, 8), deep_supervision=True)
    return model, untrained_params(model, (1, 16, 16, 8, 1))


def threshold_model(ndim):
    """A per-voxel network (1x1 conv): class 1 where the normalised intensity is > 0, else class 0."""
    model = nn.Conv(3, kernel_size=(1,) * ndim)
    kernel = np.zeros((1,) * ndim + (1, 3), np.float32)
    kernel[..., 0, 1] = 10.0
    params = {"params": {"kernel": jnp.asarray(kernel), "bias": jnp.asarray([0.0, 0.0, -100.0])}}
    return model, params


def check_same_geometry(output: Volume, reference: Volume):
    assert output.shape == reference.shape
    np.testing.assert_allclose(output.affine, reference.affine, atol=1e-4)


@needs_real
def test_real_mr_prediction_lies_on_the_input_grid(unet3d, tmp_path):
    model, params = unet3d
    mr = read_image(REAL / "mr_small.nii.gz")  # 117 x 91 x 20, L-P-S voxel order, 3 mm
    predictor = Predictor(model, params, tiny_plan("MR", (6.0, 6.0, 6.0)), InferenceConfig(batch_size=4))
    label, probabilities, summary = predictor.predict_volume([mr], return_probabilities=True, case_id="mr")
    assert label.shape == mr.shape and np.array_equal(label.affine, mr.affine) and label.array.dtype == np.uint8
    stacked = np.stack([p.array for p in probabilities])
    assert stacked.shape == (3,) + mr.shape
    np.testing.assert_allclose(stacked.sum(axis=0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(label.array, np.argmax(stacked, axis=0))
    assert summary["preprocessed_shape"] == [58, 46, 10] and summary["case"] == "mr"
    for name, value in (("organ", 1), ("lesion", 2)):  # 3 mm voxels: 0.027 mL each
        assert summary["volume_ml"][name] == pytest.approx((label.array == value).sum() * 0.027)

    result = predict_path(REAL / "mr_small.nii.gz", tmp_path / "out", None, None, None, predictor=predictor)
    written = read_image(tmp_path / "out" / "mr_small.nii.gz")
    check_same_geometry(written, mr)
    np.testing.assert_array_equal(written.array, label.array)
    assert result["output"] == str(tmp_path / "out" / "mr_small.nii.gz")


@needs_real
def test_real_dicom_series_prediction_lies_on_the_series_grid(unet3d, tmp_path):
    model, params = unet3d
    plan = tiny_plan("CT", (8.0, 8.0, 4.0), hu_window=(-200.0, 300.0))  # 512 x 512 x 20 -> 62 x 62 x 10
    summary = predict_path(REAL / "ct_dicom_series", tmp_path, model, params, plan, NO_TTA, accumulate="host")
    series = read_image(REAL / "ct_dicom_series")
    written = read_image(tmp_path / "ct_dicom_series.nii.gz")
    check_same_geometry(written, series)
    assert summary["shape"] == [512, 512, 20] and summary["preprocessed_shape"] == [62, 62, 10]
    assert [p.name for p in tmp_path.iterdir()] == ["ct_dicom_series.nii.gz"]


def test_2d_and_3d_plans_reproduce_a_per_voxel_network():
    # A per-voxel network makes the sliding-window result known: softmax of the network on the whole
    # image, whatever the windows; this pins down the slice / channel axis handling of 2D plans.
    image = np.random.default_rng(0).normal(size=(1, 20, 18, 6)).astype(np.float32)
    for dim in (2, 3):
        model, params = threshold_model(dim)
        predictor = Predictor(model, params, tiny_plan(dim=dim), NO_TTA)
        got = predictor.probabilities(image)
        logits = np.asarray(model.apply(params, jnp.asarray(np.moveaxis(image, 0, -1))[None]))[0]
        expected = np.moveaxis(np.asarray(jax.nn.softmax(logits, axis=-1)), -1, 0)
        assert got.shape == (3, 20, 18, 6)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=f"{dim}D plan")


def test_2d_plan_predicts_a_folder_of_synthetic_cases_on_their_grids(tmp_path):
    dataset = write_synthetic_dataset(tmp_path, 2, shape=(40, 40, 8))
    plan = make_plan(compute_fingerprint(load_dataset(dataset)), dim=2)
    plan.update(
        patch_size=[16, 16], n_stages=2, strides=[[1, 1], [2, 2]], kernel_sizes=[[3, 3]] * 2, features_per_stage=[4, 8]
    )
    model = UNet(num_classes=3, spatial_dims=2, n_stages=2, features=(4, 8))
    params = untrained_params(model, (1, 16, 16, 1), seed=1)
    summaries = predict_input(
        dataset / "imagesTr", tmp_path / "pred", model, params, plan, InferenceConfig(batch_size=8), progress=False
    )
    assert [s["case"] for s in summaries] == ["synth_000", "synth_001"]
    for case in ("synth_000", "synth_001"):
        image = read_image(dataset / "imagesTr" / f"{case}_0000.nii.gz")  # random axial orientations
        check_same_geometry(read_image(tmp_path / "pred" / f"{case}.nii.gz"), image)


def test_largest_component_and_volumes_hand_checked(tmp_path):
    array = np.zeros((16, 14, 12), np.float32)
    array[2:6, 2:6, 2:6] = 10.0  # 64 voxels
    array[10:12, 9:11, 8:10] = 10.0  # 8 voxels, not touching the first block
    array[1:15, 1:13, 1] = 0.1  # a dim sheet below the z-score mean: background inside the crop box
    affine = np.diag([2.0, 2.0, 2.0, 1.0])  # 8 mm^3 = 0.008 mL per voxel
    model, params = threshold_model(3)
    plan = tiny_plan("MR", (2.0, 2.0, 2.0))
    for largest, organ_voxels in ((False, 72), (True, 64)):
        predictor = Predictor(model, params, plan, NO_TTA, largest_component=largest)
        label, probabilities, summary = predictor.predict_volume([Volume(array, affine)])
        assert probabilities is None
        assert (label.array == 1).sum() == organ_voxels and (label.array == 2).sum() == 0
        assert label.array[3, 3, 3] == 1 and label.array[10, 9, 8] == (0 if largest else 1)
        assert summary["volume_ml"] == pytest.approx({"organ": organ_voxels * 0.008, "lesion": 0.0})
        assert summary["largest_component"] is largest and summary["seconds"] >= 0


def _write_case(folder, name, shape=(12, 10, 8), seed=0):
    data = np.random.default_rng(seed).normal(100.0, 20.0, shape).astype(np.float32)
    return write_nifti(Volume(data, np.diag([2.0, 2.0, 2.0, 1.0])), folder / name)


def test_folder_with_wrong_channels_fails_before_writing_anything(tmp_path):
    model, params = threshold_model(3)
    plan = tiny_plan("MR")
    inputs = tmp_path / "in"
    _write_case(inputs, "a_0000.nii.gz")
    _write_case(inputs, "b_0000.nii.gz")
    _write_case(inputs, "b_0001.nii.gz")
    with pytest.raises(DataError, match=r"case b .*found channel\(s\) \['0000', '0001'\].*expects 1"):
        predict_folder(inputs, tmp_path / "out", model, params, plan, NO_TTA, progress=False)
    assert not (tmp_path / "out").exists()
    (inputs / "b_0001.nii.gz").unlink()
    _write_case(inputs, "c.nii.gz")
    with pytest.raises(DataError, match=r"c\.nii\.gz: expected nnU-Net naming"):
        find_image_cases(inputs, 1)
    with pytest.raises(DataError, match="channel volume"):
        predict_path(
            [inputs / "a_0000.nii.gz", inputs / "b_0000.nii.gz"], tmp_path / "out", model, params, plan, NO_TTA
        )
    assert not (tmp_path / "out").exists()


def test_corrupted_files_raise_data_errors_and_leave_no_partial_output(tmp_path):
    model, params = threshold_model(3)
    plan = tiny_plan("MR")
    inputs, out = tmp_path / "in", tmp_path / "out"
    _write_case(inputs, "a_0000.nii.gz")
    (inputs / "b_0000.nii.gz").write_bytes(b"not a nifti file at all")
    with pytest.raises(DataError, match="case b.*b_0000.nii.gz"):
        predict_folder(inputs, out, model, params, plan, NO_TTA, progress=False)
    assert not out.exists()  # the header check runs before any prediction

    # a readable header with a truncated voxel stream is found only when the case is read
    good = _write_case(inputs, "b_0000.nii.gz", shape=(40, 40, 30), seed=1).read_bytes()
    (inputs / "b_0000.nii.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="case b"):
        predict_folder(inputs, out, model, params, plan, NO_TTA, save_probabilities=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "a.npz"]  # a complete, b absent, no temp files
    label = nib.load(str(out / "a.nii.gz"))
    saved = np.load(out / "a.npz")
    assert label.shape == (12, 10, 8) and saved["probabilities"].shape == (3, 12, 10, 8)
    np.testing.assert_array_equal(np.argmax(saved["probabilities"], axis=0), np.asarray(label.dataobj))
    np.testing.assert_allclose(saved["affine"], label.affine, atol=1e-5)


def test_an_output_that_would_replace_an_input_scan_is_refused_before_any_work(tmp_path):
    model, params = threshold_model(3)
    plan = tiny_plan("MR")
    inputs = tmp_path / "in"
    scan = _write_case(inputs, "scan.nii.gz")
    original = scan.read_bytes()
    (tmp_path / "link").symlink_to(inputs, target_is_directory=True)
    for output in (
        scan,
        inputs / ".." / "in" / "scan.nii.gz",
        tmp_path / "link" / "scan.nii.gz",
        inputs,
        tmp_path / "link",
    ):  # the file, spelled three ways; its folder (the mask's name is scan)
        with pytest.raises(DataError, match=r"would replace the input scan .*scan\.nii\.gz"):
            predict_input(scan, output, model, params, plan, NO_TTA, progress=False)
    # a symbolic link as the input: its target is protected as well
    linked = tmp_path / "linked.nii.gz"
    linked.symlink_to(scan)
    with pytest.raises(DataError, match="would replace the input scan"):
        predict_path(linked, scan, model, params, plan, NO_TTA)
    # a folder predicted into itself: case "x_0000" (file x_0000_0000) would write x_0000.nii.gz, case x's scan
    folder = tmp_path / "cases"
    _write_case(folder, "x_0000.nii.gz")
    _write_case(folder, "x_0000_0000.nii.gz", seed=1)
    before = sorted((p.name, p.read_bytes()) for p in folder.iterdir())
    with pytest.raises(DataError, match=r"x_0000\.nii\.gz: writing the prediction there would replace"):
        predict_input(folder, folder, model, params, plan, NO_TTA, progress=False)
    assert sorted((p.name, p.read_bytes()) for p in folder.iterdir()) == before
    assert scan.read_bytes() == original and sorted(p.name for p in inputs.iterdir()) == ["scan.nii.gz"]
    # into another folder both cases are predicted
    summaries = predict_input(folder, tmp_path / "out", model, params, plan, NO_TTA, progress=False)
    assert [s["case"] for s in summaries] == ["x", "x_0000"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x.nii.gz", "x_0000.nii.gz"]


def test_probabilities_for_a_mask_file_without_a_name_are_refused_and_nothing_is_written(tmp_path):
    model, params = threshold_model(3)
    scan = _write_case(tmp_path / "in", "scan.nii.gz")
    output = tmp_path / "out" / ".nii.gz"
    with pytest.raises(DataError, match=r"out/\.nii\.gz: the mask file needs a name before"):
        predict_path(scan, output, model, params, tiny_plan("MR"), NO_TTA, save_probabilities=True)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_folder_of_scans_needs_an_output_folder(tmp_path):
    model, params = threshold_model(3)
    _write_case(tmp_path / "in", "a_0000.nii.gz")
    with pytest.raises(DataError, match=r"mask\.nii\.gz: names one NIfTI file, but .*in is a folder"):
        predict_input(tmp_path / "in", tmp_path / "mask.nii.gz", model, params, tiny_plan("MR"), NO_TTA)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_a_scan_with_nan_voxels_is_refused_naming_the_file_and_the_count(tmp_path):
    model, params = threshold_model(3)
    plan = tiny_plan("MR")
    data = np.random.default_rng(0).normal(100.0, 20.0, (12, 10, 8)).astype(np.float32)
    data[1, 2, 3] = data[4, 5, 6] = data[7, 8, 1] = np.nan
    scan = write_nifti(Volume(data, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "in" / "nan_0000.nii.gz")
    with pytest.raises(DataError, match=r"case nan .*nan_0000\.nii\.gz: scan has 3 NaN or infinite voxel"):
        predict_input(scan.parent, tmp_path / "out", model, params, plan, NO_TTA, progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataError, match="3 NaN or infinite"):  # the in-memory API refuses them too
        Predictor(model, params, plan, NO_TTA).predict_volume([Volume(data, np.eye(4))])


def test_a_folder_pipeline_writes_what_the_cases_one_by_one_write(tmp_path, monkeypatch):
    import threading

    from medseg_jax.inference import predict as predict_module

    model, params = threshold_model(3)
    plan = tiny_plan("MR")
    inputs = tmp_path / "in"
    for index in range(4):  # different shapes: each case is its own sliding window
        _write_case(inputs, f"c{index}_0000.nii.gz", shape=(12 + 2 * index, 10, 8), seed=index)
    threads: dict[str, set[str]] = {"read": set(), "write": set()}
    for stage, name in (("read", "_read_case"), ("write", "_write_case")):
        original = getattr(predict_module, name)

        def recorded(*args, _original=original, _stage=stage):
            threads[_stage].add(threading.current_thread().name)
            return _original(*args)

        monkeypatch.setattr(predict_module, name, recorded)
    options = dict(save_probabilities=True, statistics=True, progress=False)
    piped = predict_folder(inputs, tmp_path / "piped", model, params, plan, NO_TTA, **options)
    assert all(name.startswith("medseg-read") for name in threads["read"]), threads
    assert all(name.startswith("medseg-write") for name in threads["write"]), threads
    threads = {"read": set(), "write": set()}
    serial = predict_folder(inputs, tmp_path / "serial", model, params, plan, NO_TTA, pipeline=False, **options)
    assert threads["read"] == threads["write"] == {threading.current_thread().name}
    assert [s["case"] for s in piped] == [s["case"] for s in serial] == ["c0", "c1", "c2", "c3"]
    for summary in piped:  # each stage's time is reported (rounded to ms: a tiny case's device time may be 0.0)
        stages = ("read_seconds", "device_seconds", "write_seconds")
        assert all(isinstance(summary[k], float) and summary[k] >= 0 for k in stages)
    names = sorted(p.name for p in (tmp_path / "piped").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "serial").iterdir()) and len(names) == 12
    for case in ("c0", "c1", "c2", "c3"):
        labels = [np.asarray(nib.load(str(tmp_path / d / f"{case}.nii.gz")).dataobj) for d in ("piped", "serial")]
        np.testing.assert_array_equal(*labels)
        assert labels[0].shape == (12 + 2 * int(case[1]), 10, 8) and labels[0].any()
        probabilities = [np.load(tmp_path / d / f"{case}.npz")["probabilities"] for d in ("piped", "serial")]
        np.testing.assert_array_equal(*probabilities)
        statistics = [(tmp_path / d / f"{case}.statistics.json").read_text() for d in ("piped", "serial")]
        assert statistics[0] == statistics[1]


def test_a_failing_case_in_the_pipeline_stops_it_after_the_cases_before_are_written(tmp_path):
    model, params = threshold_model(3)
    plan = tiny_plan("MR")
    inputs, out = tmp_path / "in", tmp_path / "out"
    for name in ("a", "b", "c", "d"):
        _write_case(inputs, f"{name}_0000.nii.gz", shape=(40, 40, 30), seed=ord(name))
    good = (inputs / "c_0000.nii.gz").read_bytes()
    (inputs / "c_0000.nii.gz").write_bytes(good[: len(good) // 2])  # found only when c is read
    with pytest.raises(DataError, match="case c"):
        predict_folder(inputs, out, model, params, plan, NO_TTA, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "b.nii.gz"]  # complete; c, d absent
    for name in ("a", "b"):
        assert nib.load(str(out / f"{name}.nii.gz")).shape == (40, 40, 30)

    # a case that cannot be written (its label path is a folder): the cases after it are not written
    (inputs / "c_0000.nii.gz").write_bytes(good)
    out2 = tmp_path / "out2"
    (out2 / "b.nii.gz").mkdir(parents=True)
    with pytest.raises(DataError, match=r"b\.nii\.gz: could not write NIfTI file"):
        predict_folder(inputs, out2, model, params, plan, NO_TTA, progress=False)
    assert sorted(p.name for p in out2.iterdir()) == ["a.nii.gz", "b.nii.gz"]
    assert (out2 / "b.nii.gz").is_dir() and not any((out2 / "b.nii.gz").iterdir())


def test_an_ensemble_averages_its_members_probabilities_on_the_scan_grid(tmp_path):
    from medseg_jax.inference.predict import EnsemblePredictor

    model, params = threshold_model(3)
    scan = _write_case(tmp_path / "in", "scan.nii.gz", shape=(20, 18, 10), seed=3)
    coarse, fine = tiny_plan("MR", spacing=(4.0, 4.0, 4.0)), tiny_plan("MR")  # two grids: resampled differently
    members = [Predictor(model, params, plan, NO_TTA) for plan in (coarse, fine)]
    separate = [
        predict_path(scan, tmp_path / f"m{i}", None, None, None, predictor=m, save_probabilities=True)
        for i, m in enumerate(members)
    ]
    probabilities = [np.load(tmp_path / f"m{i}" / "scan.npz")["probabilities"] for i in range(2)]
    assert not np.allclose(probabilities[0], probabilities[1])  # the members really differ
    ensemble = EnsemblePredictor(members, largest_component=True)
    summary = predict_path(scan, tmp_path / "ens", None, None, None, predictor=ensemble, save_probabilities=True)
    mean = (probabilities[0] + probabilities[1]) / 2
    np.testing.assert_allclose(np.load(tmp_path / "ens" / "scan.npz")["probabilities"], mean, atol=1e-6)
    from medseg_jax.postprocess import keep_largest_component

    expected = keep_largest_component(np.argmax(mean, axis=0))
    np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / "ens" / "scan.nii.gz")).dataobj), expected)
    assert summary["shape"] == separate[0]["shape"] == [20, 18, 10]

    other_labels = {**tiny_plan("MR"), "labels": {"background": 0, "kidney": 1, "cyst": 2}}
    with pytest.raises(DataError, match="an ensemble averages the same classes"):
        EnsemblePredictor([members[0], Predictor(model, params, other_labels, NO_TTA)])
