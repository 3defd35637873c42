import json
import pickle

import numpy as np
import pytest
import tensorstore as ts

from medseg_jax.data.store import CaseStore, compute_class_locations
from medseg_jax.errors import DataError

HEX32 = "0123456789abcdef" * 2


def make_case(shape=(20, 18, 12), channels=2, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(channels, *shape)).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[3:9, 4:10, 2:6] = 1
    label[12:14, 5:7, 7:9] = 2
    return image, label


def test_round_trip_3d_multichannel(tmp_path):
    store = CaseStore(tmp_path / "store", chunk_shape=(8, 8, 8))
    image, label = make_case()
    props = {"spacing": [1.0, 1.0, 2.5], "name": "x"}
    store.write_case("case_1", image, label, props)
    assert store.has_case("case_1") and not store.has_case("case_2")
    assert store.case_ids() == ["case_1"]
    assert store.case_shape("case_1") == (20, 18, 12)
    assert store.num_channels == 2
    assert store.read_properties("case_1") == props
    got_image, got_label = store.read_case("case_1")
    assert got_image.dtype == np.float32 and got_label.dtype == np.uint8
    np.testing.assert_array_equal(got_image, image)
    np.testing.assert_array_equal(got_label, label)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_round_trip_2d_both_zarr_formats(tmp_path, zarr_format):
    store = CaseStore(tmp_path / "store", zarr_format=zarr_format)
    image = np.arange(2 * 30 * 20, dtype=np.float32).reshape(2, 30, 20)
    label = (image[0] % 3).astype(np.uint8)
    store.write_case("b", image, label, {})
    marker = "zarr.json" if zarr_format == 3 else ".zarray"
    assert (tmp_path / "store" / "b" / "image.zarr" / marker).is_file()
    # A fresh object (no cached handles) detects the format from the files.
    got_image, got_label = CaseStore(tmp_path / "store").read_case("b")
    np.testing.assert_array_equal(got_image, image)
    np.testing.assert_array_equal(got_label, label)


def test_read_patch_pads_both_ends_like_numpy(tmp_path):
    store = CaseStore(tmp_path / "store", chunk_shape=(8, 8, 8))
    image, label = make_case()
    store.write_case("c", image, label, {})
    start, size = np.array([-3, 10, -2]), np.array([10, 12, 16])  # before axis 0/2 start, past axis 1/2 end
    pad = 5
    padded_image = np.pad(image, [(0, 0)] + [(pad, pad + 10)] * 3)
    padded_label = np.pad(label, [(pad, pad + 10)] * 3)
    box = tuple(slice(s + pad, s + pad + n) for s, n in zip(start, size))
    got_image, got_label = store.read_patch("c", start, size)
    assert got_image.shape == (2, 10, 12, 16) and got_label.shape == (10, 12, 16)
    np.testing.assert_array_equal(got_image, padded_image[(slice(None), *box)])
    np.testing.assert_array_equal(got_label, padded_label[box])
    # Entirely outside the case: all padding.
    outside_image, outside_label = store.read_patch("c", [30, 0, 0], [4, 4, 4])
    assert not outside_image.any() and not outside_label.any()


def test_read_patch_reads_only_the_needed_chunks(tmp_path):
    store = CaseStore(tmp_path / "store", chunk_shape=(32, 32, 32))
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, 128, 128, 128)).astype(np.float32)  # 8 MiB, 64 chunks of 128 KiB
    store.write_case("big", image, np.zeros(image.shape[1:], np.uint8), {})
    stored = sum(f.stat().st_size for f in (tmp_path / "store" / "big").rglob("*") if f.is_file())

    def bytes_read():
        metrics = ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/bytes_read")
        return sum(v["value"] for m in metrics for v in m["values"])

    store.read_patch("big", (0, 0, 0), (1, 1, 1))  # open the arrays (metadata reads) beforehand
    before = bytes_read()
    patch, _ = store.read_patch("big", (40, 50, 60), (32, 32, 32))  # unaligned: 8 chunks per array
    read = bytes_read() - before
    np.testing.assert_array_equal(patch, image[:, 40:72, 50:82, 60:92])
    assert 0 < read < stored / 6, (read, stored)


def test_class_locations_have_their_label_and_follow_nnunet_counts(tmp_path):
    store = CaseStore(tmp_path / "store")
    label = np.zeros((32, 32, 32), np.uint8)
    label[:16] = 1  # 16384 voxels: capped at 10000
    label[20:23, 5:8, 9:12] = 3  # 27 voxels: all kept
    store.write_case("c", np.zeros((1, 32, 32, 32), np.float32), label, {})
    locations = store.class_locations("c")
    assert sorted(locations) == [1, 3]
    assert locations[1].shape == (10000, 3) and locations[3].shape == (27, 3)
    for cls, points in locations.items():
        assert points.dtype == np.int32
        assert (label[tuple(points.T)] == cls).all()
        assert len(np.unique(points, axis=0)) == len(points)
    # Fixed seed: the same label map gives the same locations.
    np.testing.assert_array_equal(compute_class_locations(label)[1], locations[1])


def test_unlabelled_case_has_no_locations(tmp_path):
    store = CaseStore(tmp_path / "store")
    store.write_case("u", np.ones((1, 8, 8), np.float32), None, {})
    assert store.class_locations("u") == {}
    assert not store.read_case("u")[1].any()


def test_leftover_temporary_folder_is_ignored_then_cleaned(tmp_path):
    root = tmp_path / "store"
    store = CaseStore(root)
    image, label = make_case()
    store.write_case("other", image, label, {})
    leftover = root / f".tmp-a-{HEX32}"  # what a killed write of case "a" leaves behind
    leftover.mkdir()
    (leftover / "junk").write_text("x")
    not_ours = root / f".tmp-a-b-{HEX32}"  # temp folder of case "a-b": must survive a write of "a"
    not_ours.mkdir()
    assert store.case_ids() == ["other"]
    assert not store.has_case("a")
    store.write_case("a", image, label, {"v": 1})
    assert not leftover.exists() and not_ours.exists()
    assert store.case_ids() == ["a", "other"]
    # Overwriting replaces the case and leaves no temporary folder behind.
    store.write_case("a", image * 2, label, {"v": 2})
    assert store.read_properties("a") == {"v": 2}
    np.testing.assert_array_equal(store.read_case("a")[0], image * 2)
    assert sorted(p.name for p in root.iterdir()) == [not_ours.name, "a", "other"]


@pytest.mark.parametrize(
    "image, label, properties, message",
    [
        (np.zeros((1, 8, 8, 8), np.float32), np.zeros((8, 8, 7), np.uint8), {}, "does not match"),
        (np.zeros((1, 8, 8, 8), np.float32), np.full((8, 8, 8), 300), {}, "[0, 255]"),
        (np.full((1, 8, 8, 8), np.nan, np.float32), np.zeros((8, 8, 8), np.uint8), {}, "NaN"),
        (np.zeros((8, 8), np.float32), np.zeros((8,), np.uint8), {}, "(C, *spatial)"),
        (np.zeros((1, 8, 8, 8), np.float32), np.zeros((8, 8, 8), np.uint8), {"a": object()}, "JSON"),
    ],
)
def test_bad_case_is_refused_and_nothing_is_written(tmp_path, image, label, properties, message):
    root = tmp_path / "store"
    store = CaseStore(root)
    with pytest.raises(DataError, match="case 'bad'") as info:
        store.write_case("bad", image, label, properties)
    assert message in str(info.value)
    assert not root.exists() or list(root.iterdir()) == []


@pytest.mark.parametrize("case_id", ["../escape", ".hidden", "", "a/b"])
def test_unsafe_case_id_is_refused(tmp_path, case_id):
    with pytest.raises(DataError, match="invalid case id"):
        CaseStore(tmp_path / "store").write_case(case_id, np.zeros((1, 4, 4), np.float32), None, {})
    assert not (tmp_path / "store").exists() or list((tmp_path / "store").iterdir()) == []


def test_missing_case_and_bad_store_errors_name_them(tmp_path):
    root = tmp_path / "store"
    with pytest.raises(DataError, match="does not exist"):
        CaseStore(root).case_ids()
    store = CaseStore(root)
    store.write_case("x", np.zeros((1, 4, 4, 4), np.float32), None, {})
    for read in (store.read_properties, store.case_shape, store.class_locations, store.read_case):
        with pytest.raises(DataError, match=f"case 'nope' not found in case store {root}"):
            read("nope")
    with pytest.raises(DataError, match="case 'nope'"):
        store.read_patch("nope", (0, 0, 0), (2, 2, 2))
    with pytest.raises(DataError, match="must have 3 entries"):
        store.read_patch("x", (0, 0), (2, 2))
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(DataError, match="not a folder"):
        CaseStore(a_file)
    with pytest.raises(DataError, match="holds no cases"):
        (tmp_path / "empty").mkdir()
        _ = CaseStore(tmp_path / "empty").num_channels


def test_store_pickles_to_its_path(tmp_path):
    store = CaseStore(tmp_path / "store", chunk_shape=(4, 4, 4))
    image, label = make_case(shape=(6, 6, 6))
    store.write_case("p", image, label, {})
    store.read_case("p")  # fills the handle cache, which must not travel
    clone = pickle.loads(pickle.dumps(store))
    assert clone._arrays == {} and clone.chunk_shape == (4, 4, 4)
    np.testing.assert_array_equal(clone.read_patch("p", (1, 1, 1), (3, 3, 3))[1], label[1:4, 1:4, 1:4])


def _plan():
    from medseg_jax.data.plan import make_plan
    from tests.data.test_fingerprint import _fingerprint

    return make_plan(_fingerprint([[1.0, 1.0, 2.0]] * 2, [[40, 40, 20]] * 2))


def test_the_store_records_its_plan_once_and_refuses_another(tmp_path):
    store = CaseStore(tmp_path / "store")
    with pytest.raises(DataError, match=r"store/plan\.json: the store has no plan; preprocess with"):
        store.read_plan()
    plan = _plan()
    store.write_plan(plan)
    assert store.read_plan() == json.loads(json.dumps(plan))
    store.write_plan(json.loads(json.dumps(plan)))  # the same plan again (lists for tuples): nothing to do
    image, label = make_case(channels=1)
    store.write_case("a", image, label, {})
    assert store.case_ids() == ["a"]  # plan.json is no case
    other = plan | {"patch_size": [16, 16, 16], "batch_size": 3}
    with pytest.raises(DataError, match=r"preprocessed with another plan \(differing in batch_size, patch_size\)"):
        store.write_plan(other)
    assert store.read_plan() == json.loads(json.dumps(plan))


def test_cases_without_a_recorded_plan_are_not_continued_with_one(tmp_path):
    store = CaseStore(tmp_path / "store")
    image, label = make_case(channels=1)
    store.write_case("a", image, label, {})
    with pytest.raises(
        DataError,
        match=r"holds 1 case\(s\) but no plan\.json, so the plan they were preprocessed with "
        "is unknown",
    ):
        store.write_plan(_plan())
    assert not (tmp_path / "store" / "plan.json").exists()
    broken = _plan()
    broken.pop("patch_size")
    with pytest.raises(DataError, match="missing the key"):
        CaseStore(tmp_path / "new").write_plan(broken)
    assert not (tmp_path / "new" / "plan.json").exists()
