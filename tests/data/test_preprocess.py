"""Preprocessing of cases (reorient, crop, resample, denoise, CLAHE, normalise) and its inverse."""

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from medseg_jax.data.image_io import read_image
from medseg_jax.data.intensity import clahe, denoise, normalize_channel
from medseg_jax.data.plan import make_plan
from medseg_jax.data.preprocess import preprocess_case, preprocess_dataset, restore_geometry
from medseg_jax.data.volume import Volume
from medseg_jax.errors import ConfigError, DataError


def _plan(target_spacing, channel_names=("CT",), dim=3, **options):
    stats = {
        "mean": 50.0,
        "std": 20.0,
        "median": 50.0,
        "min": -100.0,
        "max": 300.0,
        "percentile_00_5": 0.0,
        "percentile_99_5": 100.0,
    }
    fingerprint = {
        "channel_names": list(channel_names),
        "labels": {"background": 0, "organ": 1, "lesion": 2},
        "spacings": [[3.0 if t is None else t for t in target_spacing]] * 2,
        "shapes_after_crop": [[32] * len(target_spacing)] * 2,
        "foreground_intensity_properties_per_channel": {str(c): stats for c in range(len(channel_names))},
    }
    plan = make_plan(fingerprint, dim=dim, **options)
    plan["target_spacing"] = [None if t is None else float(t) for t in target_spacing]
    return plan


def _dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_normalization_values_hand_checked():
    x = np.array([-50.0, 10.0, 50.0, 100.0, 200.0], np.float32)
    ct = {"scheme": "ct", "mean": 50.0, "std": 20.0, "percentile_00_5": 0.0, "percentile_99_5": 100.0}
    # clip to [0, 100] -> [0, 10, 50, 100, 100], then (x - 50) / 20
    assert normalize_channel(x, ct) == pytest.approx([-2.5, -2.0, 0.0, 2.5, 2.5])
    window = {"scheme": "hu_window", "lower": -175.0, "upper": 250.0}
    hu = np.array([-1000.0, -175.0, 37.5, 250.0, 1000.0], np.float32)
    assert normalize_channel(hu, window) == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0])
    z = normalize_channel(np.array([1.0, 2.0, 3.0, 4.0], np.float32), {"scheme": "zscore"})
    assert z == pytest.approx(np.array([-3, -1, 1, 3]) / np.sqrt(5.0), rel=1e-6)
    assert normalize_channel(np.full(4, 7.0), {"scheme": "zscore"}) == pytest.approx([0.0] * 4)


def test_preprocess_ct_and_zscore_channels():
    rng = np.random.default_rng(0)
    ct = rng.uniform(-200.0, 300.0, (12, 10, 8)).astype(np.float32)
    mr = rng.normal(500.0, 80.0, (12, 10, 8)).astype(np.float32)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    image, label, properties = preprocess_case(
        [Volume(ct, affine), Volume(mr, affine)], None, _plan([1.0, 1.0, 1.0], channel_names=("CT", "T2"))
    )
    assert label is None and image.dtype == np.float32 and image.shape == (2, 12, 10, 8)
    assert image[0] == pytest.approx((np.clip(ct, 0.0, 100.0) - 50.0) / 20.0, abs=1e-5)
    assert image[1].mean() == pytest.approx(0.0, abs=1e-5) and image[1].std() == pytest.approx(1.0, abs=1e-4)
    assert properties["num_channels"] == 2 and properties["crop_bbox"] == [[0, 12], [0, 10], [0, 8]]


def test_resampling_spacing_2_to_1_doubles_shape():
    x, y, z = np.meshgrid(np.arange(10), np.arange(12), np.arange(8), indexing="ij")
    ramp = (1.0 + x + 2.0 * y + 3.0 * z).astype(np.float32)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [10.0, -4.0, 7.0]
    label = np.zeros((10, 12, 8), np.uint8)
    label[2:8, 3:9, 2:6] = 1
    plan = _plan([1.0, 1.0, 1.0], channel_names=("T1",))
    image, label_out, properties = preprocess_case([Volume(ramp, affine)], Volume(label, affine), plan)
    assert image.shape == (1, 20, 24, 16) and label_out.shape == (20, 24, 16)
    assert properties["shape_after_resample"] == [20, 24, 16] and properties["spacing_original"] == [2.0, 2.0, 2.0]
    # The label box doubles too, and the new grid covers the same physical extent (edges aligned).
    # Linear one-hot resampling loses only the 8 corners (weight 0.75**3 < 0.5 for the box there).
    repeated = label.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    assert (label_out != repeated).sum() == 8
    new_affine = np.asarray(properties["affine_preprocessed"])
    assert np.linalg.norm(new_affine[:3, :3], axis=0) == pytest.approx([1.0, 1.0, 1.0])
    assert new_affine @ [-0.5, -0.5, -0.5, 1] == pytest.approx(affine @ [-0.5, -0.5, -0.5, 1])
    # A linear ramp is reproduced by the spline away from the clamped border (z-scored, so compare shapes).
    fine = (
        1.0
        + (np.arange(20)[:, None, None] - 0.5) / 2
        + 2.0 * (np.arange(24)[None, :, None] - 0.5) / 2
        + 3.0 * (np.arange(16)[None, None, :] - 0.5) / 2
    )
    inner = (slice(2, -2),) * 3
    assert np.corrcoef(image[0][inner].ravel(), fine[inner].ravel())[0, 1] > 0.9999


def _blob_case(affine, shape, seed):
    """A smooth ellipsoid label (plus a smaller class 2 inside) and an image that is 0 outside a box."""
    rng = np.random.default_rng(seed)
    centre = np.asarray(shape) / 2 + rng.uniform(-1, 1, 3)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    radius_mm = 0.3 * np.asarray(shape) * spacing
    distance = np.sqrt(((((grid - centre) * spacing) / radius_mm) ** 2).sum(-1))
    label = (distance < 1.0).astype(np.uint8) + (distance < 0.6)
    image = np.zeros(shape, np.float32)
    box = tuple(slice(1, n - 1) for n in shape)
    image[box] = 20.0 + 60.0 * label[box] + rng.normal(0, 5, image[box].shape)
    return Volume(image, affine), Volume(label.astype(np.uint8), affine)


def _affines():
    lps = np.diag([-0.9, -0.9, 2.5, 1.0])
    lps[:3, 3] = [120.0, 95.0, -30.0]
    # Permuted axes (file order z, x, y), a flip and a small rotation: to_ras picks the closest orientation.
    angle = np.deg2rad(8.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    permuted = np.eye(4)
    permuted[:3, :3] = rotation @ np.array([[0, -1.1, 0], [0, 0, 1.0], [3.0, 0, 0]])
    permuted[:3, 3] = [5.0, -7.0, 11.0]
    thick = np.diag([0.8, -0.8, 4.0, 1.0])  # anisotropic: z resampled separately with order 0
    return [(lps, (40, 36, 16)), (permuted, (12, 34, 30)), (thick, (40, 38, 10))]


@pytest.mark.parametrize("index", range(3))
def test_preprocess_then_restore_geometry_is_invertible(index):
    affine, shape = _affines()[index]
    image, label = _blob_case(affine, shape, seed=index)
    plan = _plan([1.0, 1.0, 2.0], channel_names=("CT",))
    pre_image, pre_label, properties = preprocess_case([image], label, plan)
    assert pre_label.dtype == np.uint8 and pre_image.shape[1:] == pre_label.shape
    assert properties["shape_after_crop"] == [n - 2 for n in properties["ras_shape"]]
    assert properties["spacing_target"] == [1.0, 1.0, 2.0]
    restored = restore_geometry(pre_label, properties)
    assert restored.shape == label.shape
    assert np.array_equal(restored.affine, label.affine)
    for c in (1, 2):
        assert _dice(restored.array == c, label.array == c) >= 0.95
    # Probabilities: K volumes on the original grid, background 1 outside the crop box.
    probabilities = np.stack([(pre_label == c).astype(np.float32) for c in range(3)])
    per_class = restore_geometry(probabilities, properties)
    assert len(per_class) == 3 and all(v.shape == label.shape for v in per_class)
    stacked = np.stack([v.array for v in per_class])
    assert stacked.sum(0) == pytest.approx(np.ones(label.shape), abs=1e-4)
    outside = image.array == 0
    assert np.all(stacked[0][outside] == 1.0)
    assert _dice(stacked.argmax(0) == 1, label.array == 1) >= 0.95


def test_plan_2d_keeps_each_case_slice_spacing():
    affine = np.diag([0.5, 0.5, 3.0, 1.0])
    image, label = _blob_case(affine, (38, 38, 9), seed=5)
    plan = _plan([1.0, 1.0, None], dim=2)
    pre_image, pre_label, properties = preprocess_case([image], label, plan)
    assert properties["spacing_target"] == [1.0, 1.0, 3.0]
    assert pre_image.shape[1:] == (18, 18, 7)  # crop (36, 36, 7) at 0.5 mm -> 18 at 1 mm; slices kept
    assert restore_geometry(pre_label, properties).shape == (38, 38, 9)


def test_denoise_reduces_noise_on_flat_image():
    rng = np.random.default_rng(1)
    flat = (100.0 + rng.normal(0.0, 10.0, (32, 32, 16))).astype(np.float32)
    smooth = denoise(flat, {"method": "gaussian", "sigma": 2.0}, spacing=(1.0, 1.0, 2.0))
    median = denoise(flat, {"method": "median", "size": 3}, spacing=(1.0, 1.0, 2.0))
    assert smooth.std() < 0.25 * flat.std()
    assert median.std() < 0.7 * flat.std()
    assert smooth.mean() == pytest.approx(100.0, abs=0.5)
    # In-plane only (2D plans): constant slices with different values stay exactly constant.
    slices = np.broadcast_to(np.arange(16, dtype=np.float32) * 10.0, (32, 32, 16)).copy()
    kept = denoise(slices, {"method": "gaussian", "sigma": 2.0}, (1.0, 1.0, 1.0), in_plane_only=True)
    assert kept == pytest.approx(slices, abs=1e-4)
    mixed = denoise(slices, {"method": "gaussian", "sigma": 2.0}, (1.0, 1.0, 1.0))
    assert np.abs(mixed - slices).max() > 1.0


def test_clahe_increases_local_contrast_and_keeps_range():
    rng = np.random.default_rng(2)
    x, y = np.meshgrid(np.linspace(0, 1, 64), np.linspace(0, 1, 64), indexing="ij")
    # A faint texture on a slow gradient, inside a window of [-100, 300] HU.
    low = (80.0 + 40.0 * x + 4.0 * np.sin(x * 40) * np.cos(y * 35) + rng.normal(0, 0.5, x.shape)).astype(np.float32)
    out = clahe(low, {"clip_limit": 0.03, "kernel_size": 16}, window=(-100.0, 300.0))

    def local_contrast(a):
        return (a - ndimage.uniform_filter(a, 5)).std()

    assert local_contrast(out) > 2.0 * local_contrast(low)
    assert out.min() >= -100.0 and out.max() <= 300.0
    assert np.corrcoef(out.ravel(), low.ravel())[0, 1] > 0.3  # monotone-ish mapping, not noise
    # 3D: slice by slice along z, same result as the 2D call on each slice.
    volume = np.stack([low, low[::-1]], axis=-1)
    out3 = clahe(volume, {"clip_limit": 0.03, "kernel_size": 16}, window=(-100.0, 300.0))
    assert out3[..., 0] == pytest.approx(out, abs=1e-4)


def test_clahe_one_unclipped_tile_is_histogram_equalisation():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (16, 16)).astype(np.float32)
    out = clahe(image, {"clip_limit": 1.0, "kernel_size": 16, "n_bins": 256}, window=(0.0, 256.0))
    # One tile and no clipping: each pixel maps to the fraction of pixels in bins <= its own bin.
    counts = np.bincount(image.astype(int).ravel(), minlength=256)
    cdf = np.cumsum(counts) / image.size
    assert out == pytest.approx(256.0 * cdf[image.astype(int)], abs=1e-3)


def test_preprocess_applies_denoise_and_clahe_before_normalisation():
    image, label = _blob_case(np.diag([1.0, 1.0, 1.0, 1.0]), (24, 24, 12), seed=3)
    plain = _plan([1.0, 1.0, 1.0], hu_window=[-50, 150])
    enhanced = _plan(
        [1.0, 1.0, 1.0], hu_window=[-50, 150], denoise={"method": "gaussian", "sigma": 1.0}, clahe={"clip_limit": 0.02}
    )
    a, _, _ = preprocess_case([image], label, plain)
    b, _, _ = preprocess_case([image], label, enhanced)
    # Both end in the window's [0, 1]: the enhancements ran on HU, before the window mapping.
    assert 0.0 <= b.min() and b.max() <= 1.0
    assert not np.allclose(a, b)


def test_bad_inputs_raise_clear_errors():
    image, label = _blob_case(np.eye(4), (16, 16, 8), seed=4)
    plan = _plan([1.0, 1.0, 1.0])
    broken = {k: v for k, v in plan.items() if k != "normalization"}
    with pytest.raises(DataError, match="missing the key\\(s\\) 'normalization'"):
        preprocess_case([image], label, broken)
    with pytest.raises(DataError, match="2 channel volume\\(s\\) given, the plan expects 1"):
        preprocess_case([image, image], label, plan)
    bad_label = label.with_array(np.where(label.array > 0, 7, 0).astype(np.uint8))
    with pytest.raises(DataError, match="label values \\[0, 7\\] are outside 0..2"):
        preprocess_case([image], bad_label, plan)
    short = Volume(image.array[:, :, :4], image.affine)
    with pytest.raises(DataError, match="shapes differ"):
        preprocess_case([short], label, plan)
    _, pre_label, properties = preprocess_case([image], label, plan)
    with pytest.raises(DataError, match="not the preprocessed shape"):
        restore_geometry(pre_label[:-1], properties)


def _synthetic(tmp_path, num_cases=3):
    from medseg_jax.data.dataset import load_dataset
    from medseg_jax.data.synthetic import write_synthetic_dataset

    dataset = load_dataset(write_synthetic_dataset(tmp_path / "raw", num_cases=num_cases, seed=1, shape=(32, 32, 16)))
    return dataset, make_plan(_fingerprint_of(dataset))


def test_preprocess_dataset_writes_and_resumes(tmp_path):
    from medseg_jax.data.store import CaseStore

    dataset, plan = _synthetic(tmp_path)
    store = CaseStore(tmp_path / "store")
    summary = preprocess_dataset(dataset, plan, store, progress=False)
    assert summary["written"] == 3 and summary["skipped"] == 0 and summary["seconds"] >= 0
    assert sorted(store.case_ids()) == [c.case_id for c in dataset.cases]
    case = dataset.cases[1]
    properties = store.read_properties(case.case_id)
    assert properties["case_id"] == case.case_id
    assert list(store.case_shape(case.case_id)) == properties["shape_after_resample"]
    # What was stored restores onto the original label file's grid.
    label = read_image(case.label_path)
    _, stored_label = store.read_patch(case.case_id, [0, 0, 0], properties["shape_after_resample"])
    restored = restore_geometry(stored_label.astype(np.uint8), properties)
    assert restored.shape == label.shape and np.allclose(restored.affine, label.affine)
    assert _dice(restored.array == 1, label.array == 1) >= 0.95
    # an unsharded run that completes the dataset writes the store's index itself
    assert summary["indexed"] and sorted(store.read_index()["cases"]) == [c.case_id for c in dataset.cases]
    again = preprocess_dataset(dataset, plan, store, num_workers=2, progress=False)
    assert again["written"] == 0 and again["skipped"] == 3


def test_preprocess_dataset_in_workers_stops_at_a_broken_case(tmp_path):
    from medseg_jax.data.store import CaseStore

    dataset, plan = _synthetic(tmp_path)
    broken = dataset.cases[2]
    original = broken.image_paths[0].read_bytes()
    broken.image_paths[0].write_bytes(b"not a nifti file")
    store = CaseStore(tmp_path / "store")
    with pytest.raises(
        DataError,
        match=rf"case {broken.case_id} \(.*{broken.image_paths[0].name}.*\): "
        ".*not a readable NIfTI file",
    ):
        preprocess_dataset(dataset, plan, store, num_workers=2, progress=False)
    assert not store.has_case(broken.case_id)
    # the plan was recorded before the first case, so the interrupted store knows what it holds
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == sorted(
        [c.case_id for c in dataset.cases[:2]] + ["plan.json"]
    )
    assert store.read_plan() == json.loads(json.dumps(plan))

    # resuming with another plan is refused before anything is written; with the same plan it completes
    broken.image_paths[0].write_bytes(original)
    other = make_plan(_fingerprint_of(dataset), hu_window=(-100.0, 200.0))
    with pytest.raises(
        DataError,
        match=r"store/plan\.json: the store was preprocessed with another plan "
        r"\(differing in normalization, preprocessing\)",
    ):
        preprocess_dataset(dataset, other, store, progress=False)
    assert not store.has_case(broken.case_id)
    summary = preprocess_dataset(dataset, plan, store, progress=False)
    assert summary["written"] == 1 and summary["skipped"] == 2 and store.has_case(broken.case_id)


def _preprocess_command(dataset, store, *extra):
    return ["preprocess", str(dataset.root), "--plan", str(dataset.root / "plan.json"), "--out", str(store), *extra]


def _synthetic_with_plan_file(tmp_path, num_cases):
    from medseg_jax.data.plan import write_plan

    dataset, plan = _synthetic(tmp_path, num_cases=num_cases)
    write_plan(plan, dataset.root / "plan.json")
    return dataset, plan


@pytest.mark.parametrize("kind", ["file", "memory"])
def test_shards_from_the_command_line_then_finalize(tmp_path, capsys, kind):
    """Two shards preprocess disjoint halves into one store; --finalize fails naming the missing cases
    until both are done, then writes the index."""
    import uuid

    from medseg_jax.cli import main
    from medseg_jax.data.store import CaseStore

    dataset, _ = _synthetic_with_plan_file(tmp_path, num_cases=5)
    store_location = tmp_path / "store" if kind == "file" else f"memory://shards-{uuid.uuid4().hex}"
    ids = sorted(c.case_id for c in dataset.cases)
    assert main(_preprocess_command(dataset, store_location, "--shard", "1/2", "--quiet")) == 0
    out = capsys.readouterr().out
    assert "preprocessed 2 case(s)" in out and "shard 1/2: 2 of 5 case(s)" in out and "--finalize" in out
    store = CaseStore(store_location)
    assert store.case_ids() == ids[1::2] and store.read_index() is None

    assert main(_preprocess_command(dataset, store_location, "--finalize")) == 2
    error = capsys.readouterr().err
    assert f"3 of 5 case(s) not preprocessed yet: {', '.join(ids[0::2])}" in error
    assert store.read_index() is None

    assert main(_preprocess_command(dataset, store_location, "--shard", "0/2", "--quiet")) == 0
    assert "preprocessed 3 case(s), skipped 0" in capsys.readouterr().out
    # a rerun of a shard skips what it already wrote
    assert main(_preprocess_command(dataset, store_location, "--shard", "0/2", "--quiet")) == 0
    assert "preprocessed 0 case(s), skipped 3" in capsys.readouterr().out
    assert store.read_index() is None  # shards do not index: none knows when the others end

    assert main(["preprocess", str(dataset.root), "--out", str(store_location), "--finalize"]) == 0
    assert "all 5 case(s) are in" in capsys.readouterr().out
    index = CaseStore(store_location).read_index()
    assert sorted(index["cases"]) == ids and CaseStore(store_location).case_ids() == ids
    assert all(index["cases"][c]["channels"] == 1 for c in ids)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--shard", "3/2"], "0 <= INDEX < COUNT"),
        (["--shard", "2/2"], "0 <= INDEX < COUNT"),
        (["--shard", "0/0"], "COUNT >= 1"),
        (["--shard", "a/b"], "is not INDEX/COUNT"),
        (["--shard", "-1/2"], "is not INDEX/COUNT"),
        (["--shard", "1/2/3"], "is not INDEX/COUNT"),
        (["--shard", "1"], "is not INDEX/COUNT"),
    ],
)
def test_bad_shard_is_refused_before_anything_is_written(tmp_path, capsys, extra, message):
    from medseg_jax.cli import main

    dataset, _ = _synthetic_with_plan_file(tmp_path, num_cases=2)
    with pytest.raises(SystemExit) as info:
        main(_preprocess_command(dataset, tmp_path / "store", *extra))
    assert info.value.code == 2
    assert "--shard" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()


def test_finalize_and_plan_rules_of_the_command(tmp_path, capsys):
    from medseg_jax.cli import main

    dataset, _ = _synthetic_with_plan_file(tmp_path, num_cases=2)
    store = tmp_path / "store"
    assert main(_preprocess_command(dataset, store, "--shard", "0/2", "--finalize")) == 2
    assert "without --shard" in capsys.readouterr().err
    assert main(["preprocess", str(dataset.root), "--out", str(store), "--quiet"]) == 2
    assert "preprocess needs --plan" in capsys.readouterr().err
    assert main(["preprocess", str(dataset.root), "--out", str(store), "--finalize"]) == 2
    assert "the store has no plan" in capsys.readouterr().err
    assert not store.exists()
    assert main(_preprocess_command(dataset, store, "--quiet")) == 0
    capsys.readouterr()
    other = make_plan(_fingerprint_of(dataset), hu_window=(-100.0, 200.0))
    (tmp_path / "other.json").write_text(json.dumps(other))
    command = ["preprocess", str(dataset.root), "--plan", str(tmp_path / "other.json"), "--out", str(store)]
    assert main([*command, "--finalize"]) == 2
    assert "preprocessed with another plan" in capsys.readouterr().err


def test_shards_split_every_case_once_whatever_the_listing_order(tmp_path):
    from medseg_jax.data.preprocess import shard_cases

    dataset, _ = _synthetic(tmp_path, num_cases=5)
    shuffled = list(reversed(dataset.cases))
    shards = [[c.case_id for c in shard_cases(shuffled, i, 3)] for i in range(3)]
    assert sorted(sum(shards, [])) == sorted(c.case_id for c in dataset.cases)
    assert shards == [[c.case_id for c in shard_cases(dataset.cases, i, 3)] for i in range(3)]
    with pytest.raises(ConfigError, match="0 <= INDEX < COUNT"):
        shard_cases(dataset.cases, 3, 3)


def _fingerprint_of(dataset):
    from medseg_jax.data.fingerprint import compute_fingerprint

    return compute_fingerprint(dataset, samples_per_case=500)


REAL_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "real"


def test_real_mr_round_trip():
    path = REAL_DATA / "mr_small.nii.gz"
    if not path.is_file():
        pytest.skip(f"real scan {path.name} not found (expected under ../shared/data/real)")
    image = read_image(path)
    # No labels ship with the scan: a smoothed bright-tissue mask stands in for one.
    smooth = ndimage.gaussian_filter(image.array.astype(np.float32), 1.5)
    label = image.with_array((smooth > np.percentile(smooth, 75)).astype(np.uint8))
    plan = _plan([2.0, 2.0, 2.5], channel_names=("MR",))
    pre_image, pre_label, properties = preprocess_case([image], label, plan)
    assert properties["spacing_original"] == pytest.approx([3.0, 3.0, 3.0], abs=1e-3)
    assert pre_image[0].mean() == pytest.approx(0.0, abs=1e-4)
    restored = restore_geometry(pre_label, properties)
    assert restored.shape == image.shape and np.array_equal(restored.affine, image.affine)
    assert _dice(restored.array == 1, label.array == 1) >= 0.95


def test_real_ct_dicom_with_hu_window():
    folder = REAL_DATA / "ct_dicom_series"
    if not folder.is_dir():
        pytest.skip(f"real DICOM series {folder.name} not found (expected under ../shared/data/real)")
    image = read_image(folder)
    plan = _plan([3.0, 3.0, 2.0], hu_window=[-175, 250])
    pre_image, _, properties = preprocess_case([image], None, plan)
    assert pre_image.min() >= 0.0 and pre_image.max() <= 1.0
    assert 0.05 < (pre_image == 0.0).mean() < 0.95  # air clipped to 0, body inside the window
    expected = [
        round(n * s / t)
        for n, s, t in zip(properties["shape_after_crop"], properties["spacing_original"], [3.0, 3.0, 2.0])
    ]
    assert properties["shape_after_resample"] == expected
