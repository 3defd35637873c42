"""Reading and writing scans as :class:`~medseg_jax.data.volume.Volume` s: NIfTI files and DICOM series.

:func:`read_image` dispatches on the path: a ``.nii`` / ``.nii.gz`` file is read with nibabel (array in
the file's voxel order, affine kept), a folder as one DICOM series (:mod:`medseg_jax.data.dicom`).
:func:`write_nifti` writes atomically. :func:`read_case` reads one case's channel files and label and
refuses what would poison every later step (shapes that disagree, NaN or infinite voxels), naming the
file. The module is named ``image_io`` rather than ``io`` so that it never shadows the standard module.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np

from medseg_jax.atomic import atomic_path
from medseg_jax.data.dicom import read_dicom_series
from medseg_jax.data.volume import Volume
from medseg_jax.errors import DataError

if TYPE_CHECKING:  # nibabel is imported lazily at run time
    from nibabel.spatialimages import SpatialImage

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).endswith(NIFTI_SUFFIXES)


def read_nifti(path: str | os.PathLike) -> Volume:
    """Read a NIfTI file into a :class:`Volume` (array in the file's voxel order, affine kept)."""
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        # nib.load is typed as returning any FileBasedImage; every format it picks for a file has voxels
        # and an affine, so the spatial subclass states what is used (no run-time check, as before).
        image = cast("SpatialImage", nib.load(str(path)))
        array = np.asarray(image.dataobj)
    except Exception as exc:  # nibabel raises many types for truncated / foreign files
        raise DataError(f"{path}: not a readable NIfTI file ({exc})") from exc
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3):
        raise DataError(f"{path}: expected a 2D or 3D image, found shape {array.shape}")
    return Volume(array=array, affine=image.affine, metadata={"source": str(path)})


def read_nifti_header(path: str | os.PathLike) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine of a NIfTI file without reading its voxels (for fast dataset validation)."""
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        image = cast("SpatialImage", nib.load(str(path)))  # see read_nifti
    except Exception as exc:
        raise DataError(f"{path}: not a readable NIfTI file ({exc})") from exc
    shape = tuple(int(s) for s in image.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    return shape, np.asarray(image.affine, dtype=np.float64)


def write_nifti(volume: Volume, path: str | os.PathLike, dtype=None) -> Path:
    """Write ``volume`` to ``path`` atomically (temporary file in the same folder, then rename).

    On any failure the temporary file is removed and a :class:`DataError` naming ``path`` is raised,
    so a reader never sees a half-written file.
    """
    import nibabel as nib

    path = Path(path)
    if not is_nifti(path):
        raise DataError(f"{path}: output name must end with .nii.gz or .nii")
    path.parent.mkdir(parents=True, exist_ok=True)
    array = volume.array if dtype is None else volume.array.astype(dtype)
    image = nib.Nifti1Image(array, volume.affine)
    image.header.set_qform(volume.affine, code=1)
    image.header.set_sform(volume.affine, code=1)
    try:
        with atomic_path(path) as tmp:
            nib.save(image, str(tmp))
    except Exception as exc:
        raise DataError(f"{path}: could not write NIfTI file ({exc})") from exc
    return path


def read_image(path: str | os.PathLike, series_uid: str | None = None) -> Volume:
    """Read a scan: a NIfTI file (``.nii`` / ``.nii.gz``) or a folder holding one DICOM series.

    ``series_uid`` picks one series of a DICOM folder that holds several; for a NIfTI file it is an
    error, as silently ignoring it would predict a scan the caller did not ask for.
    """
    path = Path(path)
    if path.is_dir():
        return read_dicom_series(path, series_uid)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if series_uid is not None:
        raise DataError(f"{path}: a series UID ({series_uid}) selects a series of a DICOM folder, not of a file")
    if is_nifti(path):
        return read_nifti(path)
    raise DataError(
        f"{path}: unsupported image; expected a .nii / .nii.gz file or a folder of DICOM files "
        "(pass the series' folder, not a single DICOM file)"
    )


def check_finite(volume: Volume, what: str = "image") -> None:
    """DataError naming the volume's file if any voxel is NaN or infinite.

    Checked when a case is read, because a single infinite voxel turns the dataset's intensity
    statistics (and the plan written from them) into NaN, and the failure would otherwise surface
    much later, in another case.
    """
    if np.issubdtype(volume.array.dtype, np.integer) or volume.array.dtype == bool:
        return
    bad = ~np.isfinite(volume.array)
    if bad.any():
        where = np.unravel_index(int(np.argmax(bad)), bad.shape)
        raise DataError(
            f"{volume.metadata.get('source', '<in-memory volume>')}: {what} has {int(bad.sum())} "
            f"NaN or infinite voxel(s) (first at index {tuple(int(i) for i in where)})"
        )


def read_case(
    image_paths: Sequence[str | os.PathLike], label_path: str | os.PathLike | None
) -> tuple[list[Volume], Volume | None]:
    """A case's channel volumes (in channel order) and optional label (NIfTI files or DICOM folders).

    Raises DataError naming the file for a NaN or infinite voxel, and naming every file with its shape
    when channel and label shapes differ.
    """
    images = [read_image(p) for p in image_paths]
    label = read_image(label_path) if label_path is not None else None
    for volume in images:
        check_finite(volume, "image")
    if label is not None:
        check_finite(label, "label")
    volumes = images + ([label] if label is not None else [])
    if len({v.shape for v in volumes}) != 1:
        shapes = ", ".join(f"{v.metadata.get('source')} {v.shape}" for v in volumes)
        raise DataError(f"channel and label shapes differ: {shapes}")
    return images, label
