import json

import nibabel as nib
import numpy as np
import pytest

from medseg_jax.data.dataset import load_dataset, validate_dataset
from medseg_jax.data.image_io import read_nifti
from medseg_jax.data.synthetic import (
    DEFAULT_DATASET_NAME,
    make_ct_phantom,
    write_synthetic_dataset,
)
from medseg_jax.errors import DataError

SMALL = (32, 32, 16)


def _world_centroid(volume, mask):
    index = np.argwhere(mask).mean(axis=0)
    return (volume.affine @ np.r_[index, 1.0])[:3]


def test_phantom_is_deterministic_for_a_seed():
    image_a, label_a = make_ct_phantom(3)
    image_b, label_b = make_ct_phantom(3)
    np.testing.assert_array_equal(image_a.array, image_b.array)
    np.testing.assert_array_equal(label_a.array, label_b.array)
    np.testing.assert_array_equal(image_a.affine, image_b.affine)
    image_c, _ = make_ct_phantom(4)
    assert image_c.shape != image_a.shape or not np.array_equal(image_c.array, image_a.array)


def test_phantom_dtypes_labels_and_shared_geometry():
    image, label = make_ct_phantom(0)
    assert image.array.dtype == np.int16 and label.array.dtype == np.uint8
    assert sorted(image.shape) == sorted((64, 64, 32))
    assert image.shape == label.shape
    np.testing.assert_array_equal(image.affine, label.affine)
    assert set(np.unique(label.array).tolist()) <= {0, 1, 2}
    assert (label.array == 1).sum() > 1000  # a liver a network can learn from


def test_tumours_lie_inside_the_liver_and_leave_the_anatomy_unchanged():
    for seed in (0, 5):
        _, healthy = make_ct_phantom(seed, SMALL, num_tumours=0)
        _, sick = make_ct_phantom(seed, SMALL, num_tumours=3)
        assert not (healthy.array == 2).any()
        assert (sick.array == 2).any()
        # Same anatomy: the liver with its tumours is exactly the healthy liver.
        np.testing.assert_array_equal(sick.array > 0, healthy.array == 1)


def test_hounsfield_units_are_plausible_per_tissue():
    for seed in range(4):
        image, label = make_ct_phantom(seed)
        hu, lab = image.array.astype(float), label.array
        assert 30 < hu[lab == 1].mean() < 90, "liver"
        ends = (slice(0, 4), slice(-4, None))
        corners = [hu[i, j, :] for i in ends for j in ends]  # the body is centred in every orientation
        assert np.mean(corners) < -900, "air outside the body"
        assert hu.max() > 400, "bone"
        body = hu > -500
        fat = (hu > -150) & (hu < -50)
        assert fat.sum() > 0.03 * body.sum(), "subcutaneous and visceral fat"
        assert 5 < hu[lab == 1].std() < 40, "noise and texture"


def test_orientation_varies_but_anatomy_stays_in_place_in_world_space():
    codes = set()
    for seed in range(8):
        image, label = make_ct_phantom(seed, SMALL)
        code = "".join(nib.aff2axcodes(image.affine))
        assert code == image.metadata["orientation"]
        codes.add(code)
        body = _world_centroid(image, image.array > -500)
        liver = _world_centroid(label, label.array > 0)
        bone = _world_centroid(image, image.array > 300)
        assert liver[0] - body[0] > 15, f"seed {seed}: liver not on the patient's right (+x)"
        assert bone[1] - body[1] < -15, f"seed {seed}: spine not posterior (-y)"
    assert len(codes) >= 3


def test_spacing_range_explicit_spacing_and_orientation():
    image, _ = make_ct_phantom(1, spacing_range=((5.0, 7.0), (5.0, 8.0)))
    slice_axis = [c in "SI" for c in nib.aff2axcodes(image.affine)].index(True)
    in_plane = [s for axis, s in enumerate(image.spacing) if axis != slice_axis]
    assert in_plane[0] == pytest.approx(in_plane[1]) and 5.0 <= in_plane[0] <= 7.0
    assert 5.0 <= image.spacing[slice_axis] <= 8.0

    image, label = make_ct_phantom(1, (40, 36, 20), spacing=(6.0, 5.0, 7.0), orientation="LPS")
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
    assert image.shape == (40, 36, 20)
    np.testing.assert_allclose(image.spacing, (6.0, 5.0, 7.0))
    image, _ = make_ct_phantom(1, (40, 36, 20), spacing=(6.0, 5.0, 7.0), orientation="PLI")
    assert image.shape == (36, 40, 20)
    np.testing.assert_allclose(image.spacing, (5.0, 6.0, 7.0))


def test_two_dimensional_phantom_is_one_axial_slice_through_the_liver():
    image, label = make_ct_phantom(2, (48, 48))
    assert image.array.ndim == 2 and image.shape == (48, 48)
    assert image.affine.shape == (4, 4)
    assert (label.array == 1).any()
    assert set(np.unique(label.array).tolist()) <= {0, 1, 2}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"shape": (4, 64, 32)}, "at least 8"),
        ({"orientation": "RRS"}, "axis code"),
        ({"num_tumours": -1}, "num_tumours"),
        ({"spacing": (5.0, 5.0)}, "spacing"),
        ({"spacing_range": ((7.0, 5.0), (5.0, 8.0))}, "spacing_range"),
    ],
)
def test_phantom_rejects_bad_arguments(kwargs, message):
    with pytest.raises(DataError, match=message):
        make_ct_phantom(0, **kwargs)


def test_written_dataset_loads_and_validates(tmp_path):
    root = write_synthetic_dataset(tmp_path, 3, seed=7, shape=SMALL)
    assert root == tmp_path / DEFAULT_DATASET_NAME
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"}
    assert meta["labels"] == {"background": 0, "liver": 1, "tumour": 2}
    assert meta["numTraining"] == 3 and meta["file_ending"] == ".nii.gz"
    dataset = load_dataset(root)
    assert dataset.case_ids == ["synth_000", "synth_001", "synth_002"]
    validate_dataset(dataset)
    assert nib.load(root / "imagesTr" / "synth_000_0000.nii.gz").get_data_dtype() == np.int16
    assert nib.load(root / "labelsTr" / "synth_000.nii.gz").get_data_dtype() == np.uint8
    assert sorted(p.name for p in tmp_path.iterdir()) == [DEFAULT_DATASET_NAME]  # no staging left


def test_rewriting_a_synthetic_dataset_replaces_it(tmp_path):
    root = write_synthetic_dataset(tmp_path, 2, seed=0, shape=SMALL)
    first = read_nifti(root / "imagesTr" / "synth_000_0000.nii.gz").array
    write_synthetic_dataset(tmp_path, 2, seed=0, shape=SMALL)
    np.testing.assert_array_equal(read_nifti(root / "imagesTr" / "synth_000_0000.nii.gz").array, first)
    write_synthetic_dataset(tmp_path, 1, seed=1, shape=SMALL)
    assert not (root / "imagesTr" / "synth_001_0000.nii.gz").exists()
    second = read_nifti(root / "imagesTr" / "synth_000_0000.nii.gz").array
    assert second.shape != first.shape or not np.array_equal(second, first)
    assert sorted(p.name for p in tmp_path.iterdir()) == [DEFAULT_DATASET_NAME]


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    target = tmp_path / DEFAULT_DATASET_NAME
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a synthetic dataset") as info:
        write_synthetic_dataset(tmp_path, 2, shape=SMALL)
    assert str(target) in str(info.value)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    assert (target / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == [DEFAULT_DATASET_NAME]


def test_bad_arguments_write_nothing(tmp_path):
    with pytest.raises(DataError, match="num_cases"):
        write_synthetic_dataset(tmp_path / "raw", 0)
    with pytest.raises(DataError, match="plain folder name"):
        write_synthetic_dataset(tmp_path / "raw", 1, shape=SMALL, name="../escape")
    assert list(tmp_path.iterdir()) == []
