"""Surface metrics on hand-computed shapes with anisotropic spacing.

The surface of a mask is the marching-squares / marching-cubes surface through the midpoints between
inside and outside voxel centres. For an axis-aligned box of ``n_i`` voxels that surface is the box
spanned by the outer voxel faces with its edges and corners cut at 45 degrees in voxel units: flat faces
of ``(n_i - 1) s_i`` by ``(n_j - 1) s_j``, chamfer strips of width ``|(s_i, s_j)| / 2`` along the edges,
and corner triangles (3D) or corner segments (2D). Its surface elements sit on the vertices of the
corner grid: a vertex inside a face carries a full face cell, one on an edge a chamfer strip piece, a
corner vertex the corner piece.
"""

import math

import numpy as np
import pytest

from medseg_jax.errors import ConfigError, DataError
from medseg_jax.metrics.surface import (
    average_symmetric_surface_distance,
    hausdorff_distance,
    normalized_surface_dice,
    surface_distances,
)
from medseg_jax.metrics.surfels import corner_weights, surfel_area_table


def box(shape, start, size):
    mask = np.zeros(shape, bool)
    mask[tuple(slice(a, a + n) for a, n in zip(start, size))] = True
    return mask


def chamfered_rectangle_perimeter(n, s):
    diagonal = math.hypot(s[0], s[1])
    return 2 * (n[0] - 1) * s[0] + 2 * (n[1] - 1) * s[1] + 4 * diagonal / 2


def chamfered_box_area(n, s):
    faces = 2 * (
        (n[1] - 1) * (n[2] - 1) * s[1] * s[2]
        + (n[0] - 1) * (n[2] - 1) * s[0] * s[2]
        + (n[0] - 1) * (n[1] - 1) * s[0] * s[1]
    )
    strips = 4 * (
        (n[0] - 1) * s[0] * math.hypot(s[1], s[2]) / 2
        + (n[1] - 1) * s[1] * math.hypot(s[0], s[2]) / 2
        + (n[2] - 1) * s[2] * math.hypot(s[0], s[1]) / 2
    )
    corner_triangle = math.sqrt((s[1] * s[2]) ** 2 + (s[0] * s[2]) ** 2 + (s[0] * s[1]) ** 2) / 8
    return faces + strips + 8 * corner_triangle


def test_corner_weights_match_the_published_encoding():
    assert corner_weights(2).tolist() == [[8, 4], [2, 1]]
    assert corner_weights(3).tolist() == [[[128, 64], [32, 16]], [[8, 4], [2, 1]]]


def test_area_table_entries_by_hand():
    s = (0.7, 1.3, 2.9)
    table = surfel_area_table(s)
    assert table[0] == 0 and table[255] == 0
    # one voxel inside (offset (1,1,1)): the corner triangle
    assert table[1] == pytest.approx(math.sqrt((s[1] * s[2]) ** 2 + (s[0] * s[2]) ** 2 + (s[0] * s[1]) ** 2) / 8)
    assert table[254] == pytest.approx(table[1])  # the complement has the same surface
    # voxels (1,1,1) and (1,1,0): an edge along axis 2 -> a chamfer piece of length s2
    assert table[1 | 2] == pytest.approx(s[2] * math.hypot(s[0], s[1]) / 2)
    # the four voxels with offset 1 along axis 0: a flat cell of s1 x s2
    assert table[1 | 2 | 4 | 8] == pytest.approx(s[1] * s[2])
    # three voxels of one face, (1,1,1), (1,1,0), (1,0,1): a non-planar pentagon, triangulated as the
    # flat triangle in the plane x0 = 1/2 (area s1 s2 / 2) plus two triangles with normals (1,1,1)/4 and /8
    normal = math.sqrt((s[1] * s[2]) ** 2 + (s[0] * s[2]) ** 2 + (s[0] * s[1]) ** 2)
    pentagon = s[1] * s[2] / 2 + (1 / 4 + 1 / 8) * normal
    assert table[1 | 2 | 4] == pytest.approx(pentagon)
    table_2d = surfel_area_table(s[:2])
    assert table_2d[1] == pytest.approx(math.hypot(*s[:2]) / 2)
    assert table_2d[0b0011] == pytest.approx(s[1]) and table_2d[0b0101] == pytest.approx(s[0])
    assert table_2d[0b0110] == pytest.approx(math.hypot(*s[:2]))  # saddle: two corner segments


@pytest.mark.parametrize("n,s", [((5, 7), (0.5, 2.0)), ((1, 3), (1.0, 1.0)), ((9, 4), (3.0, 0.25))])
def test_rectangle_perimeter_is_analytic(n, s):
    mask = box((16, 16), (3, 4), n)
    distances = surface_distances(mask, mask, s)
    assert distances.areas_ref.sum() == pytest.approx(chamfered_rectangle_perimeter(n, s))


@pytest.mark.parametrize(
    "n,s", [((4, 6, 5), (0.7, 1.3, 2.9)), ((1, 1, 1), (1.0, 1.0, 1.0)), ((2, 9, 3), (2.5, 0.4, 1.0))]
)
def test_box_surface_area_is_analytic(n, s):
    mask = box((12, 14, 10), (2, 3, 1), n)
    distances = surface_distances(mask, mask, s)
    assert distances.areas_ref.sum() == pytest.approx(chamfered_box_area(n, s))


def test_box_touching_the_image_border_is_closed():
    n, s = (4, 6, 5), (0.7, 1.3, 2.9)
    distances = surface_distances(box(n, (0, 0, 0), n), box(n, (0, 0, 0), n), s)
    assert distances.areas_ref.sum() == pytest.approx(chamfered_box_area(n, s))


@pytest.mark.parametrize("ndim", [2, 3])
def test_identical_masks(ndim):
    rng = np.random.default_rng(ndim)
    mask = rng.random((12,) * ndim) < 0.4
    distances = surface_distances(mask, mask, (0.8, 2.0, 1.5)[:ndim])
    assert hausdorff_distance(distances) == 0.0
    assert average_symmetric_surface_distance(distances) == 0.0
    assert normalized_surface_dice(distances, 0.0) == 1.0


def test_shifted_rectangle_2d():
    """A rectangle of n = (6, 8) voxels shifted by k = 2 along axis 0, spacing (0.5, 2.0).

    Reference vertices: the top row (corners too) is k s0 = 1 mm from the shifted rectangle; the bottom
    row's inner vertices are min(k s0, distance to the shifted sides >= s1) = 1 mm, its corners lie on
    the shifted sides (0); the side columns at row a + m are (k - m) s0 away for m < k, else 0. The
    shifted rectangle's distances mirror these.
    """
    n, k, s = (6, 8), 2, (0.5, 2.0)
    ref, pred = box((20, 14), (3, 3), n), box((20, 14), (3 + k, 3), n)
    distances = surface_distances(ref, pred, s)
    diagonal = math.hypot(*s)
    top = k * s[0] * (2 * diagonal / 2 + (n[1] - 1) * s[1])
    bottom = k * s[0] * (n[1] - 1) * s[1]
    sides = 2 * s[0] * sum((k - m) * s[0] for m in range(1, k))
    perimeter = chamfered_rectangle_perimeter(n, s)
    assert distances.areas_pred.sum() == pytest.approx(perimeter)
    assert average_symmetric_surface_distance(distances) == pytest.approx((top + bottom + sides) / perimeter)
    assert hausdorff_distance(distances) == pytest.approx(k * s[0])
    assert hausdorff_distance(distances, 100) == pytest.approx(k * s[0])
    # within 0.4 mm only the distance-0 part: the side columns from row a + k on and the bottom corners
    zero = perimeter - (top + bottom) / (k * s[0]) - 2 * s[0] * (k - 1)
    assert normalized_surface_dice(distances, 0.4) == pytest.approx(zero / perimeter)
    assert normalized_surface_dice(distances, k * s[0]) == 1.0


def test_shifted_box_3d():
    """A box of n = (5, 4, 6) voxels shifted by k = 2 along axis 0, spacing (0.6, 1.5, 2.0) (s1, s2 >= k s0).

    The reference's low face (with its edges and corners) is k s0 from the shifted box, the inner
    vertices of its high face also k s0 (the shifted side faces are at least s1 >= k s0 away), the side
    ring at level a + m is (k - m) s0 away for m < k, everything else 0; the shifted box mirrors this.
    """
    n, k, s = (5, 4, 6), 2, (0.6, 1.5, 2.0)
    ref, pred = box((12, 8, 10), (1, 2, 2), n), box((12, 8, 10), (1 + k, 2, 2), n)
    distances = surface_distances(ref, pred, s)
    corner = math.sqrt((s[1] * s[2]) ** 2 + (s[0] * s[2]) ** 2 + (s[0] * s[1]) ** 2) / 8
    face = (n[1] - 1) * (n[2] - 1) * s[1] * s[2]
    low_face = (
        face
        + 2 * (n[1] - 1) * s[1] * math.hypot(s[0], s[2]) / 2
        + 2 * (n[2] - 1) * s[2] * math.hypot(s[0], s[1]) / 2
        + 4 * corner
    )
    ring = s[0] * chamfered_rectangle_perimeter(n[1:], s[1:])  # one level of the side faces
    far = low_face + face  # at distance k s0
    weighted = k * s[0] * far + sum((k - m) * s[0] * ring for m in range(1, k))
    area = chamfered_box_area(n, s)
    assert distances.areas_ref.sum() == pytest.approx(area)
    assert average_symmetric_surface_distance(distances) == pytest.approx(weighted / area)
    assert hausdorff_distance(distances) == pytest.approx(k * s[0])
    assert normalized_surface_dice(distances, 0.5 * s[0]) == pytest.approx((area - far - (k - 1) * ring) / area)
    assert normalized_surface_dice(distances, (k - 0.5) * s[0]) == pytest.approx((area - far) / area)
    assert normalized_surface_dice(distances, k * s[0]) == 1.0


@pytest.mark.parametrize("spacing,shape", [((0.5, 1.0), (48, 24)), ((0.5, 0.5, 1.0), (40, 40, 22))])
def test_concentric_spheres(spacing, shape):
    """Spheres (circles in 2D) of radius 6 and 9 mm around one centre: every distance is 3 mm give or take
    one voxel diagonal |s|. A surface vertex's cell holds an inside and an outside voxel centre, each half
    a diagonal away, so the vertex lies within |s| / 2 of its true sphere; the vertices of the other
    surface cover that sphere as densely.
    """
    grid = np.indices(shape).astype(float)
    radius = np.sqrt(sum(((g - (n - 1) / 2) * s) ** 2 for g, s, n in zip(grid, spacing, shape)))
    distances = surface_distances(radius <= 6.0, radius <= 9.0, spacing)
    diagonal = math.sqrt(sum(s * s for s in spacing))
    assert abs(hausdorff_distance(distances) - 3.0) <= diagonal
    assert abs(average_symmetric_surface_distance(distances) - 3.0) <= diagonal
    assert normalized_surface_dice(distances, 3.0 + diagonal) == 1.0
    assert normalized_surface_dice(distances, 3.0 - diagonal - 1e-6) == 0.0
    assert 0.0 < normalized_surface_dice(distances, 3.0) < 1.0


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("surface", ["element", "voxel"])
def test_empty_masks_under_both_conventions(ndim, surface):
    shape, spacing = (8,) * ndim, (1.0, 2.0, 0.5)[:ndim]
    full, none = box(shape, (2,) * ndim, (3,) * ndim), np.zeros(shape, bool)
    nan, inf = float("nan"), float("inf")
    expected = {  # (reference, prediction) -> convention -> (hd95, assd, nsd)
        ("empty", "empty"): {"nnunet": (nan, nan, nan), "monai": (nan, nan, nan)},
        ("empty", "full"): {"nnunet": (inf, inf, 0.0), "monai": (nan, nan, nan)},
        ("full", "empty"): {"nnunet": (inf, inf, 0.0), "monai": (inf, inf, 0.0)},
    }
    masks = {"empty": none, "full": full}
    for (ref_name, pred_name), by_convention in expected.items():
        distances = surface_distances(masks[ref_name], masks[pred_name], spacing, surface=surface)
        for convention, values in by_convention.items():
            got = (
                hausdorff_distance(distances, empty=convention),
                average_symmetric_surface_distance(distances, empty=convention),
                normalized_surface_dice(distances, 1.0, empty=convention),
            )
            np.testing.assert_array_equal(got, values, err_msg=f"{ref_name}/{pred_name}/{convention}")


def test_voxel_surface_definition_by_hand():
    """Edge voxels (MONAI's default): a 3x3 square's 8 border voxels vs the same square shifted by one
    column (spacing 2 along axis 1): in each direction 3 of the 8 edge voxels are 2 mm away (the column
    the other square lacks), 1 is 1 mm away (its middle voxel is the other square's centre), 4 are 0."""
    ref, pred = box((9, 9), (3, 3), (3, 3)), box((9, 9), (3, 4), (3, 3))
    distances = surface_distances(ref, pred, (1.0, 2.0), surface="voxel")
    assert distances.areas_ref.sum() == 8 and distances.areas_pred.sum() == 8
    assert average_symmetric_surface_distance(distances) == pytest.approx((3 * 2.0 + 1.0) * 2 / 16)
    assert hausdorff_distance(distances) == pytest.approx(2.0)  # 95th percentile of 0,0,0,0,1,2,2,2
    assert normalized_surface_dice(distances, 1.0) == pytest.approx(10 / 16)


def test_bad_inputs_are_rejected():
    mask = np.ones((4, 4), bool)
    with pytest.raises(DataError, match="shape"):
        surface_distances(mask, np.ones((4, 5), bool), (1.0, 1.0))
    with pytest.raises(DataError, match="spacing"):
        surface_distances(mask, mask, (1.0,))
    with pytest.raises(DataError, match="spacing"):
        surface_distances(mask, mask, (1.0, 0.0))
    with pytest.raises(ConfigError, match="surface"):
        surface_distances(mask, mask, (1.0, 1.0), surface="mesh")
    with pytest.raises(DataError, match="2D and 3D"):
        surface_distances(np.ones((2, 2, 2, 2), bool), np.ones((2, 2, 2, 2), bool), (1.0,) * 4)
    with pytest.raises(ConfigError, match="convention"):
        hausdorff_distance(surface_distances(mask, mask, (1.0, 1.0)), empty="zero")
