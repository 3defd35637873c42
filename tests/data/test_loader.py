import itertools
import json
import time

import grain
import numpy as np
import pytest

from medseg_jax.data.loader import (
    foreground_patch_start,
    is_foreground_forced,
    make_train_loader,
    patch_start_bounds,
)
from medseg_jax.data.store import CaseStore
from medseg_jax.errors import DataError

CASES = ["c0", "c1", "c2", "c3"]
CUBE = (slice(20, 23), slice(5, 8), slice(11, 14))  # a 3^3 foreground cube in a 32^3 case


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Four 32^3 cases; case k has the constant image value k + 1 (so patches reveal their case)."""
    store = CaseStore(tmp_path_factory.mktemp("store") / "cases", chunk_shape=(16, 16, 16))
    for k, case_id in enumerate(CASES):
        label = np.zeros((32, 32, 32), np.uint8)
        label[CUBE] = 1 + k % 2
        store.write_case(case_id, np.full((1, 32, 32, 32), k + 1, np.float32), label, {})
    return store


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def test_nnunet_oversampling_positions():
    # batch 2 -> second sample; batch 3 -> third; batch 12 -> last 4; fraction 0 -> none.
    assert [is_foreground_forced(i, 2, 0.33) for i in range(2)] == [False, True]
    assert [is_foreground_forced(i, 3, 0.33) for i in range(3)] == [False, False, True]
    assert sum(is_foreground_forced(i, 12, 0.33) for i in range(12)) == 4
    assert not any(is_foreground_forced(i, 4, 0.0) for i in range(4))


def test_patch_start_bounds_inside_and_padded():
    low, high = patch_start_bounds((32, 5, 6), (8, 8, 6))
    assert low.tolist() == [0, -2, 0] and high.tolist() == [24, -1, 0]
    rng = np.random.default_rng(0)
    for _ in range(50):  # the chosen voxel is always inside the patch, which stays within bounds
        voxel = rng.integers(0, (32, 5, 6))
        start = foreground_patch_start(rng, (32, 5, 6), (8, 8, 6), voxel)
        assert (start <= voxel).all() and (voxel < start + (8, 8, 6)).all()
        assert (low <= start).all() and (start <= high).all()


def test_shapes_dtypes_and_channels_last(store):
    batch = take(make_train_loader(store, CASES, (8, 8, 8), batch_size=3), 1)[0]
    assert batch["image"].shape == (3, 8, 8, 8, 1) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (3, 8, 8, 8) and batch["label"].dtype == np.int32


def test_same_seed_same_stream_other_seed_differs(store):
    first = take(make_train_loader(store, CASES, (8, 8, 8), 2, seed=7), 6)
    again = take(make_train_loader(store, CASES, (8, 8, 8), 2, seed=7), 6)
    other = take(make_train_loader(store, CASES, (8, 8, 8), 2, seed=8), 6)
    assert_same_batches(first, again)
    differs = [
        not (np.array_equal(a["image"], b["image"]) and np.array_equal(a["label"], b["label"]))
        for a, b in zip(first, other)
    ]
    assert any(differs)


def test_foreground_fraction_with_tiny_foreground(store):
    batch_size, n_batches = 3, 67  # 201 samples; position 2 of each batch is forced
    batches = take(make_train_loader(store, CASES, (8, 8, 8), batch_size, foreground_fraction=0.33, seed=1), n_batches)
    has_fg = np.array([[b["label"][i].any() for i in range(batch_size)] for b in batches])
    assert has_fg[:, 2].all()  # every forced sample contains foreground
    # A random 8^3 patch in 32^3 meets the 3^3 cube with probability (10/25)^3 = 0.064.
    random_fraction = has_fg[:, :2].mean()
    assert 0.0 < random_fraction < 0.2
    assert 0.33 <= has_fg.mean() < 0.5
    # Both classes get picked among the forced samples (cases alternate between labels 1 and 2).
    forced_classes = {int(b["label"][2].max()) for b in batches}
    assert forced_classes == {1, 2}


def test_no_oversampling_when_fraction_is_zero(store):
    batches = take(make_train_loader(store, CASES, (8, 8, 8), 3, foreground_fraction=0.0, seed=1), 40)
    assert np.mean([b["label"][i].any() for b in batches for i in range(3)]) < 0.2


def test_2d_slices_from_3d_cases(store):
    batches = take(make_train_loader(store, CASES, (16, 16), 2, foreground_fraction=0.5, seed=3), 10)
    for batch in batches:
        assert batch["image"].shape == (2, 16, 16, 1) and batch["label"].shape == (2, 16, 16)
        # The forced sample (position 1) takes the slice of a foreground voxel, and at most 3x3
        # pixels of the cube's cross-section can show in it.
        assert 1 <= (batch["label"][1] > 0).sum() <= 9


def test_case_smaller_than_patch_is_padded(tmp_path):
    store = CaseStore(tmp_path / "small")
    image = np.full((2, 5, 6, 8), 3.0, np.float32)
    label = np.ones((5, 6, 8), np.uint8)
    store.write_case("s", image, label, {})
    batch = take(make_train_loader(store, ["s"], (8, 8, 8), 2), 1)[0]
    assert batch["image"].shape == (2, 8, 8, 8, 2)
    for i in range(2):  # the whole case (240 voxels) sits inside the patch, the rest is zero padding
        assert (batch["label"][i] == 1).sum() == 240 and (batch["image"][i] == 3.0).sum() == 480
        assert (batch["image"][i][batch["label"][i] == 0] == 0).all()


def test_checkpointed_iterator_continues_the_same_stream(store):
    reference = take(make_train_loader(store, CASES, (8, 8, 8), 2, seed=5), 8)
    iterator = iter(make_train_loader(store, CASES, (8, 8, 8), 2, seed=5))
    for _ in range(3):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))  # JSON-able, as saved with a checkpoint
    resumed = iter(make_train_loader(store, CASES, (8, 8, 8), 2, seed=5))
    resumed.set_state(state)
    assert_same_batches([next(resumed) for _ in range(5)], reference[3:])


def test_shards_split_each_epoch_without_overlap(store):
    def cases_seen(**shard):
        batches = take(make_train_loader(store, CASES, (8, 8, 8), 2, seed=2, **shard), 6)
        return [{int(b["image"][i].max()) for i in range(2)} for b in batches]

    shard0, shard1 = cases_seen(shard_index=0, shard_count=2), cases_seen(shard_index=1, shard_count=2)
    # With 4 cases, batch e of each shard holds that shard's half of epoch e.
    for seen0, seen1 in zip(shard0, shard1):
        assert len(seen0) == 2 and seen0.isdisjoint(seen1) and seen0 | seen1 == {1, 2, 3, 4}
    assert cases_seen(shard_options=grain.sharding.ShardOptions(shard_index=1, shard_count=2)) == shard1


def test_worker_processes_give_the_same_stream(store):
    start = time.monotonic()
    loader = make_train_loader(store, CASES, (8, 8, 8), 2, seed=4, num_workers=2)
    iterator = iter(loader)
    with_workers = [next(iterator) for _ in range(4)]
    iterator.close()
    assert_same_batches(with_workers, take(make_train_loader(store, CASES, (8, 8, 8), 2, seed=4), 4))
    assert time.monotonic() - start < 60


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"case_ids": ["c0", "missing"]}, "1 case(s) not in the store: missing"),
        ({"case_ids": []}, "no training cases"),
        ({"patch_size": (8,)}, "patch_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"foreground_fraction": 1.5}, "foreground_fraction"),
        ({"shard_index": 2, "shard_count": 2}, "shard_index 2"),
    ],
)
def test_bad_arguments_are_refused(store, kwargs, message):
    args = {"case_ids": CASES, "patch_size": (8, 8, 8), "batch_size": 2} | kwargs
    with pytest.raises(DataError) as info:
        make_train_loader(store, **args)
    assert message in str(info.value) and str(store.path) in str(info.value)


def test_patch_that_does_not_fit_the_cases_names_the_case(tmp_path):
    store = CaseStore(tmp_path / "flat")
    store.write_case("flat", np.zeros((1, 16, 16), np.float32), None, {})
    message = r"case 'flat' .*patch size \(8, 8, 8\) does not fit a case of shape \(16, 16\)"
    with pytest.raises(DataError, match=message):
        next(iter(make_train_loader(store, ["flat"], (8, 8, 8), 2)))


def test_crop_is_centred_on_the_patch_window_and_holds_forced_foreground(store):
    patch, crop = (8, 8, 8), (14, 12, 8)
    plain = take(make_train_loader(store, CASES, patch, 3, foreground_fraction=0.34, seed=5), 6)
    cropped = take(make_train_loader(store, CASES, patch, 3, foreground_fraction=0.34, seed=5, crop_size=crop), 6)
    margin = [(c - p) // 2 for c, p in zip(crop, patch)]
    centre = tuple(slice(m, m + p) for m, p in zip(margin, patch))
    for a, b in zip(plain, cropped):
        assert b["image"].shape == (3, *crop, 1)
        # the central patch-size window of the crop is exactly the patch drawn without a crop
        np.testing.assert_array_equal(b["label"][(slice(None), *centre)], a["label"])
        assert (b["label"][(2, *centre)] > 0).any()  # the forced sample's foreground is in the window


def test_batch_transform_runs_per_batch_deterministically(store):
    def shift(rng, batch):
        return {"image": batch["image"] + rng.integers(1, 1000), "label": batch["label"]}

    a = take(make_train_loader(store, CASES, (8, 8, 8), 2, seed=1, batch_transform=shift), 4)
    b = take(make_train_loader(store, CASES, (8, 8, 8), 2, seed=1, batch_transform=shift), 4)
    plain = take(make_train_loader(store, CASES, (8, 8, 8), 2, seed=1), 4)
    assert_same_batches(a, b)
    offsets = [float(x["image"][0, 0, 0, 0, 0] - y["image"][0, 0, 0, 0, 0]) for x, y in zip(a, plain)]
    assert all(o >= 1 for o in offsets) and len(set(offsets)) > 1


def test_crop_smaller_than_patch_is_refused(store):
    with pytest.raises(DataError, match="crop size"):
        make_train_loader(store, CASES, (8, 8, 8), 2, crop_size=(6, 8, 8))
