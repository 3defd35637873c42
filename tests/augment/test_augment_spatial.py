import itertools
import math

import numpy as np
import pytest

from medseg_jax.augment.backend import JAX, NUMPY
from medseg_jax.augment.spatial import (
    bspline_weights,
    centre_crop_and_flip,
    control_grid_shape,
    crop_size_for,
    elastic_displacement,
    resample,
    rotation_planes,
    sampling_coordinates,
    spatial_matrix,
)

BACKENDS = [JAX, NUMPY]


def integer_volume(shape, channels=2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 100, (*shape, channels)).astype(np.float32), rng.integers(0, 4, shape).astype(np.int32)


def transform(backend, image, label, patch_size, angles=None, scale=1.0, flips=None, displacement=None):
    ndim = label.ndim
    xp = backend.xp
    angles = np.zeros(len(rotation_planes(ndim))) if angles is None else np.asarray(angles)
    flips = np.ones(ndim, np.float32) if flips is None else np.asarray(flips, np.float32)
    matrix = spatial_matrix(xp, xp.asarray(angles), xp.float32(scale), xp.asarray(flips), ndim)
    coords = sampling_coordinates(xp, matrix, label.shape, patch_size, displacement)
    out_image, out_label = resample(backend, xp.asarray(image), xp.asarray(label), coords)
    return np.asarray(out_image), np.asarray(out_label)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
@pytest.mark.parametrize("ndim", [2, 3])
def test_rotation_by_90_degrees_is_an_axis_swap_and_a_flip(backend, ndim):
    image, label = integer_volume((12,) * ndim)
    for k, (i, j) in enumerate(rotation_planes(ndim)):
        angles = np.zeros(len(rotation_planes(ndim)))
        angles[k] = math.pi / 2
        out_image, out_label = transform(backend, image, label, label.shape, angles)
        # x_in = c + R r with R[i, j] = -1, R[j, i] = 1: out[o_i, o_j] = in[n - 1 - o_j, o_i].
        expected_image = np.swapaxes(np.flip(image, i), i, j)
        expected_label = np.swapaxes(np.flip(label, i), i, j)
        np.testing.assert_allclose(out_image, expected_image, atol=1e-3)  # cos(pi/2) is 4e-8 in float32
        np.testing.assert_array_equal(out_label, expected_label)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_no_rotation_and_unit_scale_is_the_exact_centre_crop(backend):
    image, label = integer_volume((20, 22, 24))
    out_image, out_label = transform(backend, image, label, (12, 16, 20))
    np.testing.assert_array_equal(out_image, image[4:16, 3:19, 2:22])
    np.testing.assert_array_equal(out_label, label[4:16, 3:19, 2:22])


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_mirroring_twice_is_the_identity_and_once_matches_the_fast_path(backend):
    image, label = integer_volume((10, 14, 12))
    flips = (-1, 1, -1)
    once = transform(backend, image, label, label.shape, flips=flips)
    twice = transform(backend, *once, label.shape, flips=flips)
    np.testing.assert_array_equal(once[0], image[::-1, :, ::-1])
    np.testing.assert_array_equal(twice[0], image)
    np.testing.assert_array_equal(twice[1], label)
    crop = transform(backend, image, label, (6, 10, 8), flips=flips)
    fast = centre_crop_and_flip(image, label, (6, 10, 8), np.asarray(flips))
    np.testing.assert_array_equal(crop[0], fast[0])
    np.testing.assert_array_equal(crop[1], fast[1])


def test_crop_size_for_matches_hand_computed_2d_extents():
    # Half-extent of a rotated square with h = 31.5: h (cos a + sin a), largest at a = 45 degrees.
    assert crop_size_for((64, 64), 0, 1.0) == (64, 64)
    assert crop_size_for((64, 64), 45, 1.0) == (92, 92)  # 2 * 31.5 * sqrt(2) + 1 = 90.1 -> 91 -> even 92
    assert crop_size_for((64, 64), 30, 1.0) == (88, 88)  # 2 * 31.5 * 1.366 + 1 = 87.06 -> 88
    assert crop_size_for((64, 64), 180, (0.7, 1.4)) == (126, 126)  # 1.4 * 2 * 44.55 + 1 = 125.7 -> 126
    assert crop_size_for((33, 64), 0, 1.25) == (41, 80)  # parity kept: 1.25 * 32 * 2 + 1 = 41, 1.25 * 63 + 1 = 79.75
    assert crop_size_for((32, 32), 0, 1.0, elastic_magnitude=2.0) == (38, 38)  # 31 + 2 * 2 sqrt(2) + 1 = 37.3


@pytest.mark.parametrize("ndim,degrees", [(2, 180), (3, 30)])
def test_crop_size_for_leaves_no_padding_at_the_extreme_rotations_and_scales(ndim, degrees):
    patch = (20, 16, 12)[:ndim]
    crop = crop_size_for(patch, degrees, (0.7, 1.4))
    ones, label = np.ones((*crop, 1), np.float32), np.ones(crop, np.int32)
    radians = math.radians(degrees)
    corners = list(itertools.product([-radians, -radians / 2, radians / 2, radians], repeat=len(rotation_planes(ndim))))
    for angles, scale in itertools.product(corners, (0.7, 1.4)):
        out_image, out_label = transform(NUMPY, ones, label, patch, angles, scale)
        assert out_image.min() > 1 - 1e-4, (angles, scale, out_image.min())
        assert out_label.min() == 1
    # Without the margin the same transform reads padding (zeros).
    out_image, _ = transform(
        NUMPY,
        np.ones((*patch, 1), np.float32),
        np.ones(patch, np.int32),
        patch,
        [radians / 2] * len(rotation_planes(ndim)),
        1.4,
    )
    assert out_image.min() == 0


def test_bspline_weights_are_a_partition_of_unity_and_bound_the_displacement():
    weights = bspline_weights(21, 5)
    assert weights.shape == (21, control_grid_shape((21,), 5)[0]) == (21, 8)
    np.testing.assert_allclose(weights.sum(1), 1, atol=1e-6)
    assert weights.min() >= 0
    np.testing.assert_allclose(weights[0, :3], [1 / 6, 4 / 6, 1 / 6], atol=1e-6)  # at a control point
    rng = np.random.default_rng(0)
    control = rng.uniform(-3, 3, control_grid_shape((16, 12), 4) + (2,)).astype(np.float32)
    for xp in (np, JAX.xp):
        field = np.asarray(elastic_displacement(xp, xp.asarray(control), (16, 12), 4))
        assert field.shape == (2, 16, 12)
        assert np.abs(field).max() <= 3 and np.abs(field).max() > 0.5
        assert np.abs(np.diff(field, axis=1)).max() < 3  # smooth: neighbours move alike
    constant = np.full(control.shape, 1.5, np.float32)
    np.testing.assert_allclose(elastic_displacement(np, constant, (16, 12), 4), 1.5, atol=1e-5)


def test_linear_label_interpolation_keeps_labels_in_the_label_set():
    image, label = integer_volume((24, 24), seed=3)
    label = np.where(label > 1, 3, 0).astype(np.int32)
    matrix = spatial_matrix(np, np.asarray([0.4], np.float32), np.float32(0.8), np.ones(2, np.float32), 2)
    coords = sampling_coordinates(np, matrix, label.shape, (16, 16))
    for backend in BACKENDS:
        xp = backend.xp
        _, out = resample(backend, xp.asarray(image), xp.asarray(label), xp.asarray(coords), "linear", num_classes=4)
        assert set(np.unique(np.asarray(out))) <= {0, 3}
        assert len(np.unique(np.asarray(out))) == 2
