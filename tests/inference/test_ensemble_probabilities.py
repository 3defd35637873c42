"""``medseg-jax ensemble``: averages of saved probabilities checked against numpy, and every bad input refused."""

import json
import zipfile

import nibabel as nib
import numpy as np
import pytest

from medseg_jax.cli import main
from medseg_jax.errors import DataError
from medseg_jax.inference.ensemble_probabilities import ensemble_folders, read_probability_file
from medseg_jax.inference.restore import running_argmax

LABELS = {"background": 0, "organ": 1, "lesion": 2}
AFFINE = np.array([[-1.5, 0, 0, 10.0], [0, 1.5, 0, -4.0], [0, 0, 3.0, 2.5], [0, 0, 0, 1]])


def random_probabilities(seed, shape=(4, 3, 2), classes=3):
    """Class probabilities ``(classes, *shape)`` float32 that sum to 1 per voxel."""
    scores = np.random.default_rng(seed).random((classes, *shape)).astype(np.float32)
    return scores / scores.sum(axis=0)


def write_npz(folder, case, probabilities, affine=AFFINE, labels=LABELS):
    """``{case}.npz`` as ``predict --save-probabilities`` writes it (``labels=None``: an older file)."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"probabilities": probabilities, "affine": affine}
    if labels is not None:
        arrays["labels"] = np.asarray(json.dumps(labels))
    path = folder / f"{case}.npz"
    np.savez_compressed(path, **arrays)
    return path


def inputs(tmp_path, folders=3, cases=("a", "b")):
    """``folders`` input folders holding random probabilities of ``cases``; returns (folders, {case: arrays})."""
    paths = [tmp_path / f"model{i}" for i in range(folders)]
    arrays = {case: [random_probabilities(10 * c + i) for i in range(folders)] for c, case in enumerate(cases)}
    for case, per_folder in arrays.items():
        for folder, probabilities in zip(paths, per_folder):
            write_npz(folder, case, probabilities)
    return paths, arrays


def nothing_in(folder):
    return not folder.exists() or not any(folder.iterdir())


def test_the_average_and_its_arg_max_match_numpy(tmp_path):
    folders, arrays = inputs(tmp_path)
    summary = ensemble_folders(folders, tmp_path / "out", save_probabilities=True, progress=False)
    assert summary == {"cases": 2, "inputs": 3, "classes": 3, "labels": LABELS, "unlabelled_files": 0}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.nii.gz", "a.npz", "b.nii.gz", "b.npz"]
    for case, per_folder in arrays.items():
        expected = np.mean(np.stack(per_folder).astype(np.float64), axis=0)
        with np.load(tmp_path / "out" / f"{case}.npz") as saved:
            assert saved["probabilities"].dtype == np.float32 and saved["probabilities"].shape == (3, 4, 3, 2)
            np.testing.assert_allclose(saved["probabilities"], expected, rtol=1e-6)
            np.testing.assert_array_equal(saved["affine"], AFFINE)
            assert json.loads(saved["labels"].item()) == LABELS
        image = nib.load(tmp_path / "out" / f"{case}.nii.gz")
        assert image.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(np.asarray(image.dataobj), np.argmax(expected, axis=0))
        np.testing.assert_allclose(image.affine, AFFINE, atol=1e-6)


def test_two_inputs_average_exactly_as_nnunet_and_the_output_can_be_ensembled_again(tmp_path):
    # nnU-Net: float32 sum in input order, then divided by the number of inputs; a 2D case on the way
    a, b, c = (random_probabilities(seed, shape=(5, 4), classes=2) for seed in (1, 2, 3))
    for folder, probabilities in zip(("x", "y", "z"), (a, b, c)):
        write_npz(tmp_path / folder, "slice", probabilities, labels={"background": 0, "organ": 1})
    ensemble_folders([tmp_path / "x", tmp_path / "y"], tmp_path / "xy", save_probabilities=True, progress=False)
    with np.load(tmp_path / "xy" / "slice.npz") as saved:
        np.testing.assert_array_equal(saved["probabilities"], (a + b) / np.float32(2))
    ensemble_folders([tmp_path / "xy", tmp_path / "z"], tmp_path / "xyz", progress=False)
    assert sorted(p.name for p in (tmp_path / "xyz").iterdir()) == ["slice.nii.gz"]
    label = np.asarray(nib.load(tmp_path / "xyz" / "slice.nii.gz").dataobj)
    np.testing.assert_array_equal(label, np.argmax(((a + b) / 2 + c) / 2, axis=0))


def test_running_argmax_gives_ties_to_the_lower_class_as_numpy():
    maps = [np.array([0.2, 0.5, 0.3]), np.array([0.5, 0.5, 0.1]), np.array([0.3, 0.0, 0.6])]
    np.testing.assert_array_equal(running_argmax(iter(maps)), np.argmax(np.stack(maps), axis=0))
    assert running_argmax(iter(maps)).tolist() == [1, 0, 2]


def test_files_without_labels_are_checked_by_their_number_of_classes_only(tmp_path):
    p, q = random_probabilities(1), random_probabilities(2)
    write_npz(tmp_path / "old", "a", p, labels=None)
    write_npz(tmp_path / "new", "a", q)
    summary = ensemble_folders([tmp_path / "old", tmp_path / "new"], tmp_path / "out", True, progress=False)
    assert summary["unlabelled_files"] == 1 and summary["labels"] == LABELS
    with np.load(tmp_path / "out" / "a.npz") as saved:  # the label set of the file that has one
        assert json.loads(saved["labels"].item()) == LABELS
    write_npz(tmp_path / "older", "a", p[:2] / p[:2].sum(axis=0), labels=None)
    with pytest.raises(DataError, match=r"different numbers of classes: .*old/a\.npz has 3, .*older/a\.npz has 2"):
        ensemble_folders([tmp_path / "old", tmp_path / "older"], tmp_path / "out2", progress=False)
    assert nothing_in(tmp_path / "out2")


def test_the_cli_writes_the_ensemble_and_prints_a_summary(tmp_path, capsys):
    folders, _ = inputs(tmp_path, folders=2, cases=("a",))
    write_npz(tmp_path / "old", "a", random_probabilities(5), labels=None)
    argv = ["ensemble", "--inputs", *map(str, folders), str(tmp_path / "old"), "--out", str(tmp_path / "out")]
    assert main([*argv, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "note: 1 file(s) hold no label set" in out
    assert "ensembled 1 case(s) of 3 inputs (3 classes)" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.nii.gz"]


def test_the_cli_exits_2_naming_the_problem(tmp_path, capsys):
    folders, _ = inputs(tmp_path, folders=2, cases=("a",))
    assert main(["ensemble", "--inputs", str(folders[0]), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "error: an ensemble needs at least 2 input folders, got 1" in capsys.readouterr().err
    assert main(["ensemble", "-i", *map(str, folders), "-o", str(folders[1]), "--quiet"]) == 2
    assert f"error: --out {folders[1]} is one of the input folders" in capsys.readouterr().err
    assert nothing_in(tmp_path / "out")


def _missing_case(tmp_path, folders):
    (folders[1] / "b.npz").unlink()
    (folders[2] / "a.npz").unlink()
    return r"same cases: .*model1 lacks b; .*model2 lacks a$"


def _no_npz(tmp_path, folders):
    empty = tmp_path / "empty"
    (empty / "c.nii.gz").parent.mkdir()
    (empty / "c.nii.gz").write_bytes(b"")
    folders[1] = empty
    return r"empty: no \.npz probability files; predict with --save-probabilities"


def _labels(tmp_path, folders):
    write_npz(folders[2], "b", random_probabilities(7), labels={"background": 0, "liver": 1, "tumour": 2})
    return r"different label sets: .*model0/b\.npz has .*organ.*, .*model2/b\.npz has .*liver"


def _classes(tmp_path, folders):
    write_npz(folders[1], "b", random_probabilities(7, classes=4), labels={**LABELS, "vessel": 3})
    return r"different numbers of classes: .*model0/b\.npz has 3, .*model1/b\.npz has 4"


def _shape(tmp_path, folders):
    write_npz(folders[1], "b", random_probabilities(7, shape=(4, 3, 3)))
    return r"different scan shapes: .*model0/b\.npz has \(4, 3, 2\), .*model1/b\.npz has \(4, 3, 3\)"


def _affine(tmp_path, folders):
    write_npz(folders[1], "a", random_probabilities(7), affine=AFFINE + np.diag([0, 0, 0.0005, 0]))  # within 1e-3
    write_npz(folders[2], "b", random_probabilities(7), affine=AFFINE + np.diag([0, 0.002, 0, 0]))
    return r"affines differ by up to 0\.002 mm \(more than 0\.001\): .*model0/b\.npz .* vs .*model2/b\.npz"


def _truncated(tmp_path, folders):
    data = (folders[2] / "b.npz").read_bytes()
    (folders[2] / "b.npz").write_bytes(data[: len(data) // 2])
    return r"model2/b\.npz: not a valid \.npz file, it may be truncated .*predict --save-probabilities"


def _foreign(tmp_path, folders):
    np.savez(folders[1] / "b.npz", data=np.zeros(3))
    return r"model1/b\.npz: has no affine or probabilities array \(members: data\.npy\)"


def _bad_labels(tmp_path, folders):
    write_npz(folders[1], "b", random_probabilities(7), labels={"background": 0, "organ": 1, "lesion": 3})
    return r"model1/b\.npz: labels .* name values outside the 3 stored classes"


def _twice(tmp_path, folders):
    (tmp_path / "link").symlink_to(folders[0], target_is_directory=True)
    folders[2] = tmp_path / "link"
    return r"link: input folder given twice \(as .*model0\)"


@pytest.mark.parametrize(
    "break_inputs",
    [_missing_case, _no_npz, _labels, _classes, _shape, _affine, _truncated, _foreign, _bad_labels, _twice],
    ids=lambda f: f.__name__.strip("_"),
)
def test_bad_inputs_are_refused_before_anything_is_written(tmp_path, break_inputs):
    folders, _ = inputs(tmp_path)  # cases a and b: b, checked after a, is the broken one
    message = break_inputs(tmp_path, folders)
    with pytest.raises(DataError, match=message):
        ensemble_folders(folders, tmp_path / "out", save_probabilities=True, progress=False)
    assert not (tmp_path / "out").exists()


def test_corrupted_voxels_stop_the_run_with_the_cases_before_written_and_nothing_of_that_case(tmp_path):
    for folder in ("x", "y"):
        write_npz(tmp_path / folder, "a", random_probabilities(1))
        # big enough that the voxels are read only while writing, after the checks of the headers
        write_npz(tmp_path / folder, "b", random_probabilities(2, shape=(12, 10, 10)))
    path = tmp_path / "y" / "b.npz"
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("probabilities.npy")
    data = bytearray(path.read_bytes())  # flip bytes inside the compressed probabilities, keep the zip index
    start = info.header_offset + info.compress_size // 2
    data[start : start + 8] = bytes(255 - x for x in data[start : start + 8])
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"y/b\.npz: .*predict --save-probabilities"):
        ensemble_folders([tmp_path / "x", tmp_path / "y"], tmp_path / "out", save_probabilities=True, progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.nii.gz", "a.npz"]


def test_the_header_reader_refuses_a_file_that_is_not_a_zip(tmp_path):
    (tmp_path / "x.npz").write_bytes(b"not a zip at all")
    with pytest.raises(DataError, match=r"x\.npz: not a valid \.npz file"):
        read_probability_file(tmp_path / "x.npz")


def test_real_predictions_of_two_models_are_averaged(tmp_path):
    from medseg_jax.data.image_io import write_nifti
    from medseg_jax.data.volume import Volume
    from medseg_jax.inference.predict import predict_path
    from tests.inference.test_predict import NO_TTA, threshold_model, tiny_plan

    array = np.random.default_rng(0).normal(size=(12, 10, 8)).astype(np.float32)
    scan = write_nifti(Volume(array, AFFINE), tmp_path / "scan_0000.nii.gz")
    model, params = threshold_model(3)
    # a second "model": softer, and class 1 only above a higher threshold, so that the two disagree on some voxels
    kernel, bias = params["params"]["kernel"], params["params"]["bias"]
    softer = {"params": {"kernel": kernel * 0.2, "bias": bias - np.array([0.0, 1.0, 0.0], np.float32)}}
    for name, weights in (("sharp", params), ("soft", softer)):
        predict_path(scan, tmp_path / name, model, weights, tiny_plan("MR"), NO_TTA, save_probabilities=True)
    ensemble_folders([tmp_path / "sharp", tmp_path / "soft"], tmp_path / "out", progress=False)
    saved = []
    for name in ("sharp", "soft"):
        with np.load(tmp_path / name / "scan.npz") as npz:
            assert json.loads(npz["labels"].item()) == LABELS
            saved.append(npz["probabilities"])
    labels = [np.asarray(nib.load(tmp_path / name / "scan.nii.gz").dataobj) for name in ("sharp", "soft")]
    assert (labels[0] != labels[1]).any()
    label = nib.load(tmp_path / "out" / "scan.nii.gz")
    np.testing.assert_array_equal(np.asarray(label.dataobj), np.argmax((saved[0] + saved[1]) / 2, axis=0))
    np.testing.assert_allclose(label.affine, nib.load(scan).affine, atol=1e-5)
