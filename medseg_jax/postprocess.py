"""Postprocessing of predicted label maps.

:func:`keep_largest_component` keeps, for each class, only its largest connected component (as
nnU-Net's "remove all but the largest component" postprocessing); the voxels removed become background
(0). Works for label maps of any number of dimensions.
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
