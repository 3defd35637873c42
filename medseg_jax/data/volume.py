"""A scan with its geometry (:class:`Volume`) and exact reorientation to RAS and back.

Convention used everywhere downstream: a :class:`Volume` holds the voxel array in *index order* (the
order of the file's voxel axes, ``array[i, j, k]``) and the 4x4 ``affine`` that maps voxel indices to
world coordinates in millimetres in NIfTI's RAS+ frame (+x towards the patient's Right, +y Anterior,
+z Superior). Multi-channel images are a list of volumes that share one affine, stacked to
``(C, *spatial)`` by the preprocessing.

:func:`to_ras` / :func:`from_ras` reorient a 3D volume to canonical RAS voxel order and back by axis
permutations and flips only (exact, no interpolation). Nothing is recorded on the side: the inverse
needs only the original file's affine and shape. Files are read and written by
:mod:`medseg_jax.data.image_io` (NIfTI) and :mod:`medseg_jax.data.dicom` (DICOM series), which both
build on this module and not on each other.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from medseg_jax.errors import DataError


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

    def with_array(self, array: np.ndarray) -> Volume:
        """The same geometry with other voxel values (shape must match)."""
        if array.shape != self.array.shape:
            raise DataError(f"shape {array.shape} does not match the volume's {self.array.shape}")
        return dataclasses.replace(self, array=array)


# --- canonical orientation -------------------------------------------------------------------------


def affine_problem(affine: np.ndarray, ndim: int = 3) -> str | None:
    """What makes a voxel -> world ``affine`` unusable for a ``ndim``-D image (non-finite entries, a voxel
    axis of zero length, axes that span no volume), or None. Such a header cannot be reoriented or
    resampled. Only the first ``ndim`` voxel axes are checked (a 2D file may leave the third empty)."""
    affine = np.asarray(affine, dtype=np.float64)
    if not np.isfinite(affine).all():
        return "the affine has NaN or infinite entries"
    lengths = np.linalg.norm(affine[:3, :ndim], axis=0)
    if (lengths == 0).any():
        return f"the affine is degenerate: voxel axis {int(np.argmin(lengths))} has zero length"
    if ndim == 3 and abs(np.linalg.det(affine[:3, :3])) <= 1e-6 * np.prod(lengths):
        return "the affine is degenerate: its voxel axes are linearly dependent"
    return None


def _orientation(affine: np.ndarray) -> np.ndarray:
    """nibabel orientation (axis, flip) of each voxel axis of a 3D ``affine``."""
    from nibabel.orientations import io_orientation

    problem = affine_problem(affine)
    if problem is None:
        ornt = io_orientation(np.asarray(affine, dtype=np.float64))
        if not np.isnan(ornt).any():
            return ornt
    raise DataError(f"{problem or 'the affine is degenerate'}:\n{affine}")


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


def array_from_ras(array: np.ndarray, reference_affine: np.ndarray, reference_shape: tuple[int, ...]) -> np.ndarray:
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


def permute_axes(volume: Volume, axes) -> Volume:
    """The same 3D volume with its voxel axes reordered: axis ``a`` of the result is axis ``axes[a]`` of
    ``volume``. Exact, like :func:`to_ras`: the affine's columns follow, so every voxel keeps its world
    position. Plans imported from nnU-Net use it to put the image in the axis order their network was
    trained in (:mod:`medseg_jax.nnunet.preprocessing`); ``permute_axes(result, np.argsort(axes))``
    undoes it."""
    axes = tuple(int(a) for a in axes)
    if volume.array.ndim != 3 or sorted(axes) != [0, 1, 2]:
        raise DataError(
            f"cannot reorder the axes of a volume of shape {volume.shape} by {axes}: needs a 3D volume and a "
            "permutation of 0, 1, 2"
        )
    affine = volume.affine.copy()
    affine[:3, :3] = volume.affine[:3, list(axes)]
    array = np.ascontiguousarray(np.transpose(volume.array, axes))
    return Volume(array=array, affine=affine, metadata=dict(volume.metadata))
