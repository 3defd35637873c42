"""Reading one DICOM series (a folder of single-frame image files) into a :class:`Volume`.

Rules, in the order they are applied:

- Files: every regular file directly inside the folder (any name, any order; sub-folders are not
  searched). Hidden files (name starting with ``.``) and ``DICOMDIR`` index files are skipped; every
  other file must be a DICOM Part 10 file, otherwise :class:`DataError` names the offending files —
  a stray file usually means the wrong folder, and silently skipping it would hide that.
- Series: files are grouped by SeriesInstanceUID. Several series and no ``series_uid`` ->
  :class:`DataError` listing each UID with its slice count. Only the selected series is checked further.
- Geometry: all slices must share Rows/Columns, ImageOrientationPatient and PixelSpacing. Slices are
  sorted by ImagePositionPatient projected on the slice normal (row cosine x column cosine). The
  spacing between slices comes from those positions, never from SliceThickness. Duplicated
  positions, non-uniform gaps (a missing slice) and positions that drift off the normal (gantry tilt
  or a sheared acquisition) are errors: tilted series must be resampled by a converter first, as an
  axis-aligned affine cannot describe them and a sheared one breaks most downstream tools.
- Values: ``stored * RescaleSlope + RescaleIntercept`` (HU for CT) as float32, per slice.
- Axes and affine: ``array[i, j, k]`` with i the column index (along the row cosine), j the row index
  (along the column cosine) and k the sorted slice index (along the normal); DICOM's ``pixel_array``
  is ``[j, i]`` and is transposed. The affine is built in DICOM's LPS frame and converted to RAS by
  negating its x and y rows.
- Compressed pixel data needs a pydicom decoder plug-in; when none is installed for the file's
  transfer syntax the error names the packages that would provide one.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg_jax.data.volume import Volume
from medseg_jax.errors import DataError

if TYPE_CHECKING:  # pydicom is imported lazily at run time (only DICOM input needs it)
    from pydicom.dataset import FileDataset

IGNORED_NAMES = frozenset({"dicomdir"})  # compared lower-case
# Positions are compared with a tolerance: DICOM stores them as decimal strings, so rounding is normal.
ABSOLUTE_TOLERANCE_MM = 1e-3
GAP_TOLERANCE = 0.01  # fraction of the slice spacing a gap may deviate from the median
TILT_TOLERANCE = 0.01  # fraction of the smallest pixel spacing the slice origins may drift off the normal
_GEOMETRY_FIELDS = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
_MAX_LISTED = 10


def _listing(items) -> str:
    items = [str(item) for item in items]
    more = f" (and {len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


def _candidate_files(folder: Path) -> list[Path]:
    return sorted(
        entry
        for entry in folder.iterdir()
        if entry.is_file() and not entry.name.startswith(".") and entry.name.lower() not in IGNORED_NAMES
    )


def _read_headers(folder: Path, paths: list[Path]) -> list[tuple[Path, FileDataset]]:
    """(path, header without pixel data) for each file; any non-DICOM file is an error naming it."""
    import pydicom

    headers, foreign = [], []
    for path in paths:
        try:
            headers.append((path, pydicom.dcmread(path, stop_before_pixels=True)))
        except Exception:  # InvalidDicomError for foreign files, assorted errors for truncated ones
            foreign.append(path.name)
    if foreign:
        raise DataError(
            f"{folder}: {len(foreign)} file(s) are not readable DICOM files: {_listing(foreign)}. "
            "The folder must hold only the series' DICOM files (hidden files and DICOMDIR are ignored)."
        )
    if not headers:
        raise DataError(f"{folder}: no DICOM files found")
    return headers


def _select_series(folder: Path, headers, series_uid: str | None):
    groups = defaultdict(list)
    for path, ds in headers:
        groups[str(ds.get("SeriesInstanceUID", "") or "")].append((path, ds))
    if series_uid is not None:
        if series_uid not in groups:
            raise DataError(f"{folder}: no series with SeriesInstanceUID {series_uid!r}; found {_describe(groups)}")
        return series_uid, groups[series_uid]
    if len(groups) > 1:
        raise DataError(
            f"{folder}: contains {len(groups)} DICOM series: {_describe(groups)}. "
            "Pass series_uid=<SeriesInstanceUID> (medseg-jax predict --series-uid) to choose one."
        )
    ((uid, members),) = groups.items()
    return uid, members


def _describe(groups) -> str:
    parts = []
    for uid, members in sorted(groups.items()):
        description = str(members[0][1].get("SeriesDescription", "") or "")
        label = f" {description!r}" if description else ""
        parts.append(f"{uid or '<no SeriesInstanceUID>'} ({len(members)} slices{label})")
    return "; ".join(parts)


def _sop_class_name(ds) -> str:
    uid = ds.get("SOPClassUID")
    return f"{uid.name}" if uid is not None and uid.name != uid else f"SOP class {uid or 'unknown'}"


def _floats(ds, name: str) -> np.ndarray:
    return np.array([float(v) for v in ds.get(name)], dtype=np.float64)


def _common_geometry(members) -> dict:
    """Orientation, pixel spacing and size shared by every slice (checked), plus each slice's position."""
    for path, ds in members:
        missing = [name for name in _GEOMETRY_FIELDS if ds.get(name) in (None, "")]
        if missing:
            raise DataError(f"{path}: not a usable image slice, missing {', '.join(missing)}")
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise DataError(
                f"{path}: an enhanced (multi-frame) image with {int(ds.NumberOfFrames)} frames "
                f"({_sop_class_name(ds)}); only series stored one slice per file are read. Convert it to "
                "single-frame files (e.g. dcmtk/dicom3tools emf2sf) or to NIfTI (e.g. dcm2niix) first."
            )
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise DataError(f"{path}: colour images (SamplesPerPixel > 1) are not supported")
    first_path, first = members[0]
    reference: dict[str, Any] = {
        "orientation": _floats(first, "ImageOrientationPatient"),
        "pixel_spacing": _floats(first, "PixelSpacing"),
        "size": (int(first.Rows), int(first.Columns)),
    }
    for path, ds in members[1:]:
        if (int(ds.Rows), int(ds.Columns)) != reference["size"]:
            raise DataError(
                f"{path}: size {int(ds.Rows)}x{int(ds.Columns)} differs from {first_path.name}'s "
                f"{reference['size'][0]}x{reference['size'][1]} in the same series"
            )
        for key, name in (("orientation", "ImageOrientationPatient"), ("pixel_spacing", "PixelSpacing")):
            if not np.allclose(_floats(ds, name), reference[key], rtol=1e-4, atol=1e-4):
                raise DataError(
                    f"{path}: {name} {_floats(ds, name).tolist()} differs from {first_path.name}'s "
                    f"{reference[key].tolist()} in the same series"
                )
    row_cosine, column_cosine = reference["orientation"][:3], reference["orientation"][3:]
    if (
        abs(np.linalg.norm(row_cosine) - 1) > 1e-3
        or abs(np.linalg.norm(column_cosine) - 1) > 1e-3
        or abs(row_cosine @ column_cosine) > 1e-3
    ):
        raise DataError(
            f"{first_path}: ImageOrientationPatient {reference['orientation'].tolist()} is not two orthogonal "
            "unit vectors"
        )
    reference["normal"] = np.cross(row_cosine, column_cosine)
    reference["positions"] = np.stack([_floats(ds, "ImagePositionPatient") for _, ds in members])
    return reference


def _sort_and_space(members, geometry, folder: Path) -> tuple[np.ndarray, float]:
    """Slice order along the normal and the spacing between slices (mm); checks duplicates, tilt, gaps."""
    positions, normal = geometry["positions"], geometry["normal"]
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    names = [members[index][0].name for index in order]
    if len(order) == 1:
        ds = members[0][1]
        thickness = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0
        return order, float(thickness)
    gaps = np.diff(along)
    duplicates = np.flatnonzero(gaps <= ABSOLUTE_TOLERANCE_MM)
    if duplicates.size:
        pairs = [f"{names[d]} and {names[d + 1]} at {positions[d].round(4).tolist()}" for d in duplicates]
        raise DataError(f"{folder}: duplicated slice positions: {_listing(pairs)}")
    off_normal = (positions - positions[0]) - np.outer(along - along[0], normal)
    drift = np.linalg.norm(off_normal, axis=1)
    if drift.max() > TILT_TOLERANCE * geometry["pixel_spacing"].min() + ABSOLUTE_TOLERANCE_MM:
        angle = np.degrees(np.arctan2(drift[-1], along[-1] - along[0]))
        raise DataError(
            f"{folder}: slice positions are not along the slice normal (gantry tilt or sheared "
            f"acquisition, about {angle:.2f} degrees; {names[-1]} is {drift[-1]:.3f} mm off). Tilted "
            "series are not supported: convert and resample them with a tilt-correcting converter first."
        )
    spacing = float(np.median(gaps))
    uneven = np.flatnonzero(np.abs(gaps - spacing) > GAP_TOLERANCE * spacing + ABSOLUTE_TOLERANCE_MM)
    if uneven.size:
        details = [
            f"{gaps[g]:.4g} mm between {names[g]} (at {along[g]:.4g}) and {names[g + 1]} (at {along[g + 1]:.4g})"
            for g in uneven
        ]
        raise DataError(
            f"{folder}: uneven slice spacing (missing slice?): expected {spacing:.4g} mm, found {_listing(details)}"
        )
    return order, float((along[-1] - along[0]) / (len(along) - 1))


def _check_decodable(members) -> str:
    """Name of the transfer syntax; raises if its pixel data cannot be decoded with what is installed."""
    from pydicom.pixels import get_decoder

    seen = {}
    for path, ds in members:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is None or syntax in seen:
            continue
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError as exc:
            raise DataError(f"{path}: pixel data in {syntax.name} ({syntax}) cannot be decoded by pydicom") from exc
        if not decoder.is_available:
            options = "; ".join(decoder.missing_dependencies)
            raise DataError(
                f"{path}: pixel data is compressed as {syntax.name} ({syntax}) and no decoder for it is "
                f"installed. Install one of: {options} (e.g. pip install pylibjpeg pylibjpeg-libjpeg)."
            )
        seen[syntax] = syntax.name
    return ", ".join(seen.values())


def _slice_values(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Rescaled values of one slice as float32, indexed ``[i (column), j (row)]``."""
    import pydicom

    try:
        ds = pydicom.dcmread(path)
        stored = ds.pixel_array
    except Exception as exc:
        raise DataError(f"{path}: cannot decode pixel data ({exc})") from exc
    if stored.shape != size:
        raise DataError(f"{path}: pixel data has shape {stored.shape}, expected {size}")
    slope = float(ds.get("RescaleSlope", None) or 1.0)
    intercept = float(ds.get("RescaleIntercept", None) or 0.0)
    return (stored.astype(np.float64) * slope + intercept).astype(np.float32).T


def _ras_affine(geometry, origin: np.ndarray, slice_spacing: float) -> np.ndarray:
    row_spacing, column_spacing = geometry["pixel_spacing"]  # DICOM order: between rows, between columns
    lps = np.eye(4)
    lps[:3, 0] = geometry["orientation"][:3] * column_spacing  # i walks along a row
    lps[:3, 1] = geometry["orientation"][3:] * row_spacing  # j walks down a column
    lps[:3, 2] = geometry["normal"] * slice_spacing
    lps[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> RAS


def read_dicom_series(folder: str | os.PathLike, series_uid: str | None = None) -> Volume:
    """Read one DICOM series from ``folder`` (see the module docstring for the rules).

    Returns a float32 :class:`Volume` of shape ``(columns, rows, slices)`` holding rescaled values (HU
    for CT) with a voxel -> RAS mm affine, and metadata ``source``, ``series_instance_uid``,
    ``modality``, ``transfer_syntax`` and ``files`` (the slice files, in k order). Raises :class:`DataError`
    naming the folder / files on any problem.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder of DICOM files")
    headers = _read_headers(folder, _candidate_files(folder))
    uid, members = _select_series(folder, headers, series_uid)
    geometry = _common_geometry(members)
    order, slice_spacing = _sort_and_space(members, geometry, folder)
    transfer_syntax = _check_decodable(members)
    rows, columns = geometry["size"]
    array = np.empty((columns, rows, len(order)), dtype=np.float32)
    for k, index in enumerate(order):
        array[:, :, k] = _slice_values(members[index][0], (rows, columns))
    affine = _ras_affine(geometry, geometry["positions"][order[0]], slice_spacing)
    metadata = {
        "source": str(folder),
        "series_instance_uid": uid,
        "modality": str(members[0][1].get("Modality", "") or ""),
        "transfer_syntax": transfer_syntax,
        # the slice files in k order: a DICOM-SEG written for this volume references them frame by frame
        "files": [str(members[index][0]) for index in order],
    }
    return Volume(array=array, affine=affine, metadata=metadata)
