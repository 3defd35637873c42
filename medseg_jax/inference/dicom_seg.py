"""DICOM in and out for prediction: DICOM Segmentation (SEG) objects and folders of series folders.

A SEG written here is a companion of the series it was predicted from, so that a PACS or viewer shows it
on top of that series:

- it references the source series (StudyInstanceUID, ReferencedSeriesSequence with the
  SeriesInstanceUID and every slice's SOPInstanceUID) and copies its patient / study attributes;
- each frame is one source slice of one segment, on the slice's own grid: the label map of
  :func:`~medseg_jax.inference.predict.predict_path` is on the series' voxel grid
  (:func:`~medseg_jax.data.dicom.read_dicom_series`: ``array[i column, j row, k slice]``), so frame ``k``
  is ``array[:, :, k].T`` and refers to the ``k``-th file of the volume's ``files`` metadata;
- one segment per foreground class of the plan, numbered 1.. in class order and labelled with the class
  name from the plan's labels (dataset.json); background is no segment;
- BINARY segmentation type (the most widely supported); slices where a segment is absent are left out,
  as the standard allows, so a 100-class CT does not carry 100 empty frames per slice.

The file is written atomically: a failure leaves nothing at the target.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medseg_jax.atomic import atomic_path
from medseg_jax.data.volume import Volume
from medseg_jax.errors import DataError

OUTPUT_FORMATS = ("nifti", "dicom-seg")
SEG_SUFFIX = ".dcm"
_IGNORED = frozenset({"dicomdir"})
_MAX_LABEL = 64  # SegmentLabel is an LO element: 64 characters at most


def segment_classes(labels: dict) -> list[tuple[int, str]]:
    """``(class value, name)`` of every foreground class, in value order (segment ``n`` is the ``n``-th)."""
    return sorted((int(value), str(name)) for name, value in labels.items() if int(value) > 0)


NO_SOURCE_SERIES = (
    "a DICOM-SEG output references the DICOM series it was predicted from, and a NIfTI input has no source "
    "series; use --output-format nifti or predict the DICOM series folder"
)


def require_series_source(volume: Volume, what) -> list[Path]:
    """The slice files a SEG for ``volume`` would reference; a clear error, before anything is predicted, when
    it was not read from DICOM or its first slice lacks the UIDs a SEG must reference."""
    import pydicom

    files = volume.metadata.get("files")
    if not files:
        raise DataError(f"{what}: {NO_SOURCE_SERIES}")
    _check_referencable(pydicom.dcmread(files[0], stop_before_pixels=True), Path(files[0]))
    return [Path(f) for f in files]


def _check_referencable(ds, path: Path):
    """Fill the SOP UIDs from the file meta where the data set leaves them empty (Part 10 makes them equal);
    raise if a UID the SEG must reference is missing, as it is in some anonymised exports."""
    meta = getattr(ds, "file_meta", None)
    for keyword, meta_keyword in (
        ("SOPClassUID", "MediaStorageSOPClassUID"),
        ("SOPInstanceUID", "MediaStorageSOPInstanceUID"),
    ):
        if not ds.get(keyword) and meta is not None and meta.get(meta_keyword):
            setattr(ds, keyword, meta.get(meta_keyword))
    missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID") if not ds.get(k)]
    if missing:
        raise DataError(
            f"{path}: {', '.join(missing)} empty or missing (an anonymised export?); a DICOM-SEG must reference the "
            "source study, series and slices by their UIDs, so it cannot be written for this series "
            "(use --output-format nifti)"
        )
    return ds


def write_dicom_seg(label: Volume, path: str | os.PathLike, *, source: Volume, labels: dict) -> Path:
    """Write ``label`` (a class map on ``source``'s grid) as a DICOM SEG referencing ``source``'s series.

    ``source`` is the :class:`Volume` read by :func:`~medseg_jax.data.dicom.read_dicom_series` (its ``files``
    metadata lists the slices in k order); ``labels`` the plan's ``{name: value}``.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    from medseg_jax import __version__

    path = Path(path)
    files = require_series_source(source, source.metadata.get("source", "<in-memory volume>"))
    folder = source.metadata.get("source", files[0].parent)
    if label.shape != source.shape or not np.allclose(label.affine, source.affine, atol=1e-4):
        raise DataError(
            f"{folder}: the label map ({label.shape}) is not on the series' grid ({source.shape}); "
            "a DICOM-SEG can only hold labels on the source slices"
        )
    classes = segment_classes(labels)
    values = np.unique(label.array)
    unknown = sorted(set(values.tolist()) - {0} - {value for value, _ in classes})
    if unknown:
        raise DataError(f"{folder}: label values {unknown} are not classes of the plan's labels {labels}")
    # class value -> segment number (1..n in class order); identical for the usual consecutive classes
    lookup = np.zeros(max([0, *values.tolist(), *(v for v, _ in classes)]) + 1, dtype=np.uint16)
    for number, (value, _) in enumerate(classes, start=1):
        lookup[value] = number
    frames = lookup[np.transpose(label.array, (2, 1, 0))]  # (k, j row, i column): one frame per slice
    sources = [_check_referencable(pydicom.dcmread(f, stop_before_pixels=True), f) for f in files]
    sources = [_with_type2_attributes(ds) for ds in sources]
    algorithm = hd.AlgorithmIdentificationSequence(
        name="medseg-jax", family=codes.cid7162.ArtificialIntelligence, version=__version__
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name[:_MAX_LABEL],
            # the plan names classes freely; no anatomy code can be inferred from a name, hence generic codes
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number, (_, name) in enumerate(classes, start=1)
    ]
    # highdicom copies SliceThickness (present but possibly empty in the source IODs) into the SEG's pixel
    # measures; where the source leaves it out, the spacing between the slices stands in (in memory only)
    slice_spacing = float(np.linalg.norm(source.affine[:3, 2]))
    for ds in sources:
        if ds.get("SliceThickness", None) in (None, ""):
            ds.SliceThickness = slice_spacing
    try:
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=int(sources[0].get("SeriesNumber", 0) or 0) + 1000,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="medseg-jax",
            manufacturer_model_name="medseg-jax",
            software_versions=__version__,
            device_serial_number="0",
            content_description="medseg-jax prediction",
            content_label="SEGMENTATION",
            series_description=f"{sources[0].get('SeriesDescription', '') or ''} segmentation".strip()[:_MAX_LABEL],
        )
    except (ValueError, TypeError, AttributeError) as exc:  # highdicom's complaints about the source headers
        raise DataError(f"{folder}: cannot build a DICOM-SEG for this series ({exc})") from exc
    with atomic_path(path) as tmp:
        seg.save_as(tmp)
    return path


# Patient / study attributes the source IODs require to be present but allow empty; exports and
# anonymisers often drop them, and the SEG copies them, so an absent one is added empty (in memory only).
_TYPE2_SOURCE_ATTRIBUTES = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "AccessionNumber",
)  # fmt: skip


def _with_type2_attributes(ds):
    for keyword in _TYPE2_SOURCE_ATTRIBUTES:
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds


def series_folders(path: str | os.PathLike) -> list[Path] | None:
    """The sub-folders of ``path`` when it is a folder of series folders (only folders inside), else None."""
    path = Path(path)
    if not path.is_dir():
        return None
    entries = [e for e in path.iterdir() if not e.name.startswith(".") and e.name.lower() not in _IGNORED]
    if not entries or not all(e.is_dir() for e in entries):
        return None
    return sorted(entries)


def seg_target(case: str, output_path) -> Path:
    """Where one case's SEG goes: ``output_path`` if it names a ``.dcm`` file, else ``output_path/{case}.dcm``."""
    from medseg_jax.data.image_io import is_nifti

    output_path = Path(output_path)
    if is_nifti(output_path):
        raise DataError(
            f"{output_path}: names a NIfTI file, but the output format is dicom-seg; give a .dcm file or a folder"
        )
    return output_path if output_path.suffix.lower() == SEG_SUFFIX else output_path / f"{case}{SEG_SUFFIX}"
