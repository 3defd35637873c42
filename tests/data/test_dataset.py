import dataclasses
import json
import os

import nibabel as nib
import numpy as np
import pytest

from medseg_jax.data.dataset import (
    Case,
    load_dataset,
    load_or_create_splits,
    make_splits,
    validate_dataset,
)
from medseg_jax.data.image_io import write_nifti
from medseg_jax.data.volume import Volume
from medseg_jax.errors import DataError, DatasetValidationError

SHAPE = (8, 8, 4)
AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])


def _write(path, array=None, affine=AFFINE, dtype=np.int16):
    array = np.zeros(SHAPE, dtype) if array is None else array
    write_nifti(Volume(array, affine), path)


def _label(values=(0, 1)):
    array = np.zeros(SHAPE, np.uint8)
    array.flat[: len(values)] = values
    return array


def _make_nnunet(root, case_ids=("a", "b", "c"), channels=("CT",), num_training=None, **extra):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    meta = {
        "channel_names": {str(i): name for i, name in enumerate(channels)},
        "labels": {"background": 0, "liver": 1, "tumour": 2},
        "numTraining": len(case_ids) if num_training is None else num_training,
        "file_ending": ".nii.gz",
        **extra,
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    for case_id in case_ids:
        for channel in range(len(channels)):
            _write(root / "imagesTr" / f"{case_id}_{channel:04d}.nii.gz")
        _write(root / "labelsTr" / f"{case_id}.nii.gz", _label((0, 1, 2)), dtype=np.uint8)
    return root


def _make_msd(root, training, modality=None):
    meta = {
        "name": "Liver",
        "modality": modality or {"0": "CT"},
        "labels": {"0": "background", "1": "liver", "2": "cancer"},
        "numTraining": len(training),
        "training": training,
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _msd_entry(root, case_id, write=True):
    if write:
        _write(root / "imagesTr" / f"{case_id}.nii.gz")
        _write(root / "labelsTr" / f"{case_id}.nii.gz", _label(), dtype=np.uint8)
    return {"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"}


def _problems(dataset, **kwargs):
    with pytest.raises(DatasetValidationError) as info:
        validate_dataset(dataset, **kwargs)
    assert str(dataset.root) in str(info.value)
    return info.value.problems


def _has(problems, *parts):
    return any(all(part in problem for part in parts) for problem in problems)


# --- loading --------------------------------------------------------------------------------------


def test_load_nnunet_v2_two_channels(tmp_path):
    root = _make_nnunet(tmp_path / "Dataset002_Two", case_ids=("c", "a", "b"), channels=("T1", "T2"))
    (root / "imagesTr" / "._a_0000.nii.gz").write_bytes(b"macOS resource fork")  # hidden: ignored
    dataset = load_dataset(root)
    assert dataset.name == "Dataset002_Two" and dataset.layout == "nnunetv2"
    assert dataset.channel_names == ["T1", "T2"]
    assert dataset.labels == {"background": 0, "liver": 1, "tumour": 2}
    assert dataset.file_ending == ".nii.gz" and dataset.num_training == 3
    assert dataset.case_ids == ["a", "b", "c"]
    case = dataset.cases[0]
    assert case.image_paths == (root / "imagesTr" / "a_0000.nii.gz", root / "imagesTr" / "a_0001.nii.gz")
    assert case.label_path == root / "labelsTr" / "a.nii.gz"
    validate_dataset(dataset)


def test_load_nnunet_v2_listed_cases(tmp_path):
    root = _make_nnunet(tmp_path / "ds", case_ids=("a",))
    listing = {"x": {"images": ["imagesTr/a_0000.nii.gz"], "label": "labelsTr/a.nii.gz"}}
    meta = json.loads((root / "dataset.json").read_text()) | {"dataset": listing}
    (root / "dataset.json").write_text(json.dumps(meta))
    dataset = load_dataset(root)
    assert dataset.layout == "nnunetv2_listed" and dataset.case_ids == ["x"]
    validate_dataset(dataset)


def test_load_msd_single_modality(tmp_path):
    root = tmp_path / "Task03_Liver"
    dataset = load_dataset(_make_msd(root, [_msd_entry(root, "liver_1"), _msd_entry(root, "liver_0")]))
    assert dataset.layout == "msd" and dataset.name == "Liver"
    assert dataset.labels == {"background": 0, "liver": 1, "cancer": 2}
    assert dataset.channel_names == ["CT"]
    assert dataset.case_ids == ["liver_1", "liver_0"]
    assert dataset.cases[0].image_paths == (root / "imagesTr" / "liver_1.nii.gz",)
    validate_dataset(dataset)


def test_msd_multi_modal_is_rejected_clearly(tmp_path):
    root = _make_msd(
        tmp_path / "Task01", [_msd_entry(tmp_path / "Task01", "b", write=False)], modality={"0": "FLAIR", "1": "T1w"}
    )
    with pytest.raises(DataError, match="2 modalities.*4D.*nnU-Net v2"):
        load_dataset(root)


def test_msd_4d_image_is_reported_by_validation(tmp_path):
    root = tmp_path / "Task01"
    entry = _msd_entry(root, "b")
    nib.save(nib.Nifti1Image(np.zeros((*SHAPE, 2), np.int16), AFFINE), root / "imagesTr" / "b.nii.gz")
    problems = _problems(load_dataset(_make_msd(root, [entry])))
    assert problems == [
        "case b: image channel 0 imagesTr/b.nii.gz has shape (8, 8, 4, 2); expected a 2D "
        "or 3D volume (one file per channel)"
    ]


def test_missing_or_malformed_dataset_json(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    with pytest.raises(DataError, match="dataset.json: file not found"):
        load_dataset(root)
    (root / "dataset.json").write_text('{"channel_names": {"0": "CT"},')
    with pytest.raises(DataError, match="dataset.json: not valid JSON \\(line 1"):
        load_dataset(root)
    (root / "dataset.json").write_text('{"labels": {"background": 0}}')
    with pytest.raises(DataError, match="neither field 'channel_names'.*nor 'modality'"):
        load_dataset(root)
    (root / "dataset.json").write_text('{"channel_names": {"0": "CT", "2": "PET"}, "numTraining": "3"}')
    with pytest.raises(DatasetValidationError) as info:
        load_dataset(root)
    problems = info.value.problems
    assert len(problems) == 4
    assert _has(problems, "dataset.json", "'channel_names'", '"0".."1"')
    assert _has(problems, "dataset.json", "'labels'")
    assert _has(problems, "dataset.json", "'file_ending'")
    assert _has(problems, "dataset.json", "'numTraining'", "'3'")


def test_region_based_labels_and_unsupported_file_ending(tmp_path):
    root = _make_nnunet(tmp_path / "ds", labels={"background": 0, "whole": [1, 2]}, file_ending=".png")
    with pytest.raises(DatasetValidationError) as info:
        load_dataset(root)
    assert _has(info.value.problems, "region-based", "whole")
    assert _has(info.value.problems, "file_ending '.png' is not supported")


def test_regions_class_order_the_ignore_label_and_non_nifti_msd_labels_are_refused(tmp_path):
    # nnU-Net features that would otherwise be trained and evaluated as ordinary classes
    root = _make_nnunet(tmp_path / "ds", regions_class_order=[1, 2])
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"]["ignore"] = 3
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetValidationError) as info:
        load_dataset(root)
    assert _has(info.value.problems, "dataset.json: field 'regions_class_order'", "not supported")
    assert _has(info.value.problems, "dataset.json: field 'labels'", "'ignore' label", "not supported")
    msd = _make_msd(tmp_path / "msd", [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.mha"}])
    with pytest.raises(DatasetValidationError) as info:
        load_dataset(msd)
    assert _has(info.value.problems, "training[0]", "label './labelsTr/a.mha' is not a .nii.gz or .nii file")


# --- validation -----------------------------------------------------------------------------------


def test_validation_reports_every_problem_at_once(tmp_path):
    root = _make_nnunet(
        tmp_path / "ds", case_ids=("a", "b", "c", "d", "e", "f"), channels=("CT", "PET"), num_training=7
    )
    (root / "labelsTr" / "b.nii.gz").unlink()
    (root / "imagesTr" / "c_0001.nii.gz").unlink()
    _write(root / "imagesTr" / "d_0001.nii.gz", np.zeros((8, 8, 5), np.int16))
    _write(root / "labelsTr" / "e.nii.gz", _label(), affine=AFFINE + _shift(0.5))
    _write(root / "labelsTr" / "a.nii.gz", _label(), affine=AFFINE + _shift(1e-5))  # within tolerance
    _write(root / "labelsTr" / "f.nii.gz", _label((0, 7, 1)), dtype=np.uint8)
    _write(root / "imagesTr" / "a_0002.nii.gz")  # a channel nobody declared
    problems = _problems(load_dataset(root))
    assert _has(problems, "case b:", "label file missing", "labelsTr/b.nii.gz")
    assert _has(problems, "case c:", "image channel 1 file missing", "imagesTr/c_0001.nii.gz")
    assert _has(problems, "case d:", "imagesTr/d_0001.nii.gz", "(8, 8, 5)", "(8, 8, 4)")
    assert _has(problems, "case e:", "labelsTr/e.nii.gz affine differs", "0.5")
    assert _has(problems, "case f:", "labelsTr/f.nii.gz", "[7]", "not declared")
    assert _has(problems, "numTraining is 7 but 6 case(s)")
    assert _has(problems, "imagesTr/a_0002.nii.gz", "belongs to no case")
    assert len(problems) == 7, problems

    geometry_off = _problems(load_dataset(root), check_geometry=False, check_labels=False)
    assert len(geometry_off) == 4
    assert not _has(geometry_off, "case d:") and not _has(geometry_off, "case f:")


def _shift(mm):
    shift = np.zeros((4, 4))
    shift[:3, 3] = mm
    return shift


def test_non_integer_label_values_are_reported(tmp_path):
    root = _make_nnunet(tmp_path / "ds", case_ids=("a",))
    _write(root / "labelsTr" / "a.nii.gz", np.full(SHAPE, 0.5, np.float32))
    assert _problems(load_dataset(root)) == ["case a: label labelsTr/a.nii.gz contains non-integer values"]


def test_channel_count_and_missing_label_on_a_hand_built_dataset(tmp_path):
    dataset = load_dataset(_make_nnunet(tmp_path / "ds", case_ids=("a", "b"), channels=("CT", "PET")))
    a, b = dataset.cases
    broken = dataclasses.replace(
        dataset, cases=[Case("a", a.image_paths[:1], a.label_path), Case("b", b.image_paths, None)]
    )
    problems = _problems(broken)
    assert problems == [
        "case a: 1 image file(s) but the dataset declares 2 channel(s) ['CT', 'PET']",
        "case b: no label file",
        "imagesTr/a_0001.nii.gz: belongs to no case (expected {case}_{XXXX}.nii.gz with XXXX below 2)",
    ]


# --- paths outside the folder and duplicates ------------------------------------------------------


def test_path_traversal_is_rejected(tmp_path):
    root = tmp_path / "Task03_Liver"
    _write(tmp_path / "outside.nii.gz")
    entry = {"image": "../outside.nii.gz", "label": "./labelsTr/x.nii.gz"}
    with pytest.raises(DatasetValidationError) as info:
        load_dataset(_make_msd(root, [_msd_entry(root, "ok"), entry]))
    assert info.value.problems == [
        f"case outside: image channel 0 {root / '../outside.nii.gz'} lies outside the dataset folder"
    ]


def test_listed_absolute_path_outside_is_rejected(tmp_path):
    root = _make_nnunet(tmp_path / "ds", case_ids=("a",))
    _write(tmp_path / "elsewhere.nii.gz")
    listing = {"a": {"images": [str(tmp_path / "elsewhere.nii.gz")], "label": "labelsTr/a.nii.gz"}}
    meta = json.loads((root / "dataset.json").read_text()) | {"dataset": listing}
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetValidationError, match="case a: image channel 0 .*elsewhere.nii.gz lies outside"):
        load_dataset(root)


def test_symbolic_links_leaving_the_folder_are_rejected(tmp_path):
    root = _make_nnunet(tmp_path / "ds", case_ids=("a", "b"))
    (root / "store").mkdir()
    os.replace(root / "imagesTr" / "b_0000.nii.gz", root / "store" / "b.nii.gz")
    os.symlink(root / "store" / "b.nii.gz", root / "imagesTr" / "b_0000.nii.gz")  # inside: fine
    dataset = load_dataset(root)
    validate_dataset(dataset)

    os.replace(root / "imagesTr" / "a_0000.nii.gz", tmp_path / "a.nii.gz")
    os.symlink(tmp_path / "a.nii.gz", root / "imagesTr" / "a_0000.nii.gz")
    expected = "case a: image channel 0 imagesTr/a_0000.nii.gz (a symbolic link) lies outside the dataset folder"
    assert _problems(dataset) == [expected]  # the Dataset was loaded before the link changed
    with pytest.raises(DatasetValidationError) as info:
        load_dataset(root)
    assert info.value.problems == [expected]


def test_duplicated_case_ids_are_rejected(tmp_path):
    root = tmp_path / "Task03_Liver"
    entry = _msd_entry(root, "liver_0")
    with pytest.raises(DatasetValidationError) as info:
        load_dataset(_make_msd(root, [entry, _msd_entry(root, "liver_1"), entry]))
    assert info.value.problems == ["case liver_0: case id appears 2 times"]


# --- splits ---------------------------------------------------------------------------------------


def test_make_splits_is_deterministic_disjoint_and_covering():
    ids = [f"case_{i:02d}" for i in range(12)]
    splits = make_splits(reversed(ids), n_folds=5)
    assert splits == make_splits(ids, n_folds=5)
    assert [len(fold["val"]) for fold in splits] == [3, 3, 2, 2, 2]
    assert sorted(case for fold in splits for case in fold["val"]) == ids
    for fold in splits:
        assert sorted(fold["train"] + fold["val"]) == ids
        assert not set(fold["train"]) & set(fold["val"])
        assert fold["train"] == sorted(fold["train"])
    assert make_splits(ids, n_folds=5, seed=1) != splits


def test_make_splits_matches_kfold_shuffle_order():
    # scikit-learn's KFold(5, shuffle=True, random_state=12345), as nnU-Net v2 uses it on sorted ids:
    # RandomState(12345).shuffle(arange(10)) cut into consecutive folds of 2.
    permutation = np.arange(10)
    np.random.RandomState(12345).shuffle(permutation)
    ids = [f"c{i}" for i in range(10)]
    assert [fold["val"] for fold in make_splits(ids)] == [
        [ids[i] for i in permutation[start : start + 2]] for start in range(0, 10, 2)
    ]


def test_make_splits_rejects_bad_requests():
    with pytest.raises(DataError, match="cannot make 5 folds from 3 case"):
        make_splits(["a", "b", "c"])
    with pytest.raises(DataError, match="duplicated case ids \\['a'\\]"):
        make_splits(["a", "a", "b"], n_folds=2)
    with pytest.raises(DataError, match="n_folds"):
        make_splits(["a", "b"], n_folds=1)


def test_splits_file_round_trip(tmp_path):
    dataset = load_dataset(_make_nnunet(tmp_path / "ds", case_ids=tuple("abcdef")))
    splits = load_or_create_splits(dataset, n_folds=3)
    path = dataset.root / "splits.json"
    assert json.loads(path.read_text()) == splits == make_splits(dataset.case_ids, n_folds=3)
    assert load_or_create_splits(dataset, n_folds=5) == splits  # an existing file wins
    custom = [{"train": ["a", "b", "c"], "val": ["d"]}]
    path.write_text(json.dumps(custom))
    assert load_or_create_splits(dataset) == custom
    assert sorted(p.name for p in dataset.root.iterdir()) == ["dataset.json", "imagesTr", "labelsTr", "splits.json"]


def test_splits_file_naming_unknown_cases_is_rejected(tmp_path):
    dataset = load_dataset(_make_nnunet(tmp_path / "ds", case_ids=("a", "b")))
    path = dataset.root / "splits.json"
    text = json.dumps([{"train": ["a", "ghost"], "val": ["b"]}, {"train": ["a"], "val": ["a"]}])
    path.write_text(text)
    with pytest.raises(DataError) as info:
        load_or_create_splits(dataset)
    message = str(info.value)
    assert str(path) in message
    assert "fold 0: unknown case id(s) ['ghost']" in message
    assert "fold 1: case(s) ['a'] are in both train and val" in message
    assert path.read_text() == text
    path.write_text('{"train": []}')
    with pytest.raises(DataError, match="splits.json: expected a non-empty list"):
        load_or_create_splits(dataset)


def test_too_few_cases_for_splits_writes_nothing(tmp_path):
    dataset = load_dataset(_make_nnunet(tmp_path / "ds", case_ids=("a", "b")))
    with pytest.raises(DataError, match="cannot make 5 folds from 2"):
        load_or_create_splits(dataset)
    assert not (dataset.root / "splits.json").exists()
    assert not [p for p in dataset.root.iterdir() if p.name.startswith(".")]
