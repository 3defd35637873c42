"""Tests of medseg_jax.data.image_io, .volume and .dicom: NIfTI, reading a case, reorientation, DICOM series."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEGLosslessSV1, generate_uid

from medseg_jax.data.dicom import read_dicom_series
from medseg_jax.data.image_io import read_case, read_image, read_nifti, read_nifti_header, write_nifti
from medseg_jax.data.volume import Volume, affine_problem, array_from_ras, array_to_ras, from_ras, to_ras
from medseg_jax.errors import DataError

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "real"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real scan {path.name} is not available in ../shared/data/real")
    return path


# --- NIfTI ---------------------------------------------------------------------------------------------


def _oblique_affine() -> np.ndarray:
    angle = np.radians(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.7, 0.9, 2.5])
    affine[:3, 3] = [-12.5, 30.25, 7.0]
    return affine


def test_nifti_round_trip_keeps_array_and_affine_and_leaves_no_temp_files(tmp_path):
    array = np.random.default_rng(0).normal(size=(6, 5, 4)).astype(np.float32)
    volume = Volume(array, _oblique_affine())
    for name in ("scan.nii.gz", "scan.nii"):
        written = write_nifti(volume, tmp_path / name)
        back = read_nifti(written)
        assert np.array_equal(back.array, array)
        np.testing.assert_allclose(back.affine, volume.affine, atol=1e-5)  # NIfTI stores float32
        shape, affine = read_nifti_header(written)
        assert shape == (6, 5, 4)
        np.testing.assert_allclose(affine, volume.affine, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.nii", "scan.nii.gz"]


def test_write_nifti_rejects_other_extensions(tmp_path):
    with pytest.raises(DataError, match=r"scan\.nrrd.*\.nii\.gz or \.nii"):
        write_nifti(Volume(np.zeros((2, 2, 2)), np.eye(4)), tmp_path / "scan.nrrd")
    assert list(tmp_path.iterdir()) == []


def test_write_nifti_failure_leaves_no_partial_file(tmp_path):
    (tmp_path / "taken.nii.gz").mkdir()  # a folder where the file should go: the final rename fails
    with pytest.raises(DataError, match=r"taken\.nii\.gz: could not write"):
        write_nifti(Volume(np.zeros((2, 2, 2)), np.eye(4)), tmp_path / "taken.nii.gz")
    assert [p.name for p in tmp_path.iterdir()] == ["taken.nii.gz"]
    assert list((tmp_path / "taken.nii.gz").iterdir()) == []


def test_read_nifti_truncated_or_foreign_file_names_it(tmp_path):
    path = write_nifti(Volume(np.arange(4096, dtype=np.float32).reshape(16, 16, 16), np.eye(4)), tmp_path / "a.nii.gz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"a\.nii\.gz: not a readable NIfTI"):
        read_nifti(path)
    raw = tmp_path / "b.nii"
    raw.write_bytes(gzip.decompress(data)[:400])  # header intact, voxels missing
    with pytest.raises(DataError, match=r"b\.nii: not a readable NIfTI"):
        read_nifti(raw)
    junk = tmp_path / "c.nii.gz"
    junk.write_text("not an image")
    with pytest.raises(DataError, match=r"c\.nii\.gz: not a readable NIfTI"):
        read_nifti_header(junk)
    with pytest.raises(DataError, match=r"missing\.nii\.gz: file not found"):
        read_nifti(tmp_path / "missing.nii.gz")


def test_read_image_dispatches_and_rejects_other_paths(tmp_path):
    path = write_nifti(Volume(np.ones((3, 3, 3), np.float32), np.eye(4)), tmp_path / "x.nii.gz")
    assert read_image(path).shape == (3, 3, 3)
    other = tmp_path / "x.png"
    other.write_bytes(b"\x89PNG")
    with pytest.raises(DataError, match=r"x\.png: unsupported image"):
        read_image(other)
    with pytest.raises(DataError, match=r"nothing: no such file or folder"):
        read_image(tmp_path / "nothing")


def test_read_case_refuses_non_finite_voxels_and_disagreeing_shapes_naming_the_files(tmp_path):
    image = np.zeros((4, 4, 3), np.float32)
    label = np.zeros((4, 4, 3), np.uint8)
    paths = [
        write_nifti(Volume(image, np.eye(4)), tmp_path / "c_0000.nii.gz"),
        write_nifti(Volume(label, np.eye(4)), tmp_path / "c.nii.gz"),
    ]
    images, read_label = read_case(paths[:1], paths[1])
    assert images[0].shape == read_label.shape == (4, 4, 3)
    for value, what in ((np.nan, "image"), (-np.inf, "image")):
        bad = image.copy()
        bad[1, 2, 0] = value
        path = write_nifti(Volume(bad, np.eye(4)), tmp_path / "bad_0000.nii.gz")
        with pytest.raises(
            DataError,
            match=rf"bad_0000\.nii\.gz: {what} has 1 NaN or infinite voxel\(s\) "
            r"\(first at index \(1, 2, 0\)\)",
        ):
            read_case([path], paths[1])
    small = write_nifti(Volume(label[:3], np.eye(4)), tmp_path / "small.nii.gz")
    with pytest.raises(DataError, match=r"shapes differ: .*c_0000\.nii\.gz \(4, 4, 3\), .*small\.nii\.gz \(3, 4, 3\)"):
        read_case(paths[:1], small)


def test_affine_problem_names_what_is_degenerate():
    assert affine_problem(_oblique_affine()) is None
    assert "voxel axis 1 has zero length" in affine_problem(np.diag([1.0, 0.0, 1.0, 1.0]))
    assert affine_problem(np.diag([1.0, 1.0, 0.0, 1.0]), ndim=2) is None  # a 2D file may leave the third axis empty
    collinear = np.eye(4)
    collinear[:3, 2] = [1.0, 1.0, 0.0]
    assert "linearly dependent" in affine_problem(collinear)
    assert "NaN or infinite" in affine_problem(np.full((4, 4), np.nan))
    with pytest.raises(DataError, match="voxel axis 2 has zero length"):
        to_ras(Volume(np.zeros((2, 2, 2)), np.diag([1.0, 1.0, 0.0, 1.0])))


# --- canonical orientation ---------------------------------------------------------------------------


def _random_affine(rng) -> np.ndarray:
    """A signed axis permutation, scaled, rotated by < 30 degrees (so the closest axes are unambiguous)."""
    permutation = np.eye(3)[rng.permutation(3)] * rng.choice([-1.0, 1.0], size=3)[:, None]
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = rng.uniform(0, np.radians(30))
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross
    affine = np.eye(4)
    affine[:3, :3] = rotation @ permutation @ np.diag(rng.uniform(0.5, 3.0, size=3))
    affine[:3, 3] = rng.uniform(-200, 200, size=3)
    return affine


def _homogeneous(indices: np.ndarray) -> np.ndarray:
    return np.concatenate([indices, np.ones((len(indices), 1))], axis=1).T


def test_to_ras_and_back_on_random_affines_is_exact_and_keeps_world_coordinates():
    rng = np.random.default_rng(7)
    for _ in range(24):
        shape = tuple(rng.permutation([3, 4, 5]))
        array = np.arange(60, dtype=np.int32).reshape(shape)  # unique values identify each voxel
        volume = Volume(array, _random_affine(rng), {"source": "random"})
        ras = to_ras(volume)
        assert nib.aff2axcodes(ras.affine) == ("R", "A", "S")
        assert np.all(np.diag(ras.affine)[:3] > 0)
        assert ras.metadata == {"source": "random"}
        original_index = np.array(np.unravel_index(np.arange(60), shape)).T
        ras_index = np.array(np.unravel_index(np.argsort(ras.array.ravel()), ras.shape)).T
        np.testing.assert_allclose(
            volume.affine @ _homogeneous(original_index), ras.affine @ _homogeneous(ras_index), atol=1e-9
        )
        back = from_ras(ras, volume.affine, volume.shape)
        assert back.array.dtype == array.dtype and np.array_equal(back.array, array)
        assert np.array_equal(back.affine, volume.affine)


def test_array_from_ras_moves_only_the_spatial_axes_of_probabilities_and_labels():
    rng = np.random.default_rng(3)
    affine = _random_affine(rng)
    labels = rng.integers(0, 3, size=(4, 5, 6)).astype(np.uint8)
    probabilities = rng.random((3, 4, 5, 6)).astype(np.float32)
    ras_labels = to_ras(Volume(labels, affine))
    ras_probabilities = array_to_ras(probabilities, affine)
    assert ras_probabilities.shape == (3, *ras_labels.shape)
    for k in range(3):  # each class channel is reoriented like a single volume
        assert np.array_equal(ras_probabilities[k], to_ras(Volume(probabilities[k], affine)).array)
    assert np.array_equal(array_from_ras(ras_probabilities, affine, labels.shape), probabilities)
    restored = from_ras(ras_labels, affine, labels.shape)
    assert restored.array.dtype == np.uint8 and np.array_equal(restored.array, labels)
    with pytest.raises(DataError, match="not the RAS view"):
        array_from_ras(ras_probabilities[:, :-1], affine, labels.shape)


def test_from_ras_rejects_a_volume_on_another_grid():
    affine = np.diag([-1.0, 1.0, 2.0, 1.0])
    ras = to_ras(Volume(np.zeros((4, 4, 4)), affine))
    shifted = Volume(ras.array, ras.affine + np.array([[0, 0, 0, 5.0]] + [[0, 0, 0, 0]] * 3))
    with pytest.raises(DataError, match="does not lie on the RAS view"):
        from_ras(shifted, affine, (4, 4, 4))


def test_to_ras_leaves_2d_volumes_unchanged():
    volume = Volume(np.arange(12.0).reshape(3, 4), np.diag([-1.0, 1.0, 1.0, 1.0]))
    assert to_ras(volume) is volume
    assert from_ras(volume, volume.affine, (3, 4)) is volume


def test_real_mr_stored_lps_becomes_ras_without_moving_any_voxel():
    volume = read_nifti(_require(REAL / "mr_small.nii.gz"))
    assert nib.aff2axcodes(volume.affine) == ("L", "P", "S")
    ras = to_ras(volume)
    assert nib.aff2axcodes(ras.affine) == ("R", "A", "S")
    index = np.array(np.unravel_index(np.arange(volume.array.size), volume.shape)).T
    ras_index = np.linalg.solve(ras.affine, volume.affine @ _homogeneous(index))[:3].T
    np.testing.assert_allclose(ras_index, np.round(ras_index), atol=1e-6)  # lands exactly on a voxel
    ras_index = np.round(ras_index).astype(int)
    assert np.array_equal(ras.array[tuple(ras_index.T)], volume.array[tuple(index.T)])
    back = from_ras(ras, volume.affine, volume.shape)
    assert np.array_equal(back.array, volume.array) and np.array_equal(back.affine, volume.affine)


# --- real DICOM series --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_ct():
    folder = _require(REAL / "ct_dicom_series")
    return folder, read_dicom_series(folder)


def test_real_ct_series_geometry_and_values(real_ct):
    _, volume = real_ct
    assert volume.shape == (512, 512, 20) and volume.array.dtype == np.float32
    np.testing.assert_allclose(volume.spacing, (0.977, 0.977, 2.0), atol=1e-3)  # not SliceThickness (3 mm)
    assert -1100 <= volume.array.min() <= -900 and volume.array.max() > 500
    assert volume.metadata["modality"] == "CT"


def test_real_ct_affine_matches_every_file_position(real_ct):
    folder, volume = real_ct
    files = sorted(folder.iterdir())
    found = []
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        ras = LPS_TO_RAS @ np.append(np.array(ds.ImagePositionPatient, dtype=float), 1.0)
        index = np.linalg.solve(volume.affine, ras)[:3]
        np.testing.assert_allclose(index[:2], 0.0, atol=1e-6)
        np.testing.assert_allclose(index[2], round(index[2]), atol=1e-6)
        found.append(int(round(index[2])))
    assert sorted(found) == list(range(20))
    for path, k in [(files[0], found[0]), (files[-1], found[-1])]:
        ds = pydicom.dcmread(path)
        expected = ds.pixel_array.T * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert np.array_equal(volume.array[:, :, k], expected.astype(np.float32))


def test_real_ct_order_does_not_depend_on_file_names(real_ct, tmp_path):
    folder, volume = real_ct
    files = sorted(folder.iterdir())
    for number, index in enumerate(np.random.default_rng(1).permutation(len(files))):
        (tmp_path / f"img{number:03d}").symlink_to(files[index])
    renamed = read_image(tmp_path)
    assert np.array_equal(renamed.array, volume.array) and np.array_equal(renamed.affine, volume.affine)


# --- synthetic DICOM series -----------------------------------------------------------------------------

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
ROWS, COLUMNS = 14, 16  # not square, so a swapped i/j would change the shape
PIXEL_SPACING = (0.8, 0.6)  # (between rows, between columns): unequal, so a swap would show


def _stored(k: int) -> np.ndarray:
    """Stored values of slice k, indexed [row j, column i]: each voxel's value encodes (i, j, k)."""
    j, i = np.mgrid[:ROWS, :COLUMNS]
    return (i + 20 * j + 400 * k).astype(np.int16)


def _write_slice(path, position, orientation=AXIAL, series_uid="1.2.3.4", stored=None, transfer_syntax=None):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "1.2.3", series_uid, "CT"
    ds.ImageOrientationPatient = [f"{v:.10f}" for v in orientation]
    ds.ImagePositionPatient = [f"{v:.10f}" for v in position]
    ds.PixelSpacing = list(PIXEL_SPACING)
    ds.SliceThickness = 9.0  # deliberately wrong: spacing must come from positions
    ds.Rows, ds.Columns = ROWS, COLUMNS
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 2, -1024
    if isinstance(stored, bytes):
        ds.PixelData = stored
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)


def _series_geometry(orientation, origin=(10.0, -20.0, 30.0), spacing=2.5, tilt_mm=0.0):
    """Slice positions along the normal (plus an optional shift per slice along the column cosine)."""
    row, column = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row, column)
    return [np.array(origin) + k * spacing * normal + k * tilt_mm * column for k in range(6)]


def _write_series(folder, orientation=AXIAL, series_uid="1.2.3.4", keep=range(6), tilt_mm=0.0, seed=0):
    """Six slices written in shuffled order under odd names; returns the (LPS) positions by k."""
    folder.mkdir(exist_ok=True)
    positions = _series_geometry(orientation, tilt_mm=tilt_mm)
    rng = np.random.default_rng(seed)
    for k in rng.permutation(list(keep)):
        name = f"{rng.integers(1 << 30):x}" + rng.choice(["", ".dcm", ".IMA", ".001"])
        _write_slice(folder / name, positions[k], orientation, series_uid, _stored(k))
    return positions


def _expected_world(orientation, positions, i, j, k):
    """Patient (LPS) position of pixel (column i, row j) of slice k, by the DICOM standard's formula."""
    row, column = np.array(orientation[:3]), np.array(orientation[3:])
    return positions[k] + i * PIXEL_SPACING[1] * row + j * PIXEL_SPACING[0] * column


def test_synthetic_series_any_names_any_order_gives_the_same_volume(tmp_path):
    positions = _write_series(tmp_path / "a", seed=1)
    _write_series(tmp_path / "b", seed=2)
    (tmp_path / "b" / ".DS_Store").write_bytes(b"junk")  # hidden files and DICOMDIR are skipped
    (tmp_path / "b" / "DICOMDIR").write_bytes(b"junk")
    a, b = read_dicom_series(tmp_path / "a"), read_dicom_series(tmp_path / "b")
    assert a.shape == (COLUMNS, ROWS, 6)
    assert np.array_equal(a.array, b.array) and np.array_equal(a.affine, b.affine)
    for k in range(6):  # array[i, j, k] = stored[j, i] * slope + intercept of slice k
        assert np.array_equal(a.array[:, :, k], _stored(k).T.astype(np.float32) * 2 - 1024)
    np.testing.assert_allclose(a.spacing, (0.6, 0.8, 2.5), atol=1e-9)
    np.testing.assert_allclose(a.affine[:3, 3], LPS_TO_RAS[:3, :3] @ positions[0])
    assert a.metadata["series_instance_uid"] == "1.2.3.4"


def test_synthetic_oblique_series_affine_maps_every_index_to_its_patient_position(tmp_path):
    rotation = _random_affine(np.random.default_rng(5))[:3, :3]
    rotation = rotation / np.linalg.norm(rotation, axis=0)
    rotation = np.linalg.qr(rotation)[0]  # orthonormal, oblique in all three axes
    orientation = tuple(rotation[:, 0]) + tuple(rotation[:, 1])
    positions = _write_series(tmp_path / "s", orientation=orientation)
    volume = read_dicom_series(tmp_path / "s")
    for i, j, k in [(0, 0, 0), (15, 0, 0), (0, 13, 0), (0, 0, 5), (7, 3, 2), (15, 13, 5)]:
        expected = LPS_TO_RAS[:3, :3] @ _expected_world(orientation, positions, i, j, k)
        np.testing.assert_allclose((volume.affine @ [i, j, k, 1])[:3], expected, atol=1e-6)
        assert volume.array[i, j, k] == (i + 20 * j + 400 * k) * 2 - 1024


def test_synthetic_missing_slice_is_an_error_naming_the_gap(tmp_path):
    _write_series(tmp_path / "s", keep=[0, 1, 2, 4, 5])
    with pytest.raises(DataError, match=r"uneven slice spacing \(missing slice\?\): expected 2\.5 mm, found 5 mm"):
        read_dicom_series(tmp_path / "s")


def test_synthetic_duplicated_slice_is_an_error_naming_both_files(tmp_path):
    positions = _write_series(tmp_path / "s")
    _write_slice(tmp_path / "s" / "copy_of_slice_2", positions[2], stored=_stored(2))
    with pytest.raises(DataError, match=r"duplicated slice positions: .*copy_of_slice_2") as info:
        read_dicom_series(tmp_path / "s")
    assert " and " in str(info.value)


def test_synthetic_two_series_need_series_uid(tmp_path):
    _write_series(tmp_path / "s", series_uid="1.2.3.4")
    _write_series(tmp_path / "s", series_uid="1.2.3.5", keep=range(4), seed=3)
    with pytest.raises(DataError, match=r"2 DICOM series") as info:
        read_dicom_series(tmp_path / "s")
    message = str(info.value)
    assert "1.2.3.4 (6 slices)" in message and "1.2.3.5 (4 slices)" in message and "series_uid" in message
    assert read_dicom_series(tmp_path / "s", series_uid="1.2.3.4").shape == (COLUMNS, ROWS, 6)
    assert read_dicom_series(tmp_path / "s", series_uid="1.2.3.5").shape == (COLUMNS, ROWS, 4)
    with pytest.raises(DataError, match=r"no series with SeriesInstanceUID '9\.9'"):
        read_dicom_series(tmp_path / "s", series_uid="9.9")


def test_synthetic_non_dicom_file_is_an_error_naming_it(tmp_path):
    _write_series(tmp_path / "s")
    (tmp_path / "s" / "notes.txt").write_text("scanned on tuesday")
    with pytest.raises(DataError, match=r"1 file\(s\) are not readable DICOM files: notes\.txt"):
        read_dicom_series(tmp_path / "s")
    with pytest.raises(DataError, match=r"no DICOM files found"):
        read_dicom_series(tmp_path)  # only a sub-folder: sub-folders are not searched


def test_synthetic_slice_without_geometry_is_an_error_naming_it(tmp_path):
    positions = _write_series(tmp_path / "s")
    _write_slice(tmp_path / "s" / "no_position", positions[0], stored=_stored(0))
    ds = pydicom.dcmread(tmp_path / "s" / "no_position")
    del ds.ImagePositionPatient
    ds.save_as(tmp_path / "s" / "no_position")
    with pytest.raises(DataError, match=r"no_position: not a usable image slice, missing ImagePositionPatient"):
        read_dicom_series(tmp_path / "s")


def test_synthetic_gantry_tilt_is_an_error(tmp_path):
    _write_series(tmp_path / "s", tilt_mm=0.5)  # 0.5 mm shift per 2.5 mm slice: about 11 degrees
    with pytest.raises(DataError, match=r"not along the slice normal \(gantry tilt.*about 11\.31 degrees"):
        read_dicom_series(tmp_path / "s")


def test_compressed_pixel_data_without_decoder_names_the_packages(tmp_path):
    from pydicom.encaps import encapsulate
    from pydicom.pixels import get_decoder

    # JPEG Lossless SV1: no decoder among the dependencies (highdicom brings a JPEG-LS one, Pillow a baseline one)
    if get_decoder(JPEGLosslessSV1).is_available:
        pytest.skip("a JPEG Lossless decoder is installed, so the missing-decoder error cannot be provoked honestly")
    folder = tmp_path / "s"
    folder.mkdir()
    for k, position in enumerate(_series_geometry(AXIAL)[:3]):
        frame = b"\xff\xd8\xff\xc3" + bytes(32)  # never decoded: the check happens before decoding
        _write_slice(folder / f"ls{k}", position, stored=encapsulate([frame]), transfer_syntax=JPEGLosslessSV1)
    with pytest.raises(DataError, match=r"compressed as JPEG Lossless.*no decoder.*pylibjpeg-libjpeg"):
        read_dicom_series(folder)
