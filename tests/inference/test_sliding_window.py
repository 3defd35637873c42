"""Sliding-window inference: nnU-Net's Gaussian map and window placement, blending, mirroring, sharding."""

import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medseg_jax.errors import ConfigError
from medseg_jax.inference import argmax_labels, compute_window_starts, gaussian_importance_map, sliding_window

RNG_WEIGHTS = np.random.default_rng(42)
W3 = jnp.asarray(RNG_WEIGHTS.normal(size=(2, 3)), jnp.float32)


def per_voxel(x):
    """A 1x1 'network' with K = 3 outputs: the output at a voxel depends only on the input there."""
    return jnp.tanh(x @ W3) + 0.5 * x[..., :1] ** 2


def blur(x):
    """Mirror-symmetric predictor: separable [1, 2, 1] filter over every spatial axis, zero padding."""
    for axis in range(1, x.ndim - 1):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (1, 1)
        p = jnp.pad(x, pad)
        n = x.shape[axis]
        x = (
            jax.lax.slice_in_dim(p, 0, n, axis=axis)
            + 2 * jax.lax.slice_in_dim(p, 1, n + 1, axis=axis)
            + jax.lax.slice_in_dim(p, 2, n + 2, axis=axis)
        )
    return x


def cumulative(x):
    """Not mirror-symmetric: cumulative sums along every spatial axis (K = C)."""
    for axis in range(1, x.ndim - 1):
        x = jnp.cumsum(x, axis=axis)
    return x


# --- Gaussian importance map and window placement ---------------------------------------------------------


def test_gaussian_map_is_the_sampled_gaussian_normalised_to_one():
    g = gaussian_importance_map((32, 16))
    assert g.shape == (32, 16) and g.dtype == np.float32
    # sigma = patch / 8 = (4, 2); scipy's 4-sigma radius (16, 8) covers every offset from the centre (16, 8),
    # so the blurred delta is exactly exp(-d^2 / (2 sigma^2)) per axis.
    i, j = np.meshgrid(np.arange(32), np.arange(16), indexing="ij")
    expected = np.exp(-((i - 16) ** 2) / (2 * 4.0**2)) * np.exp(-((j - 8) ** 2) / (2 * 2.0**2))
    np.testing.assert_allclose(g, expected, rtol=1e-6)
    assert g[16, 8] == 1.0 and g.max() == 1.0
    assert g[12, 8] == pytest.approx(np.exp(-0.5), rel=1e-6)  # one sigma along axis 0


def test_gaussian_map_zeros_beyond_the_filter_radius_take_the_smallest_value():
    # sigma = 32 / 16 = 2: scipy's radius is int(4 * 2 + 0.5) = 8, so offsets beyond 8 are 0 before the fix.
    g = gaussian_importance_map((32,), sigma_scale=1 / 16)
    d = np.arange(32) - 16
    inside = np.abs(d) <= 8
    np.testing.assert_allclose(g[inside], np.exp(-(d[inside] ** 2) / 8.0), rtol=1e-6)
    np.testing.assert_allclose(g[~inside], np.exp(-64 / 8.0), rtol=1e-6)  # the smallest non-zero value
    assert g.min() > 0
    odd = gaussian_importance_map((5, 7, 3))
    assert np.unravel_index(np.argmax(odd), odd.shape) == (2, 3, 1)  # the centre is patch // 2


def test_window_starts_match_nnunet_steps():
    assert compute_window_starts((10,), (4,)) == [[0, 2, 4, 6]]
    # 5 steps of 7 / 4 = 1.75 rounded half to even: 0, 1.75, 3.5, 5.25, 7 -> 0, 2, 4, 5, 7
    assert compute_window_starts((11, 4), (4, 4)) == [[0, 2, 4, 5, 7], [0]]
    assert compute_window_starts((10,), (4,), step=1.0) == [[0, 3, 6]]
    assert compute_window_starts((20, 9), (8, 5), step=0.25) == [[0, 2, 4, 6, 8, 10, 12], [0, 1, 2, 3, 4]]
    with pytest.raises(ConfigError, match="smaller than patch_size"):
        compute_window_starts((3, 10), (4, 4))
    with pytest.raises(ConfigError, match="step"):
        compute_window_starts((10,), (4,), step=0.0)


# --- blending ---------------------------------------------------------------------------------------------


def test_per_voxel_predictor_is_reproduced_for_random_shapes_steps_and_patches():
    rng = np.random.default_rng(7)
    for case in range(8):
        ndim = 2 if case % 2 else 3
        patch = tuple(int(p) for p in rng.integers(3, 9 if ndim == 3 else 17, ndim))
        # sizes from below the patch (zero padding) to about 3 patches
        shape = tuple(int(rng.integers(max(1, p - 3), 3 * p + 2)) for p in patch)
        step = float(rng.choice([0.25, 0.5, 0.7, 1.0]))
        image = rng.normal(size=shape + (2,)).astype(np.float32)
        blend = "gaussian" if case % 3 else "constant"
        accumulate = "host" if case % 4 == 3 else "device"
        got = sliding_window(
            per_voxel,
            image,
            patch,
            step=step,
            blend=blend,
            batch_size=int(rng.integers(1, 4)),
            mirror_axes=(),
            accumulate=accumulate,
        )
        expected = np.asarray(per_voxel(jnp.asarray(image)))
        assert got.shape == shape + (3,), (case, got.shape)
        np.testing.assert_allclose(
            np.asarray(got),
            expected,
            rtol=1e-5,
            atol=1e-5,
            err_msg=f"case {case}: shape {shape}, patch {patch}, step {step}, {blend}",
        )


def test_blending_weights_windows_by_the_gaussian_map():
    # Two windows along axis 0 (starts 0 and 2 of a 6 x 4 image, patch 4 x 4); each predicts its own mean
    # everywhere, so the blended value is the importance-weighted average of the two means.
    image = np.arange(24, dtype=np.float32).reshape(6, 4, 1) ** 1.5

    def window_mean(x):
        return jnp.broadcast_to(x.mean(axis=(1, 2), keepdims=True), x.shape)

    means = [image[0:4].mean(), image[2:6].mean()]
    for blend in ("gaussian", "constant"):
        g = gaussian_importance_map((4, 4)) if blend == "gaussian" else np.ones((4, 4), np.float32)
        num = np.zeros((6, 4))
        den = np.zeros((6, 4))
        for start, m in zip((0, 2), means):
            num[start : start + 4] += g * m
            den[start : start + 4] += g
        got = sliding_window(window_mean, image, (4, 4), blend=blend, batch_size=1, mirror_axes=())
        np.testing.assert_allclose(np.asarray(got)[..., 0], num / den, rtol=1e-5)
    assert not np.allclose(num / den, np.where(np.arange(6)[:, None] < 3, means[0], means[1]))


def test_images_smaller_than_the_patch_are_padded_symmetrically():
    # The predictor returns each voxel's index inside its window along axis 0, so the result shows where
    # the image sits in the padded window: nnU-Net pads (patch - size) // 2 below, the rest above.
    def position(x):
        ramp = jnp.arange(x.shape[1], dtype=jnp.float32).reshape(1, -1, 1, 1)
        return jnp.broadcast_to(ramp, x.shape[:-1] + (1,))

    for size, below in ((5, 1), (6, 1), (7, 0)):
        got = np.asarray(sliding_window(position, np.ones((size, 4, 1), np.float32), (8, 4), mirror_axes=()))
        np.testing.assert_allclose(got[:, 0, 0], np.arange(size) + below, err_msg=f"size {size}")


def test_a_batch_of_images_gives_each_image_its_own_result():
    rng = np.random.default_rng(1)
    images = rng.normal(size=(3, 20, 14, 2)).astype(np.float32)
    together = np.asarray(sliding_window(blur, images, (8, 8), batch_size=4, mirror_axes=()))
    assert together.shape == (3, 20, 14, 2)
    for n in range(3):
        alone = np.asarray(sliding_window(blur, images[n], (8, 8), batch_size=4, mirror_axes=()))
        np.testing.assert_allclose(together[n], alone, rtol=1e-5, atol=1e-6)
    labels = argmax_labels(together)
    assert labels.shape == (3, 20, 14) and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.argmax(together, axis=-1))


# --- mirroring --------------------------------------------------------------------------------------------


def test_mirror_symmetric_predictor_is_unchanged_by_mirroring():
    image = np.random.default_rng(2).normal(size=(12, 10, 9, 1)).astype(np.float32)
    plain = np.asarray(sliding_window(blur, image, (8, 8, 8), mirror_axes=()))
    mirrored = np.asarray(sliding_window(blur, image, (8, 8, 8), mirror_axes=None))
    np.testing.assert_allclose(mirrored, plain, rtol=1e-5, atol=1e-5)
    # the same check with a predictor that is not symmetric does see the flips
    skewed = np.asarray(sliding_window(cumulative, image, (8, 8, 8), mirror_axes=()))
    assert not np.allclose(
        np.asarray(sliding_window(cumulative, image, (8, 8, 8), mirror_axes=None)), skewed, atol=1e-3
    )


def test_mirroring_averages_the_flipped_back_predictions():
    # One window covering the whole image, so the result is exactly the TTA average of the predictor.
    image = np.random.default_rng(3).normal(size=(6, 5, 4, 1)).astype(np.float32)
    x = jnp.asarray(image[None])
    for axes in [(0, 1, 2), (1,), (0, 2)]:
        subsets = [s for r in range(len(axes) + 1) for s in itertools.combinations(axes, r)]
        assert len(subsets) == 2 ** len(axes)
        expected = np.mean(
            [np.flip(np.asarray(cumulative(jnp.flip(x, [a + 1 for a in s]))), [a + 1 for a in s]) for s in subsets],
            axis=0,
        )[0]
        got = np.asarray(sliding_window(cumulative, image, (6, 5, 4), mirror_axes=axes))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, err_msg=str(axes))
    # for a per-voxel predictor the average over flips is the plain prediction
    per_voxel_tta = np.asarray(sliding_window(per_voxel, np.concatenate([image, image], -1), (4, 4, 4)))
    np.testing.assert_allclose(
        per_voxel_tta, np.asarray(per_voxel(jnp.concatenate([x, x], -1)))[0], rtol=1e-5, atol=1e-5
    )


# --- compilation, arguments, sharding --------------------------------------------------------------------


def test_same_shapes_compile_once_and_host_mode_reuses_its_program_across_shapes():
    traces = []

    def counted(params, x):
        traces.append(x.shape)
        return x * params

    image = np.ones((16, 12, 1), np.float32)
    for accumulate in ("device", "host"):
        traces.clear()
        first = sliding_window(
            counted, image, (8, 8), params=jnp.float32(2.0), accumulate=accumulate, num_classes=1, mirror_axes=()
        )
        count = len(traces)
        assert count >= 1
        second = sliding_window(
            counted, image, (8, 8), params=jnp.float32(3.0), accumulate=accumulate, num_classes=1, mirror_axes=()
        )
        assert len(traces) == count, accumulate
        np.testing.assert_allclose(np.asarray(second), 1.5 * np.asarray(first), rtol=1e-6)
        sliding_window(
            counted,
            np.ones((20, 12, 1), np.float32),
            (8, 8),
            params=jnp.float32(1.0),
            accumulate=accumulate,
            num_classes=1,
            mirror_axes=(),
        )
        # a new image shape is a new whole-image program, but the same window batch program in host mode
        assert (len(traces) > count) == (accumulate == "device")


def test_invalid_arguments_raise_config_errors():
    image = np.zeros((8, 8, 1), np.float32)
    with pytest.raises(ConfigError, match="does not fit"):
        sliding_window(per_voxel, np.zeros((8, 1), np.float32), (4, 4))
    with pytest.raises(ConfigError, match="blend"):
        sliding_window(per_voxel, image, (4, 4), blend="linear")
    with pytest.raises(ConfigError, match="mirror_axes"):
        sliding_window(per_voxel, image, (4, 4), mirror_axes=(2,))
    with pytest.raises(ConfigError, match="accumulate"):
        sliding_window(per_voxel, image, (4, 4), accumulate="disk")


SHARDED_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh
    from medseg_jax.inference import sliding_window

    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()), ("data",))  # Auto axes
    shard_shapes = []

    def predictor(x):
        record = lambda s: shard_shapes.append((s.shard_shape(x.shape)[0], x.shape[0]))  # (per device, all)
        jax.debug.inspect_array_sharding(x, callback=record)
        return jnp.concatenate([x, jnp.cumsum(x, axis=1) * 0.1], axis=-1)

    image = np.random.default_rng(0).normal(size=(21, 18, 1)).astype(np.float32)
    single = np.asarray(sliding_window(predictor, image, (8, 8), batch_size=8))
    assert shard_shapes == [(32, 32)]  # one device: nothing split
    for accumulate in ("device", "host"):
        shard_shapes.clear()
        sharded = np.asarray(sliding_window(predictor, image, (8, 8), batch_size=8, mesh=mesh,
                                            accumulate=accumulate))
        np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-5)
        # the windows (8 per batch, times 4 flip combinations) are split evenly over the 8 devices
        assert shard_shapes and all(8 * shard == full for shard, full in shard_shapes), shard_shapes
    print("sharded ok")
""")


def test_windows_sharded_over_eight_devices_match_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=root,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sharded ok" in result.stdout
