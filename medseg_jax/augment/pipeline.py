"""The augmentation pipeline: nnU-Net v2's training transforms as one function of (randomness, batch).

Order (as ``nnUNetTrainer.get_training_transforms``): spatial (rotation, scaling, optional elastic
deformation and mirroring, one resampling from the larger input crop to the patch), then Gaussian
noise, Gaussian blur, brightness, contrast, simulated low resolution, gamma of the inverted image,
gamma. nnU-Net mirrors last; here the flips are folded into the spatial matrix, which gives the
same distribution of outputs up to the sampling grid of simulated low resolution (not mirror
symmetric); every other intensity transform acts alike at every position. Labels change only with
the spatial transform. Anisotropic 3D patches get nnU-Net's in-plane ("dummy 2D") variant
(:func:`~medseg_jax.augment.config.fixed_axis`): no rotation, scaling or deformation along, and no
simulated low resolution of, the through-plane axis.

Device (:func:`make_augmentation`): ``augment_fn(key, image, label)`` splits ``key`` into one key per
sample and ``vmap`` s the per-sample pipeline; every shape is static and every probability draw
selects with ``where``, so it jits once and runs inside the train step. There is no operation across
samples: with the batch sharded over the ``data`` axis of a mesh, XLA partitions the vmapped code
along the batch and each device augments the samples it holds (no gather of the batch). With the
patch itself split over a ``spatial`` mesh axis, the resampling reads across that split and XLA has
to move crop data between those devices (and the crop size must divide by that axis).

Host (:func:`augment_numpy`): the same code on NumPy/SciPy with a ``numpy.random.Generator``, for a
loader that augments in its CPU workers (``mode: cpu``) and for comparison. Given the same random
draws, both produce the same output up to float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import numpy as np

from medseg_jax.augment import intensity, spatial
from medseg_jax.augment.backend import JAX, NUMPY, Backend, GeneratorDraws, KeyDraws
from medseg_jax.augment.config import (
    AugmentConfig,
    check_augment_config,
    fixed_axis,
    max_rotation_degrees,
)
from medseg_jax.errors import DataError


def _bg_uniform(draws, xp, value_range, shape=()):
    """nnU-Net's ``BGContrast`` draw: from ``(low, 1)`` or ``(1, high)`` with probability 1/2 each when
    the range straddles 1, else uniform over the range."""
    low, high = value_range
    if not low < 1 < high:
        return draws.uniform(low, high, shape)
    below = draws.bernoulli(0.5, shape)
    return xp.where(below, draws.uniform(low, 1.0, shape), draws.uniform(1.0, high, shape))


def sample_spatial_parameters(draws, xp, config: AugmentConfig, ndim: int, fixed: int | None = None) -> dict:
    """Per-sample spatial parameters: flags ``rotate``, ``scaled``, ``elastic`` (scalar bool), ``angles``
    ``(n_planes,)`` radians (0 unless rotated), ``scale`` (1 unless scaled), ``flips`` ``(ndim,)`` +-1,
    ``magnitude`` of the elastic control points in voxels (0 unless deformed).

    ``fixed``: an axis that rotation and scaling leave alone (in-plane augmentation): the angles of the
    planes that contain it are 0 and ``scale`` is then ``(ndim,)`` with 1 on that axis."""
    max_radians = math.radians(max_rotation_degrees(config, ndim, in_plane=fixed is not None))
    planes = spatial.rotation_planes(ndim)
    free_planes = np.asarray([fixed not in plane for plane in planes], np.float32)
    rotate = draws.bernoulli(config.rotation_probability)
    angles = draws.uniform(-max_radians, max_radians, (len(planes),)) * rotate * free_planes
    scaled = draws.bernoulli(config.scale_probability)
    scale = xp.where(scaled, draws.uniform(*config.scale_range), 1.0)
    if fixed is not None:
        scale = xp.where(np.arange(ndim) == fixed, 1.0, scale).astype(xp.float32)
    allowed = np.zeros(ndim, bool)
    allowed[list(range(ndim)) if config.mirror_axes is None else list(config.mirror_axes)] = True
    flips = xp.where(draws.bernoulli(config.mirror_probability, (ndim,)) & allowed, -1.0, 1.0)
    elastic = draws.bernoulli(config.elastic_probability)
    magnitude = draws.uniform(*config.elastic_magnitude) * elastic
    return dict(
        rotate=rotate,
        scaled=scaled,
        elastic=elastic,
        angles=angles,
        scale=scale,
        flips=flips.astype(xp.float32),
        magnitude=magnitude,
    )


def spatial_augment(backend: Backend, draws, image, label, config: AugmentConfig, patch_size, num_classes=None):
    """One sample ``image`` ``(*crop, C)``, ``label`` ``(*crop)`` -> float32 ``(*patch, C)``, ``(*patch)``."""
    xp, ndim = backend.xp, label.ndim
    fixed = fixed_axis(config, patch_size)
    params = sample_spatial_parameters(draws, xp, config, ndim, fixed)
    displacement = None
    if config.elastic_probability > 0:
        grid = spatial.control_grid_shape(patch_size, config.elastic_control_spacing)
        control = draws.uniform(-1.0, 1.0, grid + (ndim,)) * params["magnitude"]
        if fixed is not None:  # one in-plane deformation for every slice, none across them
            control = xp.broadcast_to(xp.take(control, np.array([0]), axis=fixed), control.shape)
            control = control * (np.arange(ndim) != fixed).astype(np.float32)
        displacement = spatial.elastic_displacement(xp, control, patch_size, config.elastic_control_spacing)
    moved = params["rotate"] | params["scaled"] | params["elastic"]
    whole_voxels = all((c - p) % 2 == 0 for c, p in zip(label.shape, patch_size))
    if backend.skips_unapplied and whole_voxels and not bool(moved):
        return spatial.centre_crop_and_flip(image, label, patch_size, params["flips"])
    matrix = spatial.spatial_matrix(xp, params["angles"], params["scale"], params["flips"], ndim)
    coordinates = spatial.sampling_coordinates(xp, matrix, label.shape, patch_size, displacement)
    return spatial.resample(backend, image, label, coordinates, config.label_interpolation, num_classes)


def intensity_augment(backend: Backend, draws, x, config: AugmentConfig):
    """One float32 sample ``(*spatial, C)`` through noise, blur, brightness, contrast, low resolution and
    the two gamma transforms, each with its own per-sample probability (skipped statically when 0)."""
    xp, c = backend.xp, config
    channels, ndim = x.shape[-1], x.ndim - 1
    fixed = fixed_axis(config, x.shape[:-1])
    if c.noise_probability > 0:
        flag = draws.bernoulli(c.noise_probability)
        std = draws.uniform(*c.noise_std)
        noise = draws.normal(x.shape[:-1] + (1,), needed=flag)
        x = backend.maybe(flag, lambda v: intensity.add_noise(v, std, noise), x)
    if c.blur_probability > 0:
        flag = draws.bernoulli(c.blur_probability)
        chosen = draws.bernoulli(c.blur_channel_probability, (channels,))
        sigmas = draws.uniform(*c.blur_sigma, (channels, ndim))
        radius = intensity.blur_radius(c.blur_sigma[1])
        x = backend.maybe(
            flag & xp.any(chosen), lambda v: xp.where(chosen, intensity.gaussian_blur(backend, v, sigmas, radius), v), x
        )
    if c.brightness_probability > 0:
        flag = draws.bernoulli(c.brightness_probability)
        multiplier = _bg_uniform(draws, xp, c.brightness_range, (channels,))
        x = backend.maybe(flag, lambda v: intensity.multiply_brightness(v, multiplier), x)
    if c.contrast_probability > 0:
        flag = draws.bernoulli(c.contrast_probability)
        factor = _bg_uniform(draws, xp, c.contrast_range, (channels,))
        x = backend.maybe(flag, lambda v: intensity.adjust_contrast(xp, v, factor), x)
    if c.low_resolution_probability > 0:
        flag = draws.bernoulli(c.low_resolution_probability)
        chosen = draws.bernoulli(c.low_resolution_channel_probability, (channels,))
        zoom = draws.uniform(*c.low_resolution_zoom, (channels,))
        x = backend.maybe(
            flag & xp.any(chosen),
            lambda v: xp.where(chosen, intensity.simulate_low_resolution(backend, v, zoom, fixed), v),
            x,
        )
    for probability, invert in ((c.gamma_inverted_probability, True), (c.gamma_probability, False)):
        if probability > 0:
            flag = draws.bernoulli(probability)
            gamma = _bg_uniform(draws, xp, c.gamma_range, (channels,))
            x = backend.maybe(flag, lambda v, g=gamma, i=invert: intensity.adjust_gamma(xp, v, g, i), x)
    return x


def augment_sample(
    backend: Backend,
    draws,
    image,
    label,
    config: AugmentConfig,
    patch_size=None,
    num_classes=None,
    mask_channels: int = 0,
):
    """The whole pipeline on one sample: ``image`` ``(*crop, C)``, ``label`` ``(*crop)`` ->
    ``(*patch, C)`` in the image's dtype (computed in float32) and ``(*patch)`` in the label's dtype.
    ``patch_size`` defaults to the crop's size. The last ``mask_channels`` image channels are binary masks
    (a cascade's previous stage, :mod:`medseg_jax.cascade`): they move with the image, are thresholded at
    0.5 back to masks and get no intensity transform."""
    patch_size = tuple(label.shape) if patch_size is None else tuple(patch_size)
    out_image, out_label = spatial_augment(backend, draws, image, label, config, patch_size, num_classes)
    scans = out_image.shape[-1] - mask_channels
    augmented = intensity_augment(backend, draws, out_image[..., :scans], config)
    if mask_channels:
        masks = (out_image[..., scans:] >= 0.5).astype(augmented.dtype)
        augmented = backend.xp.concatenate([augmented, masks], axis=-1)
    return augmented.astype(image.dtype), out_label.astype(label.dtype)


def _check_batch(image, label, patch_size) -> None:
    if image.ndim != label.ndim + 1 or tuple(image.shape[:-1]) != tuple(label.shape):
        raise DataError(
            f"augmentation: image {tuple(image.shape)} must be label {tuple(label.shape)} plus a channel axis"
        )
    if patch_size is not None and len(patch_size) != label.ndim - 1:
        raise DataError(
            f"augmentation: patch_size {tuple(patch_size)} does not match the batch's "
            f"{label.ndim - 1} spatial axes (label {tuple(label.shape)})"
        )


def make_augmentation(
    config: AugmentConfig,
    patch_size: Sequence[int] | None = None,
    num_classes: int | None = None,
    mask_channels: int = 0,
) -> Callable:
    """The device pipeline ``augment_fn(key, image (B, *crop, C), label (B, *crop)) -> (image (B, *patch,
    C), label (B, *patch))``, pure and jittable (as ``make_train_step(..., augment_fn=...)`` calls it).

    Sample ``b`` uses ``jax.random.split(key, B)[b]``. ``patch_size`` defaults to the input size; feed
    crops of :func:`loader_crop_size` so that rotated and scaled patches contain no padding.
    ``num_classes`` is needed for ``label_interpolation="linear"``; ``mask_channels``: see :func:`augment_sample`.
    """
    if patch_size is not None:
        check_augment_config(config, len(patch_size))

    def augment_fn(key, image, label):
        _check_batch(image, label, patch_size)
        check_augment_config(config, label.ndim - 1)
        patch = tuple(label.shape[1:]) if patch_size is None else tuple(patch_size)

        def one(sample_key, x, y):
            return augment_sample(JAX, KeyDraws(sample_key), x, y, config, patch, num_classes, mask_channels)

        return jax.vmap(one)(jax.random.split(key, label.shape[0]), image, label)

    return augment_fn


def augment_numpy(
    rng: np.random.Generator,
    image: np.ndarray,
    label: np.ndarray,
    config: AugmentConfig,
    patch_size: Sequence[int] | None = None,
    num_classes: int | None = None,
    mask_channels: int = 0,
):
    """The host pipeline on a batch ``(B, *crop, C)``, ``(B, *crop)`` -> ``(B, *patch, C)``, ``(B, *patch)``
    with NumPy/SciPy, drawing from ``rng`` sample after sample (transforms not drawn cost nothing)."""
    image, label = np.asarray(image), np.asarray(label)
    _check_batch(image, label, patch_size)
    check_augment_config(config, label.ndim - 1)
    draws = GeneratorDraws(rng)
    outputs = [
        augment_sample(NUMPY, draws, x, y, config, patch_size, num_classes, mask_channels) for x, y in zip(image, label)
    ]
    return np.stack([o[0] for o in outputs]), np.stack([o[1] for o in outputs])


def loader_crop_size(config: AugmentConfig, patch_size: Sequence[int]) -> tuple[int, ...]:
    """The crop the loader should cut so that the configured transforms never read padding:
    :func:`~medseg_jax.augment.spatial.crop_size_for` with the configured rotation, scaling and elastic
    ranges (each counted only when its probability is above 0); ``patch_size`` when ``mode`` is none."""
    if config.mode == "none":
        return tuple(patch_size)
    check_augment_config(config, len(patch_size))
    fixed = fixed_axis(config, patch_size)
    rotation = (
        max_rotation_degrees(config, len(patch_size), in_plane=fixed is not None)
        if config.rotation_probability > 0
        else 0.0
    )
    scale = config.scale_range if config.scale_probability > 0 else 1.0
    elastic = config.elastic_magnitude[1] if config.elastic_probability > 0 else 0.0
    if fixed is None:
        return spatial.crop_size_for(patch_size, rotation, scale, elastic)
    # in-plane augmentation: the plane's crop as in 2D, the fixed axis cut at the patch size
    plane = spatial.crop_size_for([p for a, p in enumerate(patch_size) if a != fixed], rotation, scale, elastic)
    crop = list(plane)
    crop.insert(fixed, int(patch_size[fixed]))
    return tuple(crop)


def train_step_augmentation(
    config: AugmentConfig, patch_size: Sequence[int], num_classes: int | None = None, mask_channels: int = 0
):
    """``augment_fn`` for ``make_train_step`` when ``mode`` is device, else ``None`` (the loader augments
    in cpu mode and delivers patches; none: no augmentation)."""
    if config.mode != "device":
        return None
    return make_augmentation(config, patch_size, num_classes, mask_channels)


def augment_batch_numpy(
    rng: np.random.Generator,
    batch: dict,
    config: AugmentConfig,
    patch_size: Sequence[int],
    num_classes: int | None = None,
    mask_channels: int = 0,
) -> dict:
    """:func:`augment_numpy` on a loader batch dict; picklable through ``functools.partial`` so that
    loader worker processes can run it (``augment.mode: cpu``). A cascade's masks (the last
    ``mask_channels``) are degraded first (:func:`medseg_jax.cascade.degrade_batch`)."""
    if mask_channels:
        from medseg_jax.cascade import degrade_batch

        batch = degrade_batch(rng, batch, mask_channels)
    image, label = augment_numpy(rng, batch["image"], batch["label"], config, patch_size, num_classes, mask_channels)
    return {"image": image.astype(np.float32), "label": label.astype(np.int32)}
