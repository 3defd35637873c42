"""Surface elements ("surfels") of binary masks, by the neighbour-code construction of Nikolov et al.

Reference: S. Nikolov et al., "Clinically applicable segmentation of head and neck anatomy for
radiotherapy", JMIR 2021 (arXiv:1809.04430), and its open-source implementation, the DeepMind
``surface-distance`` package (``compute_surface_distances`` and ``lookup_tables``), which MONAI's
``use_subvoxels=True`` and TotalSegmentator's evaluation reuse.

The surface of a mask is the boundary between its voxels and the background, not a set of voxels. It
is represented on the grid of voxel *corners* ("vertices"): vertex ``v`` sits between voxels ``v - 1``
and ``v`` along each axis, so a crop of ``n`` voxels has ``n + 1`` vertices per axis. Each vertex sees
the ``2^N`` voxels around it (a 2x2 square in 2D, a 2x2x2 cube in 3D); their inside/outside pattern is
the vertex's *neighbour code* (bit ``2^N - 1 - i`` for the ``i``-th voxel in C order, the DeepMind
encoding: in 3D the voxel at offset (1, 1, 1) is bit 1, the one at (0, 0, 0) bit 128). A vertex whose
code is neither all-outside nor all-inside is a surface element, and it carries the area (contour
length in 2D) of the piece of the marching-cubes (marching-squares) surface that passes through its
cell, computed with the voxel spacing. Outside the array everything is background, so a mask that
touches the image border is closed there.

The area of each of the 16 (2D) or 256 (3D) codes is derived here rather than copied from a table:

- the surface crosses each cell edge whose two voxels differ, at its midpoint;
- on every square face of the cell the crossing points are joined in pairs so that each segment cuts
  off one corner; on an ambiguous face (two diagonal corners inside, two outside) the corners cut off
  are those of the minority class of the whole cell (the inside voxels when at most half are inside),
  which gives a code and its complement the same surface;
- in 2D these segments are the surface; in 3D they close into polygons, each split into the
  triangulation of largest total area in voxel units.

With these rules every one of the 256 entries equals the DeepMind table ``_NEIGHBOUR_CODE_TO_NORMALS``
summed as in its ``create_table_neighbour_code_to_surface_area`` (checked for several anisotropic
spacings), and the 2D entries equal its ``create_table_neighbour_code_to_contour_length``.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np

from medseg_jax.errors import DataError

SUPPORTED_DIMS = (2, 3)


def corner_weights(ndim: int) -> np.ndarray:
    """Bit weight of each voxel around a vertex, shape ``(2,) * ndim``: ``2^(2^ndim - 1 - i)`` in C order.

    For ``ndim=2`` this is ``[[8, 4], [2, 1]]``; the weight at offset ``o`` belongs to voxel ``v - 1 + o``
    of vertex ``v``.
    """
    n_corners = 2**ndim
    return (2 ** np.arange(n_corners - 1, -1, -1, dtype=np.int64)).reshape((2,) * ndim)


def neighbour_codes(padded: np.ndarray) -> np.ndarray:
    """Neighbour code of every vertex of a boolean mask padded by one background voxel on every side.

    ``padded`` has shape ``(n_0 + 2, ..., n_{N-1} + 2)`` for a crop of ``n_i`` voxels; the result has
    shape ``(n_0 + 1, ...)`` (one entry per vertex of the crop), dtype uint8 (N <= 3).
    """
    weights = corner_weights(padded.ndim)
    out_shape = tuple(n - 1 for n in padded.shape)
    codes = np.zeros(out_shape, dtype=np.uint8)
    for offset in itertools.product((0, 1), repeat=padded.ndim):
        window = tuple(slice(o, o + n) for o, n in zip(offset, out_shape))
        codes += padded[window].astype(np.uint8) * np.uint8(weights[offset])
    return codes


def surfel_area_table(spacing) -> np.ndarray:
    """Area in mm^2 (3D) or contour length in mm (2D) of the surface piece of each neighbour code.

    Shape ``(2^(2^N),)``; entries 0 (all outside) and the last (all inside) are 0.
    """
    spacing = tuple(float(s) for s in spacing)
    return _surfel_area_table(spacing).copy()


@functools.lru_cache(maxsize=64)
def _surfel_area_table(spacing: tuple[float, ...]) -> np.ndarray:
    ndim = len(spacing)
    if ndim not in SUPPORTED_DIMS:
        raise DataError(f"surface elements are defined for 2D and 3D masks, got spacing {spacing}")
    if not all(s > 0 and math.isfinite(s) for s in spacing):
        raise DataError(f"spacing must be positive and finite, got {spacing}")
    codes, vertices = _surface_simplices(ndim)
    # an (N-1)-simplex's measure from the Gram determinant of its edge vectors scaled to mm
    edges = (vertices[:, 1:, :] - vertices[:, :1, :]) * np.asarray(spacing)
    gram = edges @ np.swapaxes(edges, 1, 2)
    measure = np.sqrt(np.clip(np.linalg.det(gram), 0.0, None)) / math.factorial(ndim - 1)
    return np.bincount(codes, weights=measure, minlength=2 ** (2**ndim))


@functools.cache
def _surface_simplices(ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """Every code's surface as simplices in unit-cell coordinates: ``(codes (T,), vertices (T, N, N))``.

    Segments in 2D, triangles in 3D; ``vertices[t, j]`` is the ``j``-th point of simplex ``t``.
    """
    corners = list(itertools.product((0, 1), repeat=ndim))
    codes, simplices = [], []
    for code in range(1, 2 ** (2**ndim) - 1):
        inside = {c for i, c in enumerate(corners) if code >> (2**ndim - 1 - i) & 1}
        segments = _face_segments(corners, inside)
        pieces = segments if ndim == 2 else [t for p in _close_polygons(segments) for t in _max_area_triangles(p)]
        for piece in pieces:
            codes.append(code)
            simplices.append(np.array([np.add(a, b) / 2.0 for a, b in piece]))
    return np.array(codes, dtype=np.int64), np.array(simplices, dtype=np.float64)


def _face_segments(corners: list[tuple[int, ...]], inside: set) -> list[tuple[tuple, tuple]]:
    """Segments (pairs of cut cell edges) on every square face of the cell; a cut edge is a corner pair."""
    ndim = len(corners[0])
    minority_inside = 2 * len(inside) <= len(corners)
    segments = []
    for free in itertools.combinations(range(ndim), 2):
        fixed_axes = [a for a in range(ndim) if a not in free]
        for fixed in itertools.product((0, 1), repeat=len(fixed_axes)):
            face = [c for c in corners if all(c[a] == v for a, v in zip(fixed_axes, fixed))]
            cut = [
                (a, b)
                for a, b in itertools.combinations(face, 2)
                if sum(x != y for x, y in zip(a, b)) == 1 and (a in inside) != (b in inside)
            ]
            if len(cut) == 2:
                segments.append((cut[0], cut[1]))
            elif len(cut) == 4:  # ambiguous face: cut off the two minority corners
                for corner in face:
                    if (corner in inside) == minority_inside:
                        pair = [e for e in cut if corner in e]
                        segments.append((pair[0], pair[1]))
    return segments


def _close_polygons(segments: list[tuple]) -> list[list[tuple]]:
    """Chain face segments into closed polygons (lists of cut edges in order around the polygon)."""
    neighbours: dict[tuple, list[tuple]] = {}
    for a, b in segments:
        neighbours.setdefault(a, []).append(b)
        neighbours.setdefault(b, []).append(a)
    polygons, seen = [], set()
    for start in neighbours:
        if start in seen:
            continue
        polygon, previous, current = [start], None, start
        seen.add(start)
        while True:
            following = [e for e in neighbours[current] if e != previous and e not in seen]
            if not following:
                break
            previous, current = current, following[0]
            polygon.append(current)
            seen.add(current)
        polygons.append(polygon)
    return polygons


def _max_area_triangles(polygon: list[tuple]) -> list[tuple]:
    """Triangulation of a (possibly non-planar) polygon with the largest total area in voxel units.

    Dynamic programme over diagonals (polygon triangulation, O(n^3)); triangles are triples of cut edges.
    """
    points = [np.add(a, b) / 2.0 for a, b in polygon]
    n = len(points)

    def area(i, j, k):
        return 0.5 * float(np.linalg.norm(np.cross(points[j] - points[i], points[k] - points[i])))

    # (best area, split vertex); adjacent pairs have no split vertex.
    best: dict[tuple[int, int], tuple[float, int | None]] = {(i, i + 1): (0.0, None) for i in range(n - 1)}
    for gap in range(2, n):
        for i in range(n - gap):
            j = i + gap
            best[i, j] = max(
                ((best[i, k][0] + best[k, j][0] + area(i, k, j), k) for k in range(i + 1, j)), key=lambda item: item[0]
            )
    triangles: list[tuple] = []
    stack = [(0, n - 1)]
    while stack:
        i, j = stack.pop()
        k = best[i, j][1]
        if k is None:
            continue
        triangles.append((polygon[i], polygon[k], polygon[j]))
        stack += [(i, k), (k, j)]
    return triangles
