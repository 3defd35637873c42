"""Reading and writing volumes with their geometry.

Convention used everywhere downstream: a :class:`Volume` holds the voxel array in *index order* (the
order of the file's voxel axes, ``array[i, j, k]``) and the 4x4 ``affine`` that maps voxel indices to
world coordinates in millimetres in NIfTI's RAS+ frame (+x towards the patient's Right, +y Anterior,
+z Superior). Multi-channel images are a list of
volumes that share one affine, stacked to ``(C, *spatial)`` by the preprocessing.

:func:`to_ras` / :func:`from_ras` reorient a 3D volume to canonical RAS voxel order and back by axis
permutations and flips only (exact, no interpolation). Nothing is recorded on the side: the inverse
needs only the original file's affine and shape. DICOM series are read by
:mod:`medseg_jax.data.dicom`; :func:`read_image` dispatches on the path.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from medseg_jax.atomic import atomic_path
from medseg_jax.errors import DataError

NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclasses.dataclass(frozen=True)
class Volume:
    """A 2D or 3D scan: the voxel array, its voxel->world (RAS, mm) affine and free-form metadata."""

    array: np.ndarray
    affine: np.ndarray
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise DataError(f"affine must be 4x4, got shape {affine.shape}")
        if self.array.ndim not in (2, 3):
            raise DataError(f"a volume must be 2D or 3D, got an array of shape {self.array.shape}")
        object.__setattr__(self, "affine", affine)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each array axis (length of the affine's columns)."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return tuple(float(s) for s in norms[: self.array.ndim])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def with_array(self, array: np.ndarray) -> "Volume":
        """The same geometry with other voxel values (shape must match)."""
        if array.shape != self.array.shape:
            raise DataError(f"shape {array.shape} does not match the volume's {self.array.shape}")
        return dataclasses.replace(self, array=array)


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).endswith(NIFTI_SUFFIXES)


def read_nifti(path: str | os.PathLike) -> Volume:
    """Read a NIfTI file into a :class:`Volume` (array in the file's voxel order, affine kept)."""
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        image = nib.load(str(path))
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
        image = nib.load(str(path))
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


def read_dicom_series(folder: str | os.PathLike, series_uid: str | None = None) -> Volume:
    """Read a folder of single-frame DICOM files as one 3D volume (HU, RAS affine).

    See :func:`medseg_jax.data.dicom.read_dicom_series` for the rules (file selection, sorting,
    spacing checks). Imported lazily so NIfTI-only users never import pydicom.
    """
    from medseg_jax.data import dicom

    return dicom.read_dicom_series(folder, series_uid=series_uid)


def read_image(path: str | os.PathLike) -> Volume:
    """Read a scan: a NIfTI file (``.nii`` / ``.nii.gz``) or a folder holding one DICOM series."""
    path = Path(path)
    if path.is_dir():
        return read_dicom_series(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if is_nifti(path):
        return read_nifti(path)
    raise DataError(
        f"{path}: unsupported image; expected a .nii / .nii.gz file or a folder of DICOM files "
        "(pass the series' folder, not a single DICOM file)"
    )


# --- canonical orientation -------------------------------------------------------------------------


def _orientation(affine: np.ndarray) -> np.ndarray:
    """nibabel orientation (axis, flip) of each voxel axis of a 3D ``affine``."""
    from nibabel.orientations import io_orientation

    ornt = io_orientation(np.asarray(affine, dtype=np.float64))
    if np.isnan(ornt).any():
        raise DataError(f"affine is degenerate (a voxel axis has zero length):\n{affine}")
    return ornt


def _reorient_trailing(array: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """Apply a nibabel orientation ``transform`` to the last ``len(transform)`` axes of ``array``.

    Leading axes (channels, classes) are left alone; nibabel works on leading axes, hence the moves.
    """
    from nibabel.orientations import apply_orientation

    n_spatial = len(transform)
    n_leading = array.ndim - n_spatial
    if n_leading < 0:
        raise DataError(f"array of shape {array.shape} has fewer than {n_spatial} spatial axes")
    leading = list(range(n_leading))
    moved = np.moveaxis(array, leading, [array.ndim - n_leading + a for a in leading])
    moved = apply_orientation(moved, transform)
    return np.ascontiguousarray(np.moveaxis(moved, [moved.ndim - n_leading + a for a in leading], leading))


def _ras_transform(affine: np.ndarray) -> np.ndarray:
    from nibabel.orientations import axcodes2ornt, ornt_transform

    return ornt_transform(_orientation(affine), axcodes2ornt(("R", "A", "S")))


def _from_ras_transform(reference_affine: np.ndarray) -> np.ndarray:
    from nibabel.orientations import axcodes2ornt, ornt_transform

    return ornt_transform(axcodes2ornt(("R", "A", "S")), _orientation(reference_affine))


def ras_shape(reference_affine: np.ndarray, reference_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Spatial shape that a 3D array of ``reference_shape`` has after :func:`to_ras`."""
    transform = _ras_transform(reference_affine)
    shape = [0, 0, 0]
    for axis, (target, _flip) in enumerate(transform):
        shape[int(target)] = int(reference_shape[axis])
    return tuple(shape)


def array_to_ras(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Reorder the last 3 axes of ``array`` (file voxel order of ``affine``) into RAS voxel order.

    ``array`` is ``(*leading, x, y, z)``: leading axes (channels, classes) are kept as they are.
    """
    return _reorient_trailing(np.asarray(array), _ras_transform(affine))


def array_from_ras(
    array: np.ndarray, reference_affine: np.ndarray, reference_shape: tuple[int, ...]
) -> np.ndarray:
    """Inverse of :func:`array_to_ras`: ``(*leading, *ras_spatial)`` back to the reference's voxel order.

    Works for images, label maps and per-class probabilities ``(K, *spatial)`` alike: values are only
    moved, never interpolated, so dtypes and label values are preserved.
    """
    array = np.asarray(array)
    reference_shape = tuple(int(s) for s in reference_shape)
    expected = ras_shape(reference_affine, reference_shape)
    if array.shape[-3:] != expected:
        raise DataError(
            f"array of spatial shape {array.shape[-3:]} is not the RAS view of a reference of shape "
            f"{reference_shape} (expected {expected})"
        )
    return _reorient_trailing(array, _from_ras_transform(reference_affine))


def to_ras(volume: Volume) -> Volume:
    """The same 3D volume with its voxel axes permuted/flipped so the affine is closest to RAS+.

    Exact (values are moved, not interpolated); world coordinates of every voxel are unchanged, only
    its index changes. ``nibabel.aff2axcodes`` of the result is ``('R', 'A', 'S')``. 2D volumes are
    returned unchanged. Undo with ``from_ras(result, volume.affine, volume.shape)``.
    """
    from nibabel.orientations import inv_ornt_aff

    if volume.array.ndim == 2:
        return volume
    transform = _ras_transform(volume.affine)
    array = _reorient_trailing(volume.array, transform)
    affine = volume.affine @ inv_ornt_aff(transform, volume.shape)
    return Volume(array=array, affine=affine, metadata=dict(volume.metadata))


def from_ras(volume: Volume, reference_affine: np.ndarray, reference_shape: tuple[int, ...]) -> Volume:
    """Undo :func:`to_ras`: back to the voxel order of the reference (the original file's geometry).

    ``volume`` must lie on the RAS view of the reference grid (same voxels, e.g. a label map or one
    class of probabilities predicted on the reoriented image); otherwise :class:`DataError`. The result
    carries ``reference_affine`` itself, so ``from_ras(to_ras(v), v.affine, v.shape)`` equals ``v``
    exactly (array and affine). For ``(K, *spatial)`` arrays use :func:`array_from_ras`.
    2D volumes are returned unchanged.
    """
    from nibabel.orientations import inv_ornt_aff

    reference_affine = np.asarray(reference_affine, dtype=np.float64)
    reference_shape = tuple(int(s) for s in reference_shape)
    if volume.array.ndim != len(reference_shape):
        raise DataError(f"volume of shape {volume.shape} does not match reference shape {reference_shape}")
    if volume.array.ndim == 2:
        if volume.shape != reference_shape:
            raise DataError(f"volume of shape {volume.shape} does not match reference shape {reference_shape}")
        return volume
    array = array_from_ras(volume.array, reference_affine, reference_shape)
    transform = _from_ras_transform(reference_affine)
    affine = volume.affine @ inv_ornt_aff(transform, volume.shape)
    # A float round trip of the affine is not bit-exact; the reference is the ground truth, so check
    # that the grids agree and then return the reference itself.
    if not np.allclose(affine, reference_affine, rtol=0.0, atol=1e-3):
        raise DataError(
            "volume does not lie on the RAS view of the reference grid: its affine maps back to\n"
            f"{affine}\nbut the reference affine is\n{reference_affine}"
        )
    return Volume(array=array, affine=reference_affine.copy(), metadata=dict(volume.metadata))
