"""nnU-Net's splits_final.json used where our splits.json is absent: dataset folder and store."""

import json
import uuid

import numpy as np
import pytest

from medseg_jax.data.dataset import load_dataset, load_or_create_splits, make_splits
from medseg_jax.data.image_io import write_nifti
from medseg_jax.data.store import CaseStore
from medseg_jax.data.volume import Volume
from medseg_jax.errors import ConfigError, DataError
from medseg_jax.train.setup import store_fold

CASES = ("a", "b", "c", "d")
# As nnU-Net writes it: two folds that make_splits would not make (a and b always validated together).
NNUNET_FOLDS = [{"train": ["c", "d"], "val": ["a", "b"]}, {"train": ["a", "b"], "val": ["c", "d"]}]


def tiny_dataset(root):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    meta = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "numTraining": len(CASES)}
    (root / "dataset.json").write_text(json.dumps({**meta, "file_ending": ".nii.gz"}))
    for case in CASES:
        write_nifti(Volume(np.zeros((2, 2, 2), np.int16), np.eye(4)), root / "imagesTr" / f"{case}_0000.nii.gz")
        write_nifti(Volume(np.zeros((2, 2, 2), np.uint8), np.eye(4)), root / "labelsTr" / f"{case}.nii.gz")
    return load_dataset(root)


def test_dataset_uses_splits_final_when_splits_json_is_absent(tmp_path):
    dataset = tiny_dataset(tmp_path / "ds")
    (dataset.root / "splits_final.json").write_text(json.dumps(NNUNET_FOLDS))
    assert load_or_create_splits(dataset, n_folds=4) == NNUNET_FOLDS
    assert not (dataset.root / "splits.json").exists()  # nothing written next to nnU-Net's file

    # both present with the same folds (ids in another order): fine; different folds: both files named
    reordered = [{"train": fold["train"][::-1], "val": fold["val"][::-1]} for fold in NNUNET_FOLDS]
    (dataset.root / "splits.json").write_text(json.dumps(reordered))
    assert load_or_create_splits(dataset) == reordered
    (dataset.root / "splits.json").write_text(json.dumps(make_splits(CASES, n_folds=2)))
    with pytest.raises(DataError) as info:
        load_or_create_splits(dataset)
    message = str(info.value)
    assert str(dataset.root / "splits.json") in message and str(dataset.root / "splits_final.json") in message
    assert "different folds" in message


def test_dataset_without_either_file_makes_splits_json(tmp_path):
    dataset = tiny_dataset(tmp_path / "ds")
    assert load_or_create_splits(dataset, n_folds=2) == make_splits(CASES, n_folds=2)
    assert json.loads((dataset.root / "splits.json").read_text()) == make_splits(CASES, n_folds=2)
    assert not (dataset.root / "splits_final.json").exists()


def test_invalid_splits_final_is_refused_naming_it(tmp_path):
    dataset = tiny_dataset(tmp_path / "ds")
    path = dataset.root / "splits_final.json"
    path.write_text(json.dumps([{"train": ["a", "ghost"], "val": ["b"]}]))
    with pytest.raises(DataError, match=r"splits_final.json: fold 0: unknown case id\(s\) \['ghost'\]"):
        load_or_create_splits(dataset)
    path.write_text('{"train": [], "val": []}')
    with pytest.raises(DataError, match="splits_final.json: expected a non-empty list"):
        load_or_create_splits(dataset)
    path.write_text("[{")
    with pytest.raises(DataError, match="splits_final.json"):
        load_or_create_splits(dataset)
    assert not (dataset.root / "splits.json").exists()


@pytest.fixture(params=["file", "memory"])
def store(request, tmp_path):
    """A store of the four cases in a local folder, and in memory (read and written through the store)."""
    location = tmp_path / "store" if request.param == "file" else f"memory://test-{uuid.uuid4().hex}"
    store = CaseStore(location)
    for case in CASES:
        store.write_case(case, np.zeros((1, 2, 2, 2), np.float32), None, {})
    return store


def test_store_uses_splits_final_when_splits_json_is_absent(store):
    store.write_json("splits_final.json", NNUNET_FOLDS)
    assert store_fold(store, 0) == NNUNET_FOLDS[0] and store_fold(store, 1) == NNUNET_FOLDS[1]
    assert store.read_json("splits.json") is None
    with pytest.raises(ConfigError, match=r"fold 2 does not exist: .*splits_final.json has folds 0..1"):
        store_fold(store, 2)


def test_store_without_either_file_writes_splits_json(store):
    assert store_fold(store, 1, n_folds=2) == make_splits(CASES, n_folds=2)[1]
    assert store.read_json("splits.json") == make_splits(CASES, n_folds=2)
    assert store.read_json("splits_final.json") is None


def test_store_with_both_files(store):
    store.write_json("splits_final.json", NNUNET_FOLDS)
    store.write_json("splits.json", NNUNET_FOLDS)
    assert store_fold(store, 1) == NNUNET_FOLDS[1]
    store.write_json("splits.json", make_splits(CASES, n_folds=2))
    with pytest.raises(DataError) as info:
        store_fold(store, 0)
    message = str(info.value)
    assert store.location("splits.json") in message and store.location("splits_final.json") in message
    assert store.read_json("splits.json") == make_splits(CASES, n_folds=2)  # neither file touched


def test_store_refuses_an_invalid_splits_final_naming_it(store):
    store.write_json("splits_final.json", [{"train": ["a"], "val": ["a", "ghost"]}])
    with pytest.raises(DataError) as info:
        store_fold(store, 0)
    message = str(info.value)
    assert message.startswith(store.location("splits_final.json") + ": ")
    assert "unknown case id(s) ['ghost']" in message and "case(s) ['a'] are in both train and val" in message
    assert store.read_json("splits.json") is None
