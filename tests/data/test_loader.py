import itertools
import json
import time

import grain
import numpy as np
import pytest

from medseg_jax.data.loader import (
    _mark_absl_flags_parsed,
    batches_taken,
    foreground_patch_start,
    host_element_index,
    is_foreground_forced,
    make_train_loader,
    patch_start_bounds,
    resolve_num_workers,
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


def test_batch_transform_runs_per_sample_deterministically(store):
    a = take(make_train_loader(store, CASES, (8, 8, 8), 2, seed=1, batch_transform=shift_by_random_offset), 4)
    b = take(make_train_loader(store, CASES, (8, 8, 8), 2, seed=1, batch_transform=shift_by_random_offset), 4)
    plain = take(make_train_loader(store, CASES, (8, 8, 8), 2, seed=1), 4)
    assert_same_batches(a, b)
    offsets = [float(x["image"][i].min() - y["image"][i].min()) for x, y in zip(a, plain) for i in range(2)]
    # each sample gets its own generator: offsets differ between the rows of a batch too
    assert all(o >= 1 for o in offsets) and len(set(offsets)) == len(offsets)


def test_crop_smaller_than_patch_is_refused(store):
    with pytest.raises(DataError, match="crop size"):
        make_train_loader(store, CASES, (8, 8, 8), 2, crop_size=(6, 8, 8))


def shift_by_random_offset(rng, batch):
    """A CPU-side batch transform whose effect shows which generator it got."""
    return {"image": batch["image"] + rng.integers(1, 1000), "label": batch["label"]}


def host_elements(batch_size, shard_index, shard_count, n):
    return [host_element_index(i, batch_size, shard_index, shard_count) for i in range(n)]


def test_hosts_hold_consecutive_rows_of_each_global_batch():
    # global batch 4 over 2 hosts: host 0 rows 0-1, host 1 rows 2-3 of every global batch
    assert host_elements(2, 0, 2, 6) == [0, 1, 4, 5, 8, 9]
    assert host_elements(2, 1, 2, 6) == [2, 3, 6, 7, 10, 11]
    assert host_elements(1, 3, 4, 3) == [3, 7, 11]
    assert host_elements(4, 0, 1, 6) == list(range(6))


@pytest.mark.parametrize("transform", [None, shift_by_random_offset])
def test_global_batches_do_not_depend_on_the_process_count(store, transform):
    # Three cases and a global batch of 4, so global batches straddle epoch boundaries.
    cases, global_batch, n = CASES[:3], 4, 6
    args = {"foreground_fraction": 0.33, "seed": 11, "batch_transform": transform}
    single = take(make_train_loader(store, cases, (8, 8, 8), global_batch, **args), n)
    for count in (2, 4):
        per_host = global_batch // count
        hosts = [
            take(make_train_loader(store, cases, (8, 8, 8), per_host, **args, shard_index=k, shard_count=count), n)
            for k in range(count)
        ]
        joined = [
            {key: np.concatenate([host[b][key] for host in hosts]) for key in ("image", "label")} for b in range(n)
        ]
        assert_same_batches(joined, single)
    # nnU-Net's rule on the global batch: its last row (round(4 * 0.67) = 3) always holds foreground,
    # also where it is the only row of host 3 of 4
    assert all(batch["label"][3].any() for batch in single)
    # every case appears in each epoch of 3 elements (shuffled per epoch, not per host)
    stream = [int(batch["image"][i].min()) for batch in single for i in range(global_batch)]
    if transform is None:
        assert all(sorted(stream[e : e + 3]) == [1, 2, 3] for e in range(0, len(stream) - 2, 3))


def test_state_restores_with_worker_processes_and_across_worker_counts(store):
    _mark_absl_flags_parsed()
    reference = take(make_train_loader(store, CASES, (8, 8, 8), 2, seed=5), 7)
    iterator = iter(make_train_loader(store, CASES, (8, 8, 8), 2, seed=5, num_workers=1))
    assert_same_batches([next(iterator) for _ in range(3)], reference[:3])
    state = json.loads(json.dumps(iterator.get_state()))
    iterator.close()
    for workers in (1, 0):  # the state does not tie a checkpoint to a worker count
        resumed = iter(make_train_loader(store, CASES, (8, 8, 8), 2, seed=5, num_workers=workers))
        resumed.set_state(state)
        assert_same_batches([next(resumed) for _ in range(4)], reference[3:])
        resumed.close()


def test_state_of_one_host_restores_mid_stream(store):
    shard = {"shard_index": 1, "shard_count": 2, "seed": 6}
    reference = take(make_train_loader(store, CASES, (8, 8, 8), 1, **shard), 6)
    iterator = iter(make_train_loader(store, CASES, (8, 8, 8), 1, **shard))
    for _ in range(4):
        next(iterator)
    iterator.set_state({"next_index": 2})  # back to an earlier position of a running iterator
    assert_same_batches([next(iterator) for _ in range(4)], reference[2:])


def test_iterator_states_of_grain_worker_processes_still_restore():
    # Earlier versions saved grain's own state, which for worker processes is one state per worker.
    _mark_absl_flags_parsed()
    dataset = grain.MapDataset.range(1000).batch(2).to_iter_dataset()
    iterator = iter(dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=2)))
    for taken in range(5):
        assert batches_taken(iterator.get_state()) == taken
        next(iterator)
    iterator.close()
    with pytest.raises(DataError, match="unrecognised iterator state"):
        batches_taken({"position": 3})


@pytest.mark.parametrize("cpus, workers", [(1, 0), (2, 0), (3, 1), (4, 2), (6, 4), (96, 4)])
def test_auto_workers_leave_two_cores_to_training(cpus, workers):
    assert resolve_num_workers("auto", cpu_count=cpus) == workers


def test_worker_count_given_is_kept_and_a_bad_one_refused(store):
    assert resolve_num_workers(3, cpu_count=2) == 3 and resolve_num_workers(0) == 0
    assert resolve_num_workers("auto") >= 0  # this machine's cores
    for bad in (-1, "many", 1.5, True):
        with pytest.raises(DataError, match="num_workers must be an integer >= 0 or 'auto'"):
            resolve_num_workers(bad)
    with pytest.raises(DataError, match="num_workers"):
        make_train_loader(store, CASES, (8, 8, 8), 2, num_workers=-2)
