"""DICOM in and out: DICOM-SEG output read back against the NIfTI prediction, series selection, folders of
series folders, enhanced (multi-frame) input, and the refusals of requests that cannot be honoured."""

from pathlib import Path

import flax.linen as nn
import highdicom as hd
import jax.numpy as jnp
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, ExplicitVRLittleEndian, generate_uid

from medseg_jax.cli import main
from medseg_jax.data.dicom import read_dicom_series
from medseg_jax.data.image_io import read_image, read_nifti, write_nifti
from medseg_jax.data.volume import Volume
from medseg_jax.errors import DataError
from medseg_jax.inference.dicom_seg import write_dicom_seg
from medseg_jax.inference.predict import Predictor, predict_input, predict_path
from tests.inference.test_export import trained_run  # noqa: F401  (a module fixture: a tiny trained run)
from tests.inference.test_predict import NO_TTA, REAL, needs_real, tiny_plan, untrained_params

ROWS, COLUMNS, SLICES = 20, 24, 8  # not square and few slices: a swapped axis changes the shape
PIXEL_SPACING = (1.5, 1.25)  # (between rows, between columns)
STUDY = "1.2.826.0.1.3680043.8.498.100"
HU = {"air": -1000, "organ": 60, "lesion": 280}


def intensity_model():
    """A per-voxel network on the [-200, 300] HU window mapped to [0, 1]: background below about -100 HU,
    organ (class 1) above it, lesion (class 2) above about 250 HU; so both classes are predicted."""
    model = nn.Conv(3, kernel_size=(1, 1, 1))
    kernel = np.zeros((1, 1, 1, 1, 3), np.float32)
    kernel[..., 0, 1], kernel[..., 0, 2] = 20.0, 60.0
    return model, {"params": {"kernel": jnp.asarray(kernel), "bias": jnp.asarray([0.0, -4.0, -40.0])}}


@pytest.fixture(scope="module")
def predictor():
    model, params = intensity_model()
    plan = tiny_plan("CT", (2.0, 2.0, 2.0), hu_window=(-200.0, 300.0))
    return Predictor(model, params, plan, NO_TTA)


def phantom() -> np.ndarray:
    """HU indexed [slice k, row j, column i]: an off-centre organ box holding a lesion box, in air."""
    hu = np.full((SLICES, ROWS, COLUMNS), HU["air"], np.int16)
    hu[1:7, 4:16, 3:15] = HU["organ"]
    hu[3:6, 6:11, 5:10] = HU["lesion"]
    return hu


def write_series(folder: Path, series_uid: str, hu=None, seed=0, frame_of_reference=True) -> list[str]:
    """A CT series, one slice per file under shuffled random names; returns the SOPInstanceUIDs by slice."""
    folder.mkdir(parents=True, exist_ok=True)
    hu = phantom() if hu is None else hu
    rng = np.random.default_rng(seed)
    uids = [generate_uid() for _ in range(SLICES)]
    for k in rng.permutation(SLICES):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, uids[k]
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uids[k]
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = STUDY, series_uid, "CT"
        if frame_of_reference:
            ds.FrameOfReferenceUID = STUDY + ".1"
        ds.PatientName, ds.PatientID, ds.SeriesNumber, ds.InstanceNumber = "Test^Phantom", "P1", 3, int(k) + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-30.0, -40.0, 5.0 + 2.5 * k]
        ds.PixelSpacing = list(PIXEL_SPACING)
        ds.Rows, ds.Columns = ROWS, COLUMNS
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (hu[k] + 1024).astype(np.int16).tobytes()
        ds.save_as(folder / f"{rng.integers(1 << 30):x}.dcm", enforce_file_format=True)
    return uids


def check_seg_against_nifti(seg_path: Path, nifti: np.ndarray, series_folder: Path, series_uid=None):
    """Every frame of the SEG equals its segment's mask in its source slice of the NIfTI prediction, and
    the SEG references exactly the source series' study, series and instances."""
    source = read_dicom_series(series_folder, series_uid)
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in source.metadata["files"]]
    slice_of = {ds.SOPInstanceUID: k for k, ds in enumerate(headers)}
    seg = hd.seg.segread(seg_path)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    assert seg.StudyInstanceUID == headers[0].StudyInstanceUID and seg.PatientID == headers[0].PatientID
    assert seg.SeriesInstanceUID != headers[0].SeriesInstanceUID  # a new series of the same study
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == headers[0].SeriesInstanceUID
    assert {item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence} == set(slice_of)
    assert [(s.SegmentNumber, s.SegmentLabel) for s in seg.SegmentSequence] == [(1, "organ"), (2, "lesion")]
    frames = seg.pixel_array.reshape(-1, ROWS, COLUMNS) if seg.NumberOfFrames > 1 else seg.pixel_array[None]
    seen = set()
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        (derivation,) = item.DerivationImageSequence
        k = slice_of[derivation.SourceImageSequence[0].ReferencedSOPInstanceUID]
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, [float(v) for v in headers[k].ImagePositionPatient], atol=1e-4)
        np.testing.assert_array_equal(frame, (nifti[:, :, k].T == number).astype(np.uint8))
        seen.add((k, number))
    # frames left out are exactly those where the segment is absent from the slice
    present = {(k, n) for k in range(nifti.shape[2]) for n in (1, 2) if (nifti[:, :, k] == n).any()}
    assert seen == present
    # and the same through highdicom's reader, slice by slice in source order
    pixels = seg.get_pixels_by_source_instance(list(slice_of), combine_segments=True, skip_overlap_checks=True)
    np.testing.assert_array_equal(pixels, np.transpose(nifti, (2, 1, 0)))
    return seg


def test_dicom_seg_frames_match_the_nifti_prediction_and_reference_the_series(predictor, tmp_path):
    series = tmp_path / "scan"
    write_series(series, "1.2.826.0.1.3680043.8.498.101")
    nifti = predict_path(series, tmp_path / "nifti", None, None, None, predictor=predictor)
    summary = predict_path(
        series, tmp_path / "seg", None, None, None, predictor=predictor, output_format="dicom-seg",
        statistics=True, save_probabilities=True,
    )  # fmt: skip
    assert summary["output"] == str(tmp_path / "seg" / "scan.dcm")
    written = sorted(p.name for p in (tmp_path / "seg").iterdir())
    assert written == ["scan.dcm", "scan.npz", "scan.statistics.json"]  # the extras beside the SEG as beside a mask
    label = read_nifti(nifti["output"]).array
    assert set(np.unique(label).tolist()) == {0, 1, 2}  # both classes predicted: every segment is checked
    check_seg_against_nifti(tmp_path / "seg" / "scan.dcm", label, series)
    assert summary["volume_ml"] == nifti["volume_ml"]


def test_series_uid_picks_one_series_of_a_folder_holding_two(predictor, tmp_path):
    shifted = np.roll(phantom(), 5, axis=2)  # another scan: the organ elsewhere
    write_series(tmp_path / "both", "1.2.826.0.1.3680043.8.498.201", seed=1)
    write_series(tmp_path / "both", "1.2.826.0.1.3680043.8.498.202", hu=shifted, seed=2)
    write_series(tmp_path / "alone", "1.2.826.0.1.3680043.8.498.202", hu=shifted, seed=3)
    with pytest.raises(DataError, match=r"2 DICOM series: .*\.201 \(8 slices\).*\.202 \(8 slices\).*--series-uid"):
        predict_path(tmp_path / "both", tmp_path / "out", None, None, None, predictor=predictor)
    picked = predict_path(
        tmp_path / "both",
        tmp_path / "out",
        None,
        None,
        None,
        predictor=predictor,
        series_uid="1.2.826.0.1.3680043.8.498.202",
    )
    alone = predict_path(tmp_path / "alone", tmp_path / "ref", None, None, None, predictor=predictor)
    np.testing.assert_array_equal(read_nifti(picked["output"]).array, read_nifti(alone["output"]).array)
    predict_path(
        tmp_path / "both",
        tmp_path / "both.dcm",
        None,
        None,
        None,
        predictor=predictor,
        output_format="dicom-seg",
        series_uid="1.2.826.0.1.3680043.8.498.202",
    )
    seg = check_seg_against_nifti(
        tmp_path / "both.dcm", read_nifti(alone["output"]).array, tmp_path / "both", "1.2.826.0.1.3680043.8.498.202"
    )
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID.endswith(".202")


def test_a_folder_of_series_folders_gives_one_output_per_series(predictor, tmp_path):
    scans = tmp_path / "scans"
    write_series(scans / "a", "1.2.826.0.1.3680043.8.498.301")
    write_series(scans / "b", "1.2.826.0.1.3680043.8.498.302", hu=np.roll(phantom(), 4, axis=1))
    summaries = predict_input(
        scans, tmp_path / "out", predictor.apply_fn.model, predictor.params, predictor.plan, NO_TTA, progress=False,
        output_format="dicom-seg",
    )  # fmt: skip
    assert [Path(s["output"]).name for s in summaries] == ["a.dcm", "b.dcm"]
    for name in ("a", "b"):
        label = predict_path(scans / name, tmp_path / "nifti", None, None, None, predictor=predictor)["output"]
        check_seg_against_nifti(tmp_path / "out" / f"{name}.dcm", read_nifti(label).array, scans / name)
    nifti = predict_input(
        scans, tmp_path / "out2", predictor.apply_fn.model, predictor.params, predictor.plan, NO_TTA, progress=False
    )
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == ["a.nii.gz", "b.nii.gz"] and len(nifti) == 2
    with pytest.raises(DataError, match="folder of series folders"):
        predict_input(scans, tmp_path / "x", None, None, predictor.plan, series_uid="1.2.3")


def test_enhanced_multiframe_images_are_refused_with_a_clear_message(tmp_path):
    folder = tmp_path / "enhanced"
    folder.mkdir()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = EnhancedCTImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = EnhancedCTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.Modality, ds.NumberOfFrames = "1.2.3.4", "CT", 3
    ds.ImageOrientationPatient, ds.ImagePositionPatient, ds.PixelSpacing = [1, 0, 0, 0, 1, 0], [0, 0, 0], [1, 1]
    ds.Rows, ds.Columns = 4, 4
    ds.save_as(folder / "volume.dcm", enforce_file_format=True)
    with pytest.raises(DataError, match=r"volume\.dcm: an enhanced \(multi-frame\) image with 3 frames \(Enhanced CT"):
        read_image(folder)


def test_bad_dicom_requests_are_clear_errors_and_write_nothing(predictor, tmp_path):
    series = tmp_path / "scan"
    write_series(series, "1.2.826.0.1.3680043.8.498.401")
    scan = tmp_path / "scan.nii.gz"
    write_nifti(read_image(series), scan)
    out = tmp_path / "out"
    model, params, plan = predictor.apply_fn.model, predictor.params, predictor.plan
    with pytest.raises(DataError, match=r"no series with SeriesInstanceUID '9\.9'; found .*\.401 \(8 slices\)"):
        predict_input(series, out, model, params, plan, NO_TTA, series_uid="9.9")
    with pytest.raises(DataError, match="scan.nii.gz: a DICOM-SEG output references the DICOM series .* NIfTI input"):
        predict_input(scan, out, model, params, plan, NO_TTA, output_format="dicom-seg")
    with pytest.raises(DataError, match="NIfTI input has no source series"):  # the library call checks too
        predict_path(scan, out, None, None, None, predictor=predictor, output_format="dicom-seg")
    with pytest.raises(DataError, match="series UID .* selects a series of a DICOM folder"):
        predict_path(scan, out, None, None, None, predictor=predictor, series_uid="1.2")
    with pytest.raises(DataError, match="mask.nii.gz: names a NIfTI file, but the output format is dicom-seg"):
        predict_path(series, out / "mask.nii.gz", None, None, None, predictor=predictor, output_format="dicom-seg")
    assert not out.exists()
    # a series the SEG cannot be built for (no FrameOfReferenceUID): an error, and the statistics written
    # before the SEG are removed again
    broken = tmp_path / "broken"
    write_series(broken, "1.2.826.0.1.3680043.8.498.402", frame_of_reference=False)
    with pytest.raises(DataError, match="broken: cannot build a DICOM-SEG for this series .*Frame Of Reference"):
        predict_path(broken, out, None, None, None, predictor=predictor, output_format="dicom-seg", statistics=True)
    assert list(out.iterdir()) == []


def test_write_dicom_seg_refuses_labels_off_the_series_grid(tmp_path):
    write_series(tmp_path / "s", "1.2.826.0.1.3680043.8.498.501")
    source = read_dicom_series(tmp_path / "s")
    labels = {"background": 0, "organ": 1}
    shifted = source.affine.copy()
    shifted[:3, 3] += 2.5  # the same shape one slice off: not the series' slices
    for array, affine in ((np.zeros((COLUMNS, ROWS, 4), np.uint8), source.affine), (np.zeros(source.shape), shifted)):
        with pytest.raises(DataError, match="not on the series' grid"):
            write_dicom_seg(Volume(array, affine), tmp_path / "x.dcm", source=source, labels=labels)
    with pytest.raises(DataError, match=r"label values \[3\] are not classes"):
        write_dicom_seg(
            source.with_array(np.full(source.shape, 3, np.uint8)), tmp_path / "x.dcm", source=source, labels=labels
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_predict_command_line_dicom_seg_and_its_refusals(trained_run, tmp_path, capsys):  # noqa: F811
    run, scan = trained_run
    series = tmp_path / "series"
    write_series(series, "1.2.826.0.1.3680043.8.498.601")
    out = tmp_path / "out"
    base = ["predict", "--model", str(run), "-o", str(out), "--quiet"]
    assert main([*base, "-i", str(series), "--output-format", "dicom-seg"]) == 0
    assert [p.name for p in out.iterdir()] == ["series.dcm"]
    assert hd.seg.segread(out / "series.dcm").ReferencedSeriesSequence[0].SeriesInstanceUID.endswith(".601")
    capsys.readouterr()
    refused = tmp_path / "refused"
    for argv, message in (
        (["-i", str(series), "--series-uid", "1.2.3.999"], "no series with SeriesInstanceUID '1.2.3.999'"),
        (["-i", str(scan), "--output-format", "dicom-seg"], "NIfTI input has no source series"),
        (["-i", str(series), "--output-format", "dicom-seg", "--report"], "--report needs --output-format nifti"),
    ):
        assert main(["predict", "--model", str(run), "-o", str(refused), "--quiet", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not refused.exists()


@needs_real
def test_real_ct_series_without_uids_is_refused_and_with_them_matches_the_nifti_prediction(tmp_path):
    from medseg_jax.models.unet import UNet

    model = UNet(num_classes=3, spatial_dims=3, n_stages=2, features=(4, 8), deep_supervision=True)
    plan = tiny_plan("CT", (8.0, 8.0, 4.0), hu_window=(-200.0, 300.0))  # 512 x 512 x 20 -> 62 x 62 x 10
    real = Predictor(model, untrained_params(model, (1, 16, 16, 8, 1)), plan, NO_TTA, accumulate="host")
    series = REAL / "ct_dicom_series"  # anonymised: study, series and instance UIDs are empty
    with pytest.raises(DataError, match="StudyInstanceUID, SeriesInstanceUID empty or missing .*anonymised"):
        predict_path(series, tmp_path / "seg", None, None, None, predictor=real, output_format="dicom-seg")
    assert not (tmp_path / "seg").exists()
    # the same slices with UIDs (copies in the test's folder): the SEG follows the real series' geometry
    copy = tmp_path / "ct_dicom_series"
    copy.mkdir()
    for path in sorted(series.iterdir()):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, STUDY + ".7"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.save_as(copy / path.name)
    nifti = predict_path(copy, tmp_path / "nifti", None, None, None, predictor=real)["output"]
    predict_path(copy, tmp_path / "seg", None, None, None, predictor=real, output_format="dicom-seg")
    label = read_nifti(nifti).array
    seg = hd.seg.segread(tmp_path / "seg" / "ct_dicom_series.dcm")
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in read_dicom_series(copy).metadata["files"]]
    assert seg.StudyInstanceUID == STUDY and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == STUDY + ".7"
    pixels = seg.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in headers], combine_segments=True, skip_overlap_checks=True
    )
    np.testing.assert_array_equal(pixels, np.transpose(label, (2, 1, 0)))
