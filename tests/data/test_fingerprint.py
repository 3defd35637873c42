"""Fingerprint statistics, the plan rules and plan files."""

import json

import nibabel as nib
import numpy as np
import pytest

from medseg_jax.atomic import write_json_atomic
from medseg_jax.data.dataset import load_dataset, validate_dataset
from medseg_jax.data.fingerprint import case_fingerprint, compute_fingerprint, intensity_statistics
from medseg_jax.data.image_io import read_image
from medseg_jax.data.plan import make_plan, plan_differences, read_plan, stage_topology, target_spacing, write_plan
from medseg_jax.data.preprocess import nonzero_bbox
from medseg_jax.data.synthetic import write_synthetic_dataset
from medseg_jax.data.volume import Volume, to_ras
from medseg_jax.errors import ConfigError, DataError, DatasetValidationError


def _case(seed, shape=(20, 18, 10), spacing=(1.0, 1.0, 2.0)):
    rng = np.random.default_rng(seed)
    image = rng.normal(40.0, 25.0, shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[4:12, 5:13, 2:7] = 1
    label[6:9, 6:9, 3:5] = 2
    affine = np.diag([*spacing, 1.0])
    return Volume(image, affine), Volume(label, affine)


def _fingerprint(spacings, shapes, channel_names=("CT",), stats=None):
    stats = stats or {
        "mean": 50.0,
        "std": 20.0,
        "median": 48.0,
        "min": -100.0,
        "max": 300.0,
        "percentile_00_5": -80.0,
        "percentile_99_5": 250.0,
    }
    return {
        "dataset_name": "Dataset001_Test",
        "channel_names": list(channel_names),
        "labels": {"background": 0, "liver": 1, "tumour": 2},
        "spacings": [list(s) for s in spacings],
        "shapes_after_crop": [list(s) for s in shapes],
        "foreground_intensity_properties_per_channel": {str(c): dict(stats) for c in range(len(channel_names))},
    }


def test_pooled_foreground_statistics_match_numpy():
    cases = [_case(0), _case(1)]
    rng = np.random.default_rng(7)
    pooled = []
    for image, label in cases:
        record, samples = case_fingerprint([image], label, samples_per_case=100000, rng=rng)
        assert record["labels_present"] == [0, 1, 2]
        pooled.append(samples[0])
    # With more samples allowed than foreground voxels, every foreground voxel is taken.
    expected = np.concatenate([im.array[lab.array > 0].astype(np.float64) for im, lab in cases])
    stats = intensity_statistics(np.concatenate(pooled))
    assert stats["num_samples"] == expected.size == 2 * 8 * 8 * 5
    assert stats["mean"] == pytest.approx(expected.mean())
    assert stats["std"] == pytest.approx(expected.std())
    assert stats["median"] == pytest.approx(np.median(expected))
    assert stats["min"] == pytest.approx(expected.min())
    assert stats["max"] == pytest.approx(expected.max())
    assert stats["percentile_00_5"] == pytest.approx(np.percentile(expected, 0.5))
    assert stats["percentile_99_5"] == pytest.approx(np.percentile(expected, 99.5))


def test_sampling_is_capped_seeded_and_from_foreground():
    image, label = _case(3)
    _, first = case_fingerprint([image], label, samples_per_case=50, rng=np.random.default_rng([1234, 0]))
    _, again = case_fingerprint([image], label, samples_per_case=50, rng=np.random.default_rng([1234, 0]))
    foreground = set(image.array[label.array > 0].astype(np.float64).tolist())
    assert first[0].size == 50
    assert np.array_equal(first[0], again[0])
    assert set(first[0].tolist()) <= foreground
    assert np.unique(first[0]).size == 50  # without replacement


def test_crop_to_nonzero_shape_and_ct_air_rule():
    image, label = _case(4)
    masked = np.zeros_like(image.array)
    masked[3:15, 2:17, 1:9] = image.array[3:15, 2:17, 1:9] + 1000.0  # nonzero inside the box only
    record, _ = case_fingerprint([image.with_array(masked)], label, 10, np.random.default_rng(0))
    assert record["shape"] == [20, 18, 10]
    assert record["shape_after_crop"] == [12, 15, 8]
    # Raw CT: air is -1024, not 0, so nothing is cropped (nnU-Net's image != 0 rule).
    ct = np.full(image.shape, -1024.0, np.float32)
    ct[5:8, 5:8, 5:8] = 40.0
    record, _ = case_fingerprint([image.with_array(ct)], label, 10, np.random.default_rng(0))
    assert record["shape_after_crop"] == [20, 18, 10]
    # All channels count: a voxel nonzero in either channel is kept.
    a, b = np.zeros((6, 6, 6)), np.zeros((6, 6, 6))
    a[1, 2, 3], b[4, 4, 4] = 1.0, -2.0
    assert nonzero_bbox(np.stack([a, b])) == [[1, 5], [2, 5], [3, 5]]
    assert nonzero_bbox(np.zeros((1, 3, 4))) == [[0, 3], [0, 4]]


def test_fingerprint_reports_spacing_and_shape_in_ras_order():
    image, label = _case(5, shape=(20, 18, 10), spacing=(1.0, 1.0, 2.0))
    # Same grid stored as (z, y, x) with L and P flips: spacing (2, 1, 1) in file order.
    affine = np.array([[0, 0, -1.0, 19], [0, -1.0, 0, 17], [2.0, 0, 0, 0], [0, 0, 0, 1]])
    flipped = Volume(np.ascontiguousarray(image.array[::-1, ::-1, :].transpose(2, 1, 0)), affine)
    flipped_label = Volume(np.ascontiguousarray(label.array[::-1, ::-1, :].transpose(2, 1, 0)), affine)
    record, samples = case_fingerprint([flipped], flipped_label, 100000, np.random.default_rng(0))
    assert record["spacing"] == [1.0, 1.0, 2.0]
    assert record["shape"] == [20, 18, 10]
    assert np.sort(samples[0]) == pytest.approx(np.sort(image.array[label.array > 0].astype(np.float64)))


def test_target_spacing_is_median_unless_anisotropic():
    spacings = np.array([[0.8, 0.8, 1.0], [0.7, 0.7, 1.2], [0.9, 0.9, 1.1]])
    shapes = np.array([[200, 200, 150]] * 3)
    target, anisotropic = target_spacing(spacings, shapes)
    assert not anisotropic
    assert target == pytest.approx([0.8, 0.8, 1.1])
    # Thick slices (median 5 mm > 3 x 0.8 mm) and few of them: z gets its 10th percentile.
    spacings = np.array([[0.8, 0.8, 5.0], [0.7, 0.7, 3.0], [0.9, 0.9, 4.0], [0.8, 0.8, 2.5], [0.8, 0.8, 6.0]])
    shapes = np.array([[256, 256, 40]] * 5)
    target, anisotropic = target_spacing(spacings, shapes)
    assert anisotropic
    assert target[:2] == pytest.approx([0.8, 0.8])
    assert target[2] == pytest.approx(np.percentile([5.0, 3.0, 4.0, 2.5, 6.0], 10))
    # Thick spacing but as many slices as in-plane voxels: nnU-Net keeps the median.
    target, anisotropic = target_spacing(spacings, np.array([[256, 256, 256]] * 5))
    assert not anisotropic and target[2] == pytest.approx(4.0)


def test_plan_anisotropic_topology():
    fingerprint = _fingerprint([[0.8, 0.8, 4.0]] * 3, [[256, 240, 40]] * 3)
    plan = make_plan(fingerprint, dim=3, gpu_memory_gb=8.0)
    total = np.prod(np.asarray(plan["strides"]), axis=0)
    assert all(p % t == 0 for p, t in zip(plan["patch_size"], total))
    assert 2 <= plan["n_stages"] <= 6
    assert plan["batch_size"] >= 2
    assert np.prod(plan["patch_size"]) * 2 <= 2 * 128**3
    # z is 5x thicker: no pooling and kernel 1 along z on the first stages, kernel 3 later.
    assert plan["strides"][1] == [2, 2, 1] and plan["strides"][2] == [2, 2, 1]
    assert plan["kernel_sizes"][0] == [3, 3, 1] and plan["kernel_sizes"][1] == [3, 3, 1]
    assert plan["kernel_sizes"][-1] == [3, 3, 3]
    assert len(plan["kernel_sizes"]) == len(plan["strides"]) == len(plan["features_per_stage"]) == plan["n_stages"]
    assert plan["features_per_stage"][:3] == [32, 64, 128] and max(plan["features_per_stage"]) <= 320
    assert plan["target_spacing"] == pytest.approx([0.8, 0.8, 4.0])
    assert plan["num_classes"] == 3 and plan["channel_names"] == ["CT"]
    assert plan["preprocessing"] == {"crop_to_nonzero": True, "hu_window": None, "denoise": None, "clahe": None}


def test_stage_topology_minimum_feature_map_and_stage_cap():
    strides, kernels = stage_topology([1.0, 1.0, 1.0], [64, 64, 16], max_stages=6)
    # z stops at 4 voxels (16 -> 8 -> 4); x, y go on down to 4 (64 -> 4: four halvings).
    assert strides == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 1], [2, 2, 1]]
    assert kernels == [[3, 3, 3]] * 5
    strides, _ = stage_topology([1.0, 1.0], [512, 512], max_stages=7)
    assert len(strides) == 7


def test_plan_respects_memory_budget():
    fingerprint = _fingerprint([[1.0, 1.0, 1.0]] * 4, [[300, 300, 300]] * 4)
    large = make_plan(fingerprint, gpu_memory_gb=8.0)
    small = make_plan(fingerprint, gpu_memory_gb=2.0)
    assert np.prod(small["patch_size"]) < np.prod(large["patch_size"])
    assert np.prod(small["patch_size"]) * small["batch_size"] <= 2 * 128**3 * 2.0 / 8.0
    assert large["patch_size"] == [128, 128, 128] and large["batch_size"] == 2
    budget = make_plan(fingerprint, voxel_budget=2 * 64**3)
    assert budget["patch_size"] == [64, 64, 64]
    # Small volumes: the patch is the median shape (rounded up to the stride) and batches grow.
    tiny = make_plan(_fingerprint([[1.0, 1.0, 1.0]] * 200, [[40, 40, 24]] * 200))
    assert tiny["patch_size"] == [40, 40, 24] and tiny["batch_size"] > 2


def test_plan_2d_works_in_plane():
    plan = make_plan(_fingerprint([[0.8, 0.8, 4.0]] * 3, [[256, 256, 40]] * 3), dim=2)
    assert plan["dim"] == 2 and len(plan["patch_size"]) == 2
    assert plan["target_spacing"][:2] == pytest.approx([0.8, 0.8]) and plan["target_spacing"][2] is None
    assert plan["patch_size"] == [256, 256]
    assert plan["n_stages"] == 7 and max(plan["features_per_stage"]) == 512


def test_normalization_schemes_by_channel_name():
    fingerprint = _fingerprint([[1.0, 1.0, 1.0]] * 2, [[64, 64, 64]] * 2, channel_names=("ct", "T2"))
    plan = make_plan(fingerprint)
    ct, mr = plan["normalization"]
    assert ct == {
        "channel": "ct",
        "scheme": "ct",
        "mean": 50.0,
        "std": 20.0,
        "percentile_00_5": -80.0,
        "percentile_99_5": 250.0,
    }
    assert mr == {"channel": "T2", "scheme": "zscore"}
    windowed = make_plan(fingerprint, hu_window=[-175, 250])
    assert windowed["normalization"][0] == {"channel": "ct", "scheme": "hu_window", "lower": -175.0, "upper": 250.0}
    assert windowed["preprocessing"]["hu_window"] == [-175, 250]
    with pytest.raises(ConfigError, match="no channel is named CT"):
        make_plan(_fingerprint([[1.0] * 3], [[8] * 3], channel_names=("T1",)), hu_window=[-175, 250])
    with pytest.raises(ConfigError, match="denoise.sigma"):
        make_plan(fingerprint, denoise={"method": "gaussian"})
    options = make_plan(fingerprint, denoise={"method": "median", "size": 3}, clahe={"clip_limit": 0.02})
    assert options["preprocessing"]["denoise"] == {"method": "median", "size": 3}
    assert options["preprocessing"]["clahe"] == {"clip_limit": 0.02}


def test_plan_round_trip_and_missing_key(tmp_path):
    plan = make_plan(_fingerprint([[1.0, 1.0, 3.0]] * 2, [[64, 64, 20]] * 2))
    path = write_plan(plan, tmp_path / "plans.json")
    assert read_plan(path) == json.loads(json.dumps(plan)) and not plan_differences(read_plan(path), plan)
    assert [p.name for p in tmp_path.iterdir()] == ["plans.json"]  # no temporary file left
    broken = {k: v for k, v in plan.items() if k != "patch_size"}
    with pytest.raises(DataError, match=r"broken\.json: plan is missing the key\(s\) 'patch_size'"):
        write_plan(broken, tmp_path / "broken.json")  # an incomplete plan is never written
    assert not (tmp_path / "broken.json").exists()
    write_json_atomic(tmp_path / "broken.json", broken)
    with pytest.raises(DataError, match=r"broken\.json: plan is missing the key\(s\) 'patch_size'"):
        read_plan(tmp_path / "broken.json")
    assert plan_differences(broken, plan) == ["patch_size"]
    plan["normalization"][0].pop("std")
    write_json_atomic(tmp_path / "no_std.json", plan)
    with pytest.raises(DataError, match=r"no_std\.json: 'normalization\[0\]' is missing the key 'std'"):
        read_plan(tmp_path / "no_std.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match=r"bad\.json: not valid JSON"):
        read_plan(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(DataError, match=r"list\.json: expected a JSON object, found array"):
        read_plan(tmp_path / "list.json")


def _small_dataset(root, cases=2):
    return load_dataset(write_synthetic_dataset(root, num_cases=cases, seed=0, shape=(16, 16, 8)))


def _rewrite(path, change_array=None, header=None):
    """Rewrite a NIfTI file with its voxels changed by ``change_array`` or header fields set from ``header``."""
    image = nib.load(str(path))
    array = np.asarray(image.dataobj).astype(np.float32)
    if change_array is not None:
        change_array(array)
    out = nib.Nifti1Image(array, None if header else image.affine)  # with an affine, nibabel rewrites the sform
    for key, value in (header or {}).items():
        out.header[key] = value
    nib.save(out, str(path))


def test_an_infinite_voxel_is_refused_naming_the_file_before_the_plan_is_made(tmp_path):
    dataset = _small_dataset(tmp_path)
    bad = dataset.cases[1].image_paths[0]
    _rewrite(bad, lambda a: a.__setitem__((3, 4, 5), np.inf))
    validate_dataset(dataset)  # headers and labels are fine
    for workers in (1, 2):
        with pytest.raises(
            DataError,
            match=rf"case {dataset.cases[1].case_id} .*{bad.name}: image has 1 NaN or "
            r"infinite voxel\(s\) \(first at index \(3, 4, 5\)\)",
        ):
            compute_fingerprint(dataset, num_workers=workers, samples_per_case=100)


def test_plan_command_refuses_an_infinite_voxel_with_one_error_line_and_writes_nothing(tmp_path, capsys):
    from medseg_jax.cli import main

    dataset = _small_dataset(tmp_path / "raw")
    bad = dataset.cases[0].image_paths[0]
    _rewrite(bad, lambda a: a.__setitem__((0, 0, 0), -np.inf))
    assert main(["plan", str(dataset.root), "--out", str(tmp_path / "plans" / "plan.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: case ") and f"{bad}: image has 1 NaN or infinite voxel(s)" in err
    assert not (tmp_path / "plans").exists()


def test_a_degenerate_affine_is_reported_by_validation_and_fingerprinting_names_the_case(tmp_path):
    dataset = _small_dataset(tmp_path)
    case = dataset.cases[0]
    bad = case.image_paths[0]
    # an sform whose third voxel axis has zero length (qform unset): the file still loads
    _rewrite(
        bad,
        header={
            "qform_code": 0,
            "sform_code": 1,
            "srow_x": [1, 0, 0, 0],
            "srow_y": [0, 1, 0, 0],
            "srow_z": [0, 0, 0, 0],
        },
    )
    with pytest.raises(
        DatasetValidationError,
        match=rf"case {case.case_id}: image channel 0 imagesTr/{bad.name}: the "
        r"affine is degenerate: voxel axis 2 has zero length",
    ):
        validate_dataset(dataset)
    with pytest.raises(DataError, match=rf"case {case.case_id} \(.*{bad.name}, label .*\): the affine is degenerate"):
        compute_fingerprint(dataset, samples_per_case=100)


def test_an_unreadable_file_names_the_case_and_the_file(tmp_path):
    dataset = _small_dataset(tmp_path)
    bad = dataset.cases[1].label_path
    bad.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match=rf"case {dataset.cases[1].case_id} \(.*\): {bad}: not a readable NIfTI file"):
        compute_fingerprint(dataset, samples_per_case=100)


def test_compute_fingerprint_on_a_dataset_folder(tmp_path):
    dataset = load_dataset(write_synthetic_dataset(tmp_path, num_cases=3, seed=0, shape=(32, 32, 16)))
    fingerprint = compute_fingerprint(dataset, samples_per_case=500)
    assert fingerprint["dataset_name"] == dataset.name and fingerprint["num_cases"] == 3
    assert fingerprint["labels_present"] == [0, 1, 2]
    assert [c["case_id"] for c in fingerprint["cases"]] == [c.case_id for c in dataset.cases]
    # Whatever the file orientation, spacing and shapes are reported in RAS order.
    for record, case in zip(fingerprint["cases"], dataset.cases):
        ras = to_ras(read_image(case.image_paths[0]))
        assert record["spacing"] == pytest.approx(ras.spacing) and record["shape"] == list(ras.shape)
    stats = fingerprint["foreground_intensity_properties_per_channel"]["0"]
    assert stats["num_samples"] == 3 * 500
    assert stats["percentile_00_5"] < stats["median"] < stats["percentile_99_5"]
    json.dumps(fingerprint)  # JSON-able as is
    # Worker processes give the same numbers (per-case seeds do not depend on scheduling).
    assert compute_fingerprint(dataset, num_workers=2, samples_per_case=500) == fingerprint
    plan = make_plan(fingerprint)
    assert plan["normalization"][0]["scheme"] == "ct"
    assert plan["normalization"][0]["mean"] == pytest.approx(stats["mean"])
