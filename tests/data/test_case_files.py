"""Finding cases in a folder by file name: image cases with channel suffixes, and label files."""

import pytest

from medseg_jax.data.case_files import find_image_cases, find_label_files, nifti_stem
from medseg_jax.errors import DataError


def _touch(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


def test_nifti_stem():
    assert nifti_stem("case.nii.gz") == "case" and nifti_stem("a.b.nii") == "a.b"
    assert nifti_stem("case.nrrd") is None and nifti_stem(".nii.gz") is None


def test_image_cases_group_channels_in_order_and_skip_hidden_and_other_files(tmp_path):
    _touch(tmp_path, "b_0001.nii.gz", "b_0000.nii.gz", "a_0001.nii", "a_0000.nii.gz", "._a_0000.nii.gz", "notes.txt")
    cases = find_image_cases(tmp_path, 2)
    assert list(cases) == ["a", "b"]
    assert [p.name for p in cases["a"]] == ["a_0000.nii.gz", "a_0001.nii"]
    assert [p.name for p in cases["b"]] == ["b_0000.nii.gz", "b_0001.nii.gz"]


def test_image_cases_refuse_names_and_channel_sets_that_do_not_fit(tmp_path):
    _touch(tmp_path / "mixed", "a_0000.nii.gz", "a.nii.gz")
    with pytest.raises(DataError, match=r"a\.nii\.gz: expected nnU-Net naming"):
        find_image_cases(tmp_path / "mixed", 1)
    _touch(tmp_path / "gap", "a_0000.nii.gz", "a_0002.nii.gz")
    with pytest.raises(DataError, match=r"case a in .*gap: found channel\(s\) \['0000', '0002'\], the plan expects 2"):
        find_image_cases(tmp_path / "gap", 2)
    _touch(tmp_path / "empty", "notes.txt")
    with pytest.raises(DataError, match="no NIfTI files to predict"):
        find_image_cases(tmp_path / "empty", 1)
    with pytest.raises(DataError, match="not a folder"):
        find_image_cases(tmp_path / "missing", 1)


def test_label_files_one_per_case(tmp_path):
    _touch(tmp_path, "b.nii", "a.nii.gz", ".a.nii.gz", "a_0000.txt")
    (tmp_path / "folder.nii.gz").mkdir()  # not a file
    assert {case: path.name for case, path in find_label_files(tmp_path).items()} == {"a": "a.nii.gz", "b": "b.nii"}
    _touch(tmp_path, "a.nii")
    with pytest.raises(DataError, match=r"case 'a' has two files \(a\.nii, a\.nii\.gz\)"):
        find_label_files(tmp_path)
    with pytest.raises(DataError, match="folder not found"):
        find_label_files(tmp_path / "missing")
