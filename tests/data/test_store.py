import json
import pickle
import subprocess
import sys
import threading
import uuid
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts

from medseg_jax.data.store import MARKER_NAME, CaseStore, compute_class_locations, parse_location
from medseg_jax.errors import DataError

REPO = Path(__file__).resolve().parents[2]


def make_case(shape=(20, 18, 12), channels=2, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(channels, *shape)).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[3:9, 4:10, 2:6] = 1
    label[12:14, 5:7, 7:9] = 2
    return image, label


@pytest.fixture(params=["file", "memory"])
def location(request, tmp_path):
    """A fresh store location of each kind: a local folder, and a memory:// URL unique to the test
    (memory stores live as long as the process, shared by every CaseStore of the same URL)."""
    if request.param == "file":
        return tmp_path / "store"
    return f"memory://test-{uuid.uuid4().hex}"


def keys(store):
    """Every key the store holds, whatever its kind (to check that nothing was left behind)."""
    return sorted(k.decode() for k in store._kv().list().result())


def test_round_trip_3d_multichannel(location):
    store = CaseStore(location, chunk_shape=(8, 8, 8))
    image, label = make_case()
    props = {"spacing": [1.0, 1.0, 2.5], "name": "x"}
    store.write_case("case_1", image, label, props)
    # A second object at the same location (for memory://, the same process) sees the case.
    for reader in (store, CaseStore(location)):
        assert reader.has_case("case_1") and not reader.has_case("case_2")
        assert reader.case_ids() == ["case_1"]
        assert reader.case_shape("case_1") == (20, 18, 12)
        assert reader.num_channels == 2
        assert reader.read_properties("case_1") == props
        got_image, got_label = reader.read_case("case_1")
        assert got_image.dtype == np.float32 and got_label.dtype == np.uint8
        np.testing.assert_array_equal(got_image, image)
        np.testing.assert_array_equal(got_label, label)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_round_trip_2d_both_zarr_formats(location, zarr_format):
    store = CaseStore(location, zarr_format=zarr_format)
    image = np.arange(2 * 30 * 20, dtype=np.float32).reshape(2, 30, 20)
    label = (image[0] % 3).astype(np.uint8)
    store.write_case("b", image, label, {})
    metadata = "zarr.json" if zarr_format == 3 else ".zarray"
    assert f"b/image.zarr/{metadata}" in keys(store)
    # A fresh object (no cached handles) reads the format from the case's record.
    got_image, got_label = CaseStore(location).read_case("b")
    np.testing.assert_array_equal(got_image, image)
    np.testing.assert_array_equal(got_label, label)


def test_read_patch_pads_both_ends_like_numpy(location):
    store = CaseStore(location, chunk_shape=(8, 8, 8))
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


def test_class_locations_have_their_label_and_follow_nnunet_counts(location):
    store = CaseStore(location)
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


def test_unlabelled_case_has_no_locations(location):
    store = CaseStore(location)
    store.write_case("u", np.ones((1, 8, 8), np.float32), None, {})
    assert store.class_locations("u") == {}
    assert not store.read_case("u")[1].any()


def test_a_failed_write_leaves_no_case_and_no_keys(location, monkeypatch):
    store = CaseStore(location, chunk_shape=(8, 8, 8))
    image, label = make_case()
    store.write_case("other", image, label, {})
    before = keys(store)
    real_write = CaseStore._write

    def dies_at_the_marker(self, key, data):
        if key.endswith(MARKER_NAME) and data is not None:
            raise KeyboardInterrupt  # everything else of the case is written by now
        real_write(self, key, data)

    monkeypatch.setattr(CaseStore, "_write", dies_at_the_marker)
    with pytest.raises(KeyboardInterrupt):
        store.write_case("a", image, label, {"v": 1})
    monkeypatch.undo()
    assert keys(store) == before  # the partial case was cleaned up
    for reader in (store, CaseStore(location)):
        assert not reader.has_case("a") and reader.case_ids() == ["other"]


def test_a_killed_write_is_invisible_and_the_next_write_replaces_it(location, monkeypatch):
    """A process killed before the marker gets no cleanup: its keys stay, but the case is absent."""
    store = CaseStore(location, chunk_shape=(8, 8, 8))
    image, label = make_case()
    real_write = CaseStore._write

    def dies_at_the_marker(self, key, data):
        if key.endswith(MARKER_NAME) and data is not None:
            raise KeyboardInterrupt
        real_write(self, key, data)

    monkeypatch.setattr(CaseStore, "_write", dies_at_the_marker)
    monkeypatch.setattr(CaseStore, "_delete_tree", lambda self, prefix: None)  # as if killed: nothing cleaned
    with pytest.raises(KeyboardInterrupt):
        store.write_case("a", image, label, {"v": 1})
    monkeypatch.undo()
    assert "a/image.zarr/zarr.json" in keys(store) and "a/properties.json" in keys(store)
    fresh = CaseStore(location)
    assert not fresh.has_case("a") and fresh.case_ids() == [] and fresh.missing_cases(["a"]) == ["a"]
    with pytest.raises(DataError, match="case 'a' not found"):
        fresh.read_properties("a")
    # The next write of the case clears the leftovers (here: a smaller case, so stale chunks would show).
    small_image, small_label = make_case(shape=(6, 6, 6), channels=1, seed=1)
    fresh.write_case("a", small_image, small_label, {"v": 2})
    assert fresh.read_properties("a") == {"v": 2} and fresh.case_shape("a") == (6, 6, 6)
    np.testing.assert_array_equal(CaseStore(location).read_case("a")[0], small_image)
    assert [k for k in keys(fresh) if k.startswith("a/image.zarr/c/")] == ["a/image.zarr/c/0/0/0/0"]  # one chunk


KILL_SCRIPT = """
import os, sys
import numpy as np
from medseg_jax.data.store import MARKER_NAME, CaseStore

real_write = CaseStore._write
def write(self, key, data):
    if key.endswith(MARKER_NAME) and data is not None:
        os._exit(3)  # killed the moment everything but the marker is written
    real_write(self, key, data)
CaseStore._write = write
CaseStore(sys.argv[1]).write_case("a", np.ones((1, 8, 8, 8), np.float32), np.ones((8, 8, 8), np.uint8), {})
"""


def test_a_process_killed_mid_write_leaves_no_visible_case(tmp_path):
    root = tmp_path / "store"
    store = CaseStore(root)
    image, label = make_case()
    store.write_case("other", image, label, {})
    killed = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(root)], cwd=REPO, timeout=120)
    assert killed.returncode == 3
    assert (root / "a" / "image.zarr").is_dir() and not (root / "a" / MARKER_NAME).exists()
    assert CaseStore(root).case_ids() == ["other"] and not CaseStore(root).has_case("a")
    store.write_case("a", image, label, {"v": 1})
    assert store.case_ids() == ["a", "other"] and store.read_properties("a") == {"v": 1}


def test_overwriting_replaces_the_case(location):
    store = CaseStore(location)
    image, label = make_case()
    store.write_case("a", image, label, {"v": 1})
    store.write_case("a", image * 2, label, {"v": 2})
    assert store.read_properties("a") == {"v": 2}
    np.testing.assert_array_equal(CaseStore(location).read_case("a")[0], image * 2)
    assert store.case_ids() == ["a"]


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
def test_bad_case_is_refused_and_nothing_is_written(location, image, label, properties, message):
    store = CaseStore(location)
    with pytest.raises(DataError, match="case 'bad'") as info:
        store.write_case("bad", image, label, properties)
    assert message in str(info.value)
    assert keys(store) == []


@pytest.mark.parametrize("case_id", ["../escape", ".hidden", "", "a/b", "plan.json", "splits.json"])
def test_unsafe_case_id_is_refused(location, case_id):
    store = CaseStore(location)
    with pytest.raises(DataError, match="invalid case id"):
        store.write_case(case_id, np.zeros((1, 4, 4), np.float32), None, {})
    assert keys(store) == []


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
    with pytest.raises(DataError, match="holds no cases"):
        _ = CaseStore(f"memory://empty-{uuid.uuid4().hex}").num_channels
    with pytest.raises(DataError, match="not a store location tensorstore can open"):
        CaseStore("nosuchscheme://bucket/store")


def test_locations_local_and_urls():
    assert parse_location("runs/store") == (Path("runs/store"), None)
    assert parse_location("file:///data/store") == (Path("/data/store"), None)
    assert parse_location("gs://bucket/stores/liver") == (None, "gs://bucket/stores/liver")
    assert parse_location("s3://my-bucket/liver") == (None, "s3://my-bucket/liver")
    # A URL that went through pathlib (argparse type=Path) lost one '/': recognised all the same.
    assert parse_location(Path("gs://bucket/stores/liver")) == (None, "gs://bucket/stores/liver")
    assert parse_location(Path("memory://x")) == (None, "memory://x")
    gcs = CaseStore("gs://bucket/stores/liver")  # opening is lazy: no network needed to build the spec
    assert gcs._root_spec == {"driver": "gcs", "bucket": "bucket", "path": "stores/liver/"}
    assert gcs.location("plan.json") == "gs://bucket/stores/liver/plan.json"


def test_memory_store_is_shared_in_the_process_and_pickles(location):
    store = CaseStore(location, chunk_shape=(4, 4, 4))
    image, label = make_case(shape=(6, 6, 6))
    store.write_case("p", image, label, {})
    store.read_case("p")  # fills the handle cache, which must not travel
    clone = pickle.loads(pickle.dumps(store))
    assert clone._arrays == {} and clone.chunk_shape == (4, 4, 4)
    np.testing.assert_array_equal(clone.read_patch("p", (1, 1, 1), (3, 3, 3))[1], label[1:4, 1:4, 1:4])


def _patch_in_worker(store):
    return store.read_patch("p", (1, 1, 1), (3, 3, 3))[1]


def test_a_file_store_pickles_into_another_process(tmp_path):
    store = CaseStore(tmp_path / "store", chunk_shape=(4, 4, 4))
    image, label = make_case(shape=(6, 6, 6))
    store.write_case("p", image, label, {})
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        np.testing.assert_array_equal(pool.submit(_patch_in_worker, store).result(), label[1:4, 1:4, 1:4])


def _plan():
    from medseg_jax.data.plan import make_plan
    from tests.data.test_fingerprint import _fingerprint

    return make_plan(_fingerprint([[1.0, 1.0, 2.0]] * 2, [[40, 40, 20]] * 2))


def test_the_store_records_its_plan_once_and_refuses_another(location):
    store = CaseStore(location)
    with pytest.raises(DataError, match=r"/plan\.json: the store has no plan; preprocess with"):
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
    assert CaseStore(location).read_plan() == json.loads(json.dumps(plan))


def test_processes_recording_the_plan_at_once_agree_on_one(location):
    """Shards start together: the same plan recorded by all succeeds everywhere; of different plans
    exactly one is recorded and the others are refused (the plan is created only if absent)."""
    plan = _plan()
    other = plan | {"batch_size": 7}

    def record_all(plans):
        barrier, outcomes = threading.Barrier(len(plans)), []

        def record(p):
            barrier.wait()
            try:
                CaseStore(location).write_plan(p)
                outcomes.append("ok")
            except DataError as exc:
                outcomes.append(str(exc))

        threads = [threading.Thread(target=record, args=(p,)) for p in plans]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return outcomes

    assert record_all([plan] * 6) == ["ok"] * 6
    assert CaseStore(location).read_plan() == json.loads(json.dumps(plan))

    second = f"memory://race-{uuid.uuid4().hex}" if isinstance(location, str) else location.parent / "second"
    location = second
    outcomes = record_all([plan, other] * 3)
    winner = CaseStore(location).read_plan()
    assert winner["batch_size"] in (plan["batch_size"], 7)
    refused = [o for o in outcomes if o != "ok"]
    assert len(refused) == 3 and all("another plan (differing in batch_size)" in o for o in refused)


def test_cases_without_a_recorded_plan_are_not_continued_with_one(location):
    store = CaseStore(location)
    image, label = make_case(channels=1)
    store.write_case("a", image, label, {})
    with pytest.raises(
        DataError,
        match=r"holds 1 case\(s\) but no plan\.json, so the plan they were preprocessed with is unknown",
    ):
        store.write_plan(_plan())
    assert "plan.json" not in keys(store)
    broken = _plan()
    broken.pop("patch_size")
    with pytest.raises(DataError, match="missing the key"):
        store.write_plan(broken)
    assert "plan.json" not in keys(store)


def test_finalize_writes_the_index_and_any_write_removes_it(location):
    store = CaseStore(location)
    plan = _plan()
    store.write_plan(plan)
    image, label = make_case(channels=1)
    store.write_case("a", image, label, {})
    with pytest.raises(DataError, match=r"1 of 2 case\(s\) not preprocessed yet: b; run `medseg-jax preprocess`"):
        store.finalize(["a", "b"])
    assert "index.json" not in keys(store) and store.read_index() is None
    store.write_case("b", image[:, :10], label[:10], {})
    with pytest.raises(DataError, match="another plan"):
        store.finalize(["a", "b"], plan | {"batch_size": 9})
    index = store.finalize(["b", "a"], plan)
    assert sorted(index["cases"]) == ["a", "b"] and index["cases"]["b"]["shape"] == [10, 18, 12]
    assert len(index["plan_sha256"]) == 64
    reader = CaseStore(location)
    assert reader.read_index() == index and reader.case_ids() == ["a", "b"]
    assert reader.has_case("b") and reader.case_shape("b") == (10, 18, 12) and reader.num_channels == 1
    # Writing a case makes the index stale, so it goes first.
    store.write_case("c", image, label, {})
    assert store.read_index() is None and CaseStore(location).case_ids() == ["a", "b", "c"]


def test_a_damaged_index_is_an_error_naming_it(location):
    store = CaseStore(location)
    store.write_case("a", np.zeros((1, 4, 4, 4), np.float32), None, {})
    store.write_json("index.json", {"index_format": 1, "cases": {"a": {"shape": [4, 4]}}})
    with pytest.raises(DataError, match=r"index\.json: damaged case record"):
        store.case_ids()
    store.write_json("index.json", [1, 2])
    with pytest.raises(DataError, match=r"index\.json: expected a JSON object, found array"):
        store.case_ids()


def test_top_level_json_documents(location):
    store = CaseStore(location)
    assert store.read_json("splits.json") is None
    store.write_json("splits.json", [{"train": ["a"], "val": ["b"]}])
    assert CaseStore(location).read_json("splits.json") == [{"train": ["a"], "val": ["b"]}]
    with pytest.raises(DataError, match="not a top-level .json name"):
        store.write_json("a/splits.json", [])


def test_training_folds_live_in_the_store_whatever_its_kind(location, tmp_path, monkeypatch):
    from medseg_jax.train.setup import store_fold

    monkeypatch.chdir(tmp_path)  # a URL store must not turn into a local folder named after it
    store = CaseStore(location)
    for k in range(5):
        store.write_case(f"c{k}", np.zeros((1, 4, 4, 4), np.float32), None, {})
    fold = store_fold(store, 0)
    assert sorted(fold["train"] + fold["val"]) == [f"c{k}" for k in range(5)] and len(fold["val"]) == 1
    assert CaseStore(location).read_json("splits.json")[0] == fold
    assert store_fold(CaseStore(location), 0) == fold
    if isinstance(location, str):
        assert not any(tmp_path.iterdir())
