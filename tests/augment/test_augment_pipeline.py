import dataclasses
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medseg_jax.augment import (
    AugmentConfig,
    augment_numpy,
    augment_sample,
    loader_crop_size,
    make_augmentation,
)
from medseg_jax.augment.backend import JAX, NUMPY, GeneratorDraws, KeyDraws
from medseg_jax.augment.config import fixed_axis
from medseg_jax.augment.pipeline import sample_spatial_parameters
from medseg_jax.errors import ConfigError, DataError

PROBABILITIES = [f.name for f in dataclasses.fields(AugmentConfig) if f.name.endswith("probability")]


def config_with(**overrides):
    """Every transform off, then ``overrides``."""
    return AugmentConfig(**{**{name: 0.0 for name in PROBABILITIES}, **overrides})


# Every transform on for every sample (mirroring per axis at 1/2), elastic included.
ALL_ON = config_with(
    **{**{name: 1.0 for name in PROBABILITIES}, "mirror_probability": 0.5},
    elastic_control_spacing=4,
    elastic_magnitude=(1.0, 2.0),
)
PATCH_2D, PATCH_3D = (16, 16), (12, 12, 12)


def phantom(crop, batch=2, channels=2, seed=0, dtype=np.float32):
    """Discs/balls (labels 1, 2) on a smooth background with noise: every transform changes it visibly."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) - n / 2 for n in crop], indexing="ij"))
    radius = np.sqrt((grid**2).sum(0))
    label = (radius < crop[0] / 3).astype(np.int32) + (radius < crop[0] / 6)
    image = label[..., None] + 0.01 * grid[0][..., None] + rng.normal(0, 0.2, (batch, *crop, channels))
    return image.astype(dtype), np.broadcast_to(label, (batch, *crop)).copy()


@pytest.fixture(scope="module")
def all_on_2d():
    return jax.jit(make_augmentation(ALL_ON, PATCH_2D, num_classes=3))


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_output_dtype_and_shape_follow_the_input(all_on_2d, dtype):
    crop = loader_crop_size(ALL_ON, PATCH_2D)
    image, label = phantom(crop, batch=4, dtype=dtype)
    out_image, out_label = all_on_2d(jax.random.key(0), jnp.asarray(image), jnp.asarray(label))
    assert out_image.shape == (4, *PATCH_2D, 2) and out_image.dtype == dtype
    assert out_label.shape == (4, *PATCH_2D) and out_label.dtype == jnp.int32
    if dtype == jnp.bfloat16:  # computed in float32: equals the float32 pipeline on the same values, rounded
        f32 = all_on_2d(jax.random.key(0), jnp.asarray(image, jnp.float32), jnp.asarray(label))
        np.testing.assert_array_equal(np.asarray(out_image), np.asarray(f32[0].astype(jnp.bfloat16)))


def test_deterministic_for_a_key_different_across_keys_and_samples(all_on_2d):
    crop = loader_crop_size(ALL_ON, PATCH_2D)
    image, label = phantom(crop, batch=4)
    image[:] = image[0]  # four identical samples
    a = all_on_2d(jax.random.key(1), image, label)
    b = all_on_2d(jax.random.key(1), image, label)
    c = all_on_2d(jax.random.key(2), image, label)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
    assert not np.allclose(np.asarray(a[0]), np.asarray(c[0]))
    out = np.asarray(a[0])
    for i in range(4):
        for j in range(i):
            assert not np.allclose(out[i], out[j]), (i, j)
    assert len({np.asarray(a[1][i]).tobytes() for i in range(4)}) == 4  # each sample moved differently
    assert set(np.unique(np.asarray(a[1]))) <= {0, 1, 2}


def test_3d_pipeline_keeps_labels_in_the_label_set():
    crop = loader_crop_size(ALL_ON, PATCH_3D)
    image, label = phantom(crop, channels=1)
    out_image, out_label = jax.jit(make_augmentation(ALL_ON, PATCH_3D))(jax.random.key(3), image, label)
    assert out_image.shape == (2, *PATCH_3D, 1) and out_label.shape == (2, *PATCH_3D)
    assert set(np.unique(np.asarray(out_label))) <= {0, 1, 2}
    assert len(np.unique(np.asarray(out_label))) >= 2
    assert np.all(np.isfinite(np.asarray(out_image)))
    assert not np.array_equal(np.asarray(out_label[0]), np.asarray(out_label[1]))


@pytest.mark.parametrize("patch", [PATCH_2D, PATCH_3D])
def test_mirroring_with_the_same_key_twice_is_the_identity(patch):
    config = config_with(mirror_probability=0.5)
    image, label = phantom(patch, batch=8, channels=1)
    augment = jax.jit(make_augmentation(config))
    once = augment(jax.random.key(4), image, label)
    twice = augment(jax.random.key(4), *once)
    np.testing.assert_array_equal(np.asarray(twice[0]), image)
    np.testing.assert_array_equal(np.asarray(twice[1]), label)
    assert not np.array_equal(np.asarray(once[0]), image)  # 8 samples: some axis was mirrored


def test_intensity_transforms_leave_labels_untouched():
    config = dataclasses.replace(
        ALL_ON, rotation_probability=0.0, scale_probability=0.0, elastic_probability=0.0, mirror_probability=0.0
    )
    image, label = phantom(PATCH_2D, batch=3)
    out_image, out_label = jax.jit(make_augmentation(config))(jax.random.key(5), image, label)
    np.testing.assert_array_equal(np.asarray(out_label), label)
    assert np.abs(np.asarray(out_image) - image).mean() > 0.01
    host_image, host_label = augment_numpy(np.random.default_rng(0), image, label, config)
    np.testing.assert_array_equal(host_label, label)
    assert np.abs(host_image - image).mean() > 0.01


class Recording:
    """Draws from a generator and keeps every value, to replay the same randomness on the device."""

    def __init__(self, draws):
        self.draws, self.values = draws, []

    def __getattr__(self, name):
        def draw(*args, **kwargs):
            value = getattr(self.draws, name)(*args, **kwargs)
            self.values.append(np.asarray(value))
            return value

        return draw


class Replay:
    def __init__(self, values):
        self.values = iter(values)

    def uniform(self, *args, **kwargs):
        return next(self.values)

    bernoulli = normal = uniform


@pytest.mark.parametrize("config", [ALL_ON, AugmentConfig()], ids=["all_on", "nnunet_defaults"])
def test_host_and_device_pipelines_agree_for_the_same_draws(config):
    crop = loader_crop_size(config, PATCH_2D)
    image, label = phantom(crop, batch=6)
    recordings, host = [], []
    rng = np.random.default_rng(7)
    for x, y in zip(image, label):
        draws = Recording(GeneratorDraws(rng))
        host.append(augment_sample(NUMPY, draws, x, y, config, PATCH_2D, num_classes=3))
        recordings.append(draws.values)

    @jax.jit
    def device(values, x, y):
        return augment_sample(JAX, Replay(values), x, y, config, PATCH_2D, num_classes=3)

    for (host_image, host_label), values, x, y in zip(host, recordings, image, label):
        device_image, device_label = device([jnp.asarray(v) for v in values], x, y)
        np.testing.assert_allclose(np.asarray(device_image), host_image, atol=2e-4, rtol=1e-4)
        assert np.mean(np.asarray(device_label) != host_label) <= 1e-3


def test_draw_rates_follow_the_configured_probabilities():
    config = AugmentConfig()
    keys = jax.random.split(jax.random.key(8), 4000)
    params = jax.vmap(lambda k: sample_spatial_parameters(KeyDraws(k), jnp, config, 3))(keys)
    assert abs(float(jnp.mean(params["rotate"])) - 0.2) < 0.03
    assert abs(float(jnp.mean(params["scaled"])) - 0.2) < 0.03
    assert abs(float(jnp.mean(params["flips"] < 0)) - 0.5) < 0.03
    assert float(jnp.max(jnp.abs(params["angles"]))) <= np.radians(30) + 1e-6
    scales = np.asarray(params["scale"])[np.asarray(params["scaled"])]
    assert scales.min() >= 0.7 and scales.max() <= 1.4 and scales.max() > 1.3 and scales.min() < 0.8
    assert float(jnp.max(params["magnitude"])) == 0.0  # elastic off by default
    draws = GeneratorDraws(np.random.default_rng(0))
    host = [sample_spatial_parameters(draws, np, config, 2) for _ in range(4000)]
    assert abs(np.mean([p["rotate"] for p in host]) - 0.2) < 0.03
    assert np.max(np.abs([p["angles"] for p in host])) > np.radians(170)  # 2D: up to 180 degrees


def test_bad_config_and_batch_shapes_raise_clear_errors():
    with pytest.raises(ConfigError, match="augment.scale_range"):
        make_augmentation(AugmentConfig(scale_range=(1.4, 0.7)), PATCH_2D)
    with pytest.raises(ConfigError, match="augment.noise_probability"):
        make_augmentation(AugmentConfig(noise_probability=1.5), PATCH_2D)
    with pytest.raises(ConfigError, match="augment.mirror_axes"):
        loader_crop_size(AugmentConfig(mirror_axes=(2,)), PATCH_2D)
    image, label = phantom(PATCH_2D)
    with pytest.raises(DataError, match="patch_size"):
        augment_numpy(np.random.default_rng(0), image, label, AugmentConfig(), patch_size=PATCH_3D)
    with pytest.raises(DataError, match="channel"):
        make_augmentation(AugmentConfig())(jax.random.key(0), image[..., 0], label)


def test_loader_crop_size_counts_only_enabled_transforms():
    assert loader_crop_size(AugmentConfig(mode="none"), (64, 64, 64)) == (64, 64, 64)
    assert loader_crop_size(config_with(mirror_probability=0.5), (64, 64, 64)) == (64, 64, 64)
    assert loader_crop_size(config_with(scale_probability=0.2), (64, 64)) == (90, 90)  # 1.4 * 63 + 1 = 89.2
    assert loader_crop_size(AugmentConfig(), (64, 64)) == (126, 126)


def test_in_plane_augmentation_follows_nnunets_anisotropy_rule():
    auto = AugmentConfig()
    assert fixed_axis(auto, (20, 160, 160)) == 0 and fixed_axis(auto, (160, 160, 20)) == 2
    assert fixed_axis(auto, (64, 128, 128)) is None and fixed_axis(auto, (64, 64)) is None  # 2x, or 2D
    assert fixed_axis(dataclasses.replace(auto, in_plane_only=False), (160, 160, 20)) is None
    assert fixed_axis(dataclasses.replace(auto, in_plane_only=True), (96, 128, 128)) == 0
    with pytest.raises(ConfigError, match="in_plane_only"):
        loader_crop_size(dataclasses.replace(auto, in_plane_only=True), (64, 64))
    # the through-plane axis is cut at the patch size; the plane gets the 2D crop (180 degrees)
    assert loader_crop_size(auto, (128, 128, 16)) == (*loader_crop_size(auto, (128, 128)), 16)
    assert loader_crop_size(auto, (16, 128, 128)) == (16, *loader_crop_size(auto, (128, 128)))


@pytest.mark.parametrize("device", [False, True], ids=["host", "device"])
def test_in_plane_augmentation_never_mixes_slices(device):
    """Each slice of the through-plane axis holds its index: rotated, scaled, deformed and degraded
    in-plane, every output slice must still hold only its own index (linear interpolation of a constant);
    the same transforms in 3D mix neighbouring slices."""
    patch = (24, 24, 6)
    spatial_on = dict(
        rotation_probability=1.0,
        scale_probability=1.0,
        elastic_probability=1.0,
        elastic_control_spacing=8,
        elastic_magnitude=(1.0, 2.0),
        low_resolution_probability=1.0,
        low_resolution_channel_probability=1.0,
    )
    in_plane, full = config_with(**spatial_on), config_with(**spatial_on, in_plane_only=False)
    outputs = {}
    for name, config in (("in_plane", in_plane), ("full", full)):
        crop = loader_crop_size(config, patch)
        image = np.broadcast_to(np.arange(crop[2], dtype=np.float32) + 1.0, (2, *crop)).copy()[..., None]
        label = np.broadcast_to(np.arange(crop[2], dtype=np.int32) % 3, (2, *crop)).copy()
        if device:
            augment = jax.jit(make_augmentation(config, patch))
            out, out_label = (np.asarray(a) for a in augment(jax.random.key(3), image, label))
        else:
            out, out_label = augment_numpy(np.random.default_rng(3), image, label, config, patch)
        outputs[name] = out
        if name == "in_plane":
            offset = (crop[2] - patch[2]) // 2
            want = np.arange(patch[2], dtype=np.float32) + 1.0 + offset
            np.testing.assert_allclose(out[..., 0], np.broadcast_to(want, out.shape[:-1]), rtol=1e-5)
            np.testing.assert_array_equal(out_label, np.broadcast_to((want - 1).astype(int) % 3, out_label.shape))
    spread = outputs["full"][..., 0].std(axis=(1, 2))  # per sample and slice: slices mixed
    assert spread.max() > 0.1


SHARDED_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from medseg_jax.augment import AugmentConfig, loader_crop_size, make_augmentation
    assert jax.device_count() == 8
    config = AugmentConfig(rotation_probability=0.5, scale_probability=0.5, noise_probability=0.5,
                           blur_probability=0.5, low_resolution_probability=0.5, gamma_probability=0.5)
    patch = (16, 16)
    crop = loader_crop_size(config, patch)
    rng = np.random.default_rng(0)
    image = rng.normal(size=(8, *crop, 1)).astype(np.float32)
    label = rng.integers(0, 3, (8, *crop)).astype(np.int32)
    augment = jax.jit(make_augmentation(config, patch))
    key = jax.random.key(0)
    single = augment(key, jax.device_put(image, jax.devices()[0]), jax.device_put(label, jax.devices()[0]))
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    shard = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
    sharded = augment(key, shard(image), shard(label))
    np.testing.assert_allclose(np.asarray(sharded[0]), np.asarray(single[0]), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(sharded[1]), np.asarray(single[1]))
    for out in sharded:
        assert out.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), out.ndim), out.sharding
        assert len({s.device for s in out.addressable_shards}) == 8
    hlo = augment.lower(key, shard(image), shard(label)).compile().as_text()
    for collective in ("all-gather", "all-to-all", "collective-permute", "all-reduce"):
        assert collective not in hlo, collective
    print("SHARDED_OK")
""")


def test_sharded_batch_is_augmented_where_it_lives():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0 and "SHARDED_OK" in result.stdout, result.stderr[-3000:]
