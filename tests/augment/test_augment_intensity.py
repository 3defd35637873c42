import jax.numpy as jnp
import numpy as np
import pytest

from medseg_jax.augment import intensity
from medseg_jax.augment.backend import JAX, NUMPY

NAMESPACES = [np, jnp]
BACKENDS = {np: NUMPY, jnp: JAX}


def gaussian_taps(sigma, radius=3):
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return taps / taps.sum()


@pytest.mark.parametrize("xp", NAMESPACES, ids=lambda m: m.__name__)
def test_blur_of_an_impulse_is_the_separable_gaussian_per_channel_and_axis(xp):
    x = np.zeros((15, 17, 2), np.float32)
    x[7, 8, :] = 1.0
    sigmas = np.asarray([[1.0, 0.5], [0.6, 0.9]], np.float32)  # (channel, axis)
    out = np.asarray(intensity.gaussian_blur(BACKENDS[xp], xp.asarray(x), xp.asarray(sigmas), radius=3))
    for c in range(2):
        expected = np.zeros((15, 17))
        expected[4:11, 5:12] = np.outer(gaussian_taps(sigmas[c, 0]), gaussian_taps(sigmas[c, 1]))
        np.testing.assert_allclose(out[..., c], expected, atol=1e-6)
    constant = np.full((6, 5, 1), 2.5, np.float32)
    blurred = intensity.gaussian_blur(
        BACKENDS[xp], xp.asarray(constant), xp.asarray([[0.7, 1.0]], np.float32), radius=3
    )
    np.testing.assert_allclose(np.asarray(blurred), 2.5, rtol=1e-6)  # reflected edges keep a constant


@pytest.mark.parametrize("xp", NAMESPACES, ids=lambda m: m.__name__)
def test_contrast_scales_about_the_mean_and_preserves_the_range(xp):
    x = np.asarray([0.0, 1.0, 2.0, 3.0], np.float32)[:, None]
    out = intensity.adjust_contrast(xp, xp.asarray(x), xp.asarray([2.0], np.float32))
    # mean 1.5: (x - 1.5) * 2 + 1.5 = [-1.5, 0.5, 2.5, 4.5], clipped to [0, 3]
    np.testing.assert_allclose(np.asarray(out)[:, 0], [0.0, 0.5, 2.5, 3.0])
    brighter = intensity.multiply_brightness(xp.asarray(x), xp.asarray([1.25], np.float32))
    np.testing.assert_allclose(np.asarray(brighter)[:, 0], [0.0, 1.25, 2.5, 3.75])


@pytest.mark.parametrize("xp", NAMESPACES, ids=lambda m: m.__name__)
def test_low_resolution_matches_nearest_down_and_linear_up_by_hand(xp):
    x = np.asarray([0.0, 10.0, 20.0, 30.0], np.float32)[:, None]
    out = intensity.simulate_low_resolution(BACKENDS[xp], xp.asarray(x), xp.asarray([0.5], np.float32))
    # down (nearest-exact, 4 -> 2): sources floor((j + 0.5) * 2) = 1, 3 -> [10, 30]; up (align_corners=False):
    # coordinates max((i + 0.5) / 2 - 0.5, 0) = 0, 0.25, 0.75, 1.25 (clamped to the last) -> [10, 15, 25, 30]
    np.testing.assert_allclose(np.asarray(out)[:, 0], [10.0, 15.0, 25.0, 30.0], atol=1e-5)
    rng = np.random.default_rng(0)
    image = rng.normal(size=(12, 10, 2)).astype(np.float32)
    same = intensity.simulate_low_resolution(BACKENDS[xp], xp.asarray(image), xp.asarray([1.0, 1.0], np.float32))
    np.testing.assert_allclose(np.asarray(same), image, atol=1e-6)
    # separable: an outer product stays the outer product of the 1D results
    a, b = rng.normal(size=12).astype(np.float32), rng.normal(size=10).astype(np.float32)
    out2d = np.asarray(
        intensity.simulate_low_resolution(
            BACKENDS[xp], xp.asarray(np.outer(a, b)[..., None]), xp.asarray([0.6], np.float32)
        )
    )[..., 0]
    a1 = np.asarray(
        intensity.simulate_low_resolution(BACKENDS[xp], xp.asarray(a[:, None]), xp.asarray([0.6], np.float32))
    )[:, 0]
    b1 = np.asarray(
        intensity.simulate_low_resolution(BACKENDS[xp], xp.asarray(b[:, None]), xp.asarray([0.6], np.float32))
    )[:, 0]
    np.testing.assert_allclose(out2d, np.outer(a1, b1), atol=1e-5)


@pytest.mark.parametrize("xp", NAMESPACES, ids=lambda m: m.__name__)
@pytest.mark.parametrize("invert", [False, True])
def test_gamma_retains_mean_and_std_and_follows_the_power_law(xp, invert):
    x = np.asarray([0.0, 1.0, 2.0, 3.0], np.float32)[:, None]
    out = np.asarray(intensity.adjust_gamma(xp, xp.asarray(x), xp.asarray([2.0], np.float32), invert))[:, 0]
    np.testing.assert_allclose([out.mean(), out.std()], [x.mean(), x.std()], rtol=1e-5)
    # range [0, 3]: ((x / 3) ** 2) * 3 = [0, 1/3, 4/3, 3] (inverted: 3 - that of 3 - x), then standardised back
    y = np.asarray([0.0, 1 / 3, 4 / 3, 3.0])
    if invert:
        y = 3.0 - y[::-1]
    expected = (y - y.mean()) / y.std() * x.std() + x.mean()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    identity = intensity.adjust_gamma(xp, xp.asarray(x), xp.asarray([1.0], np.float32), invert)
    np.testing.assert_allclose(np.asarray(identity), x, atol=1e-5)


def test_noise_is_shared_by_channels_and_scaled():
    x = np.zeros((5, 6, 3), np.float32)
    noise = np.random.default_rng(0).normal(size=(5, 6, 1)).astype(np.float32)
    out = intensity.add_noise(x, 0.05, noise)
    for c in range(3):
        np.testing.assert_allclose(out[..., c], 0.05 * noise[..., 0])
