"""Postprocessing of predicted label maps.

:func:`keep_largest_component` keeps, for each class, only its largest connected component (as
nnU-Net's "remove all but the largest component" postprocessing); the voxels removed become background
(0). :func:`keep_largest_component_of` does it for a group of classes taken as one mask (nnU-Net's
"largest foreground component" is the group of every foreground class), and :func:`apply_postprocessing`
runs a list of such groups in order: the form ``medseg-jax find-best`` chooses postprocessing in
(``postprocessing.json``). Works for label maps of any number of dimensions.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from medseg_jax.errors import ConfigError


def keep_largest_component(label_map: np.ndarray, classes=None, connectivity: int | None = None) -> np.ndarray:
    """A copy of ``label_map`` where each class in ``classes`` keeps only its largest connected component.

    ``classes``: class ids to process (default: every non-zero value present); other classes are left
    as they are. ``connectivity``: how many coordinates two neighbouring voxels may differ in, 1 (faces)
    to ``ndim`` (faces, edges and corners: 8-neighbourhood in 2D, 26 in 3D); default ``ndim``, the full
    connectivity nnU-Net uses. Of two largest components of equal size the one found first in C order
    is kept.
    """
    label_map = np.asarray(label_map)
    ndim = label_map.ndim
    if connectivity is None:
        connectivity = ndim
    if not 1 <= connectivity <= ndim:
        raise ConfigError(f"connectivity must lie in 1..{ndim} for a {ndim}D label map, got {connectivity}")
    structure = ndimage.generate_binary_structure(ndim, connectivity)
    if classes is None:
        classes = [int(k) for k in np.unique(label_map) if k != 0]
    out = label_map.copy()
    for k in classes:
        components, count = ndimage.label(label_map == k, structure=structure)
        if count <= 1:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0  # background of the class mask
        out[(components != 0) & (components != int(np.argmax(sizes)))] = 0
    return out


def keep_largest_component_of(label_map: np.ndarray, group, connectivity: int | None = None) -> np.ndarray:
    """A copy of ``label_map`` where the voxels of the classes in ``group``, taken together as one mask, keep
    only the mask's largest connected component; the rest of the mask becomes background (0). A group of
    one class is :func:`keep_largest_component` of that class."""
    label_map = np.asarray(label_map)
    mask = np.isin(label_map, [int(k) for k in group])
    kept = keep_largest_component(mask.astype(np.uint8), classes=[1], connectivity=connectivity)
    out = label_map.copy()
    out[mask & (kept == 0)] = 0
    return out


def check_postprocessing(steps, num_classes: int, where: str = "postprocessing") -> list[list[int]]:
    """``steps`` as a list of class groups (lists of foreground class ids below ``num_classes``), or a
    :class:`ConfigError` naming ``where`` and the first wrong entry."""
    if not isinstance(steps, list):
        raise ConfigError(f"{where}: expected a list of class groups such as [[1, 2], [1]], got {steps!r}")
    groups = []
    for index, group in enumerate(steps):
        if (
            not isinstance(group, list)
            or not group
            or not all(isinstance(k, int) and not isinstance(k, bool) and 1 <= k < num_classes for k in group)
        ):
            raise ConfigError(
                f"{where}[{index}]: {group!r} is not a non-empty list of foreground class ids 1..{num_classes - 1}"
            )
        groups.append([int(k) for k in group])
    return groups


def apply_postprocessing(label_map: np.ndarray, groups) -> np.ndarray:
    """:func:`keep_largest_component_of` each group of ``groups`` in turn (``[]``: the map unchanged)."""
    for group in groups:
        label_map = keep_largest_component_of(label_map, group)
    return label_map
