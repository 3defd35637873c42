"""Sliding-window prediction with Gaussian blending and mirroring test-time augmentation (nnU-Net v2 rules).

Conventions (nnU-Net v2's ``predict_sliding_window_return_logits``):

- The image is padded symmetrically with zeros to at least the patch size (``below = (patch - size) // 2``),
  windows are placed by :func:`compute_window_starts`, and the padding is cropped from the result.
- Each window's logits are weighted by :func:`gaussian_importance_map` (or by 1 with
  ``blend="constant"``), summed into an accumulator, and divided by the summed weights at the end.
- Mirroring: for every non-empty subset of ``mirror_axes`` the window is flipped, predicted and flipped
  back; the logits of all ``2^m`` predictions (the plain one included) are averaged. The flipped copies
  join the window batch, so one ``apply_fn`` call sees ``batch_size * 2^m`` windows -- up to
  :data:`MAX_VOXELS_PER_CALL` window voxels per call; beyond that the copies go through in equal groups,
  one ``apply_fn`` call per group inside a loop (:func:`mirror_group_size`), so that realistic 3D patches
  with all eight flips do not multiply the activation memory by eight.

Two accumulation modes:

- ``accumulate="device"`` (default): one jitted program per (image shape, patch, batch, mirroring)
  gathers the windows with ``lax.dynamic_slice`` from a start table, runs ``apply_fn`` on batches of
  windows inside a ``lax.scan`` and adds the weighted logits with ``lax.dynamic_update_slice``. The
  padded image and a float32 ``(N, *padded, K)`` accumulator live on the device.
- ``accumulate="host"`` (memory-bounded): windows are cut from the image on the host, one batch at a time
  is sent to the device, and the weighted logits come back and are summed into a numpy float32
  accumulator. The device holds only the parameters and one batch of windows, whatever the scan's size,
  and the compiled program depends only on the window batch's shape (not the image's), so cases of
  different shapes reuse it. The price: a device->host copy of every window's logits.

With a ``mesh``, the window batch is split over the ``data_axis`` devices (``batch_size`` is rounded up
to a multiple of that axis). This relies on *Auto* mesh axes (``jax.sharding.Mesh``): the sharding is a
constraint and XLA's partitioner places the collectives.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from scipy.ndimage import gaussian_filter

from medseg_jax.errors import ConfigError

__all__ = ["argmax_labels", "compute_window_starts", "gaussian_importance_map", "sliding_window"]


@functools.lru_cache(maxsize=16)
def _gaussian_cached(patch_size: tuple[int, ...], sigma_scale: float, dtype_name: str) -> np.ndarray:
    delta = np.zeros(patch_size, dtype=np.float64)
    delta[tuple(n // 2 for n in patch_size)] = 1.0
    blurred = gaussian_filter(delta, [n * sigma_scale for n in patch_size], order=0, mode="constant", cval=0.0)
    blurred = (blurred / blurred.max()).astype(dtype_name)
    # Zero weights would divide by zero where only the window's rim covers a voxel (nnU-Net's fix).
    blurred[blurred == 0] = blurred[blurred != 0].min()
    blurred.setflags(write=False)
    return blurred


def gaussian_importance_map(patch_size: Sequence[int], sigma_scale: float = 1.0 / 8, dtype=np.float32) -> np.ndarray:
    """nnU-Net's Gaussian window weights, shape ``patch_size``.

    A delta at the centre voxel ``patch // 2`` blurred with ``scipy.ndimage.gaussian_filter`` (sigma
    ``patch * sigma_scale`` per axis, ``mode="constant"``, i.e. ``exp(-d^2 / (2 sigma^2))`` per axis out to
    the filter's 4-sigma radius and 0 beyond it), divided by its maximum (so the centre is 1), then cast to
    ``dtype``; zeros are replaced by the smallest non-zero value. The returned array is read-only.
    """
    patch = tuple(int(n) for n in patch_size)
    if not patch or min(patch) < 1:
        raise ConfigError(f"patch_size must be positive integers, got {tuple(patch_size)}")
    if not sigma_scale > 0:
        raise ConfigError(f"sigma_scale must be > 0, got {sigma_scale}")
    return _gaussian_cached(patch, float(sigma_scale), np.dtype(dtype).name)


def compute_window_starts(image_shape: Sequence[int], patch_size: Sequence[int], step: float = 0.5) -> list[list[int]]:
    """Window start indices per axis, as nnU-Net's ``compute_steps_for_sliding_window``.

    The image must already be at least the patch size. Per axis: ``n = ceil((size - patch) / (patch *
    step)) + 1`` windows, evenly spaced from 0 to ``size - patch`` and rounded with ``np.round`` (halves
    to even, as nnU-Net). Example: size 11, patch 4, step 0.5 -> ``[0, 2, 4, 5, 7]``.
    """
    if len(image_shape) != len(patch_size):
        raise ConfigError(f"image shape {tuple(image_shape)} and patch_size {tuple(patch_size)} differ in length")
    if not 0 < step <= 1:
        raise ConfigError(f"step must be in (0, 1], got {step}")
    starts = []
    for size, patch in zip(image_shape, patch_size):
        if size < patch:
            raise ConfigError(
                f"image shape {tuple(image_shape)} is smaller than patch_size {tuple(patch_size)}; pad it first"
            )
        count = int(np.ceil((size - patch) / (patch * step))) + 1
        spacing = (size - patch) / (count - 1) if count > 1 else 0.0
        starts.append([int(np.round(spacing * i)) for i in range(count)])
    return starts


def argmax_labels(logits, dtype=np.uint8) -> np.ndarray:
    """Label map ``(*spatial)`` from logits or probabilities ``(*spatial, K)`` (class axis last)."""
    return np.asarray(jnp.argmax(jnp.asarray(logits), axis=-1)).astype(dtype)


# --- the window table and mirroring -----------------------------------------------------------------------


def _pad_widths(spatial: Sequence[int], patch: Sequence[int]) -> list[tuple[int, int]]:
    """Symmetric zero padding up to the patch size (nnU-Net's ``pad_nd_image``): below gets the floor half."""
    widths = []
    for size, p in zip(spatial, patch):
        total = max(p - size, 0)
        widths.append((total // 2, total - total // 2))
    return widths


def _window_table(num_images: int, padded: Sequence[int], patch: Sequence[int], step: float, batch_size: int):
    """``(starts (W, 1 + d) int32, valid (W,) float32, spatial_starts (S, d) int32)``.

    One row per (image, window position), padded to a multiple of ``batch_size`` with copies of the first
    row whose ``valid`` weight is 0, so every batch has the same shape and the copies add nothing.
    """
    spatial = np.array(list(itertools.product(*compute_window_starts(padded, patch, step))), dtype=np.int32)
    rows = [np.concatenate([[n], s]) for n in range(num_images) for s in spatial]
    count = len(rows)
    total = -(-count // batch_size) * batch_size
    rows += [rows[0]] * (total - count)
    valid = np.concatenate([np.ones(count, np.float32), np.zeros(total - count, np.float32)])
    return np.asarray(rows, dtype=np.int32), valid, spatial


def _mirror_subsets(mirror_axes, ndim: int) -> tuple[tuple[int, ...], ...]:
    """Every subset of ``mirror_axes`` (spatial axes; ``None`` = all), the empty subset first."""
    axes = tuple(range(ndim)) if mirror_axes is None else tuple(int(a) for a in mirror_axes)
    if any(not 0 <= a < ndim for a in axes) or len(set(axes)) != len(axes):
        raise ConfigError(f"mirror_axes {tuple(mirror_axes)} must be distinct spatial axes in 0..{ndim - 1}")
    return tuple(itertools.chain.from_iterable(itertools.combinations(axes, r) for r in range(len(axes) + 1)))


# Window voxels (batch x mirrored copies x patch voxels) one network call may see: 2 x 128^3, the batch
# nnU-Net's 3d_fullres trains with. Sixteen mirrored copies of two 64 x 192 x 192 windows (38M voxels)
# needed 58 GB for one buffer of the depth_stack convolution on a CPU; in groups they stay within it.
MAX_VOXELS_PER_CALL = 2 * 128**3


def mirror_group_size(num_subsets: int, batch_size: int, patch) -> int:
    """Mirrored copies per network call: all of them while ``batch_size`` windows of each fit
    :data:`MAX_VOXELS_PER_CALL`, else the largest divisor of ``num_subsets`` that fits (at least 1)."""
    per_copy = int(batch_size) * int(np.prod(patch))
    fitting = max(1, MAX_VOXELS_PER_CALL // per_copy)
    return max(d for d in range(1, num_subsets + 1) if num_subsets % d == 0 and d <= fitting)


def _flipped(x, flips):
    """``x``'s flips along each of ``flips`` (tuples of axes), concatenated along the batch axis."""
    return jnp.concatenate([jnp.flip(x, axes) if axes else x for axes in flips])


def _unflipped_sum(out, flips, batch: int):
    """Sum of the copies in ``out`` (``len(flips) * batch`` rows), each flipped back."""
    out = out.reshape((len(flips), batch) + out.shape[1:])
    return sum(jnp.flip(out[i], axes) if axes else out[i] for i, axes in enumerate(flips))


def _mirrored_prediction(call, params, windows, mirror_subsets, window_sharding=None):
    """Mean over ``mirror_subsets`` of ``flip(call(params, flip(windows)))``, float32 ``(B, *patch, K)``.

    The flipped copies go through the network in groups of :func:`mirror_group_size` (all of them at once
    for small windows: one call, no loop). Larger windows take one call per group inside a ``lax.scan``
    whose body holds the network once (compiled once), each group's flips chosen by ``lax.switch``.
    """
    if len(mirror_subsets) == 1:
        return call(params, windows).astype(jnp.float32)
    flips = [tuple(a + 1 for a in subset) for subset in mirror_subsets]  # + 1: the batch axis comes first
    batch = windows.shape[0]
    size = mirror_group_size(len(flips), batch, windows.shape[1:-1])
    groups = [flips[i : i + size] for i in range(0, len(flips), size)]

    def group_sum(stacked, group):
        stacked = _constrain(stacked, window_sharding)  # keep the enlarged batch split over the devices
        return _unflipped_sum(call(params, stacked).astype(jnp.float32), group, batch)

    if len(groups) == 1:
        return group_sum(_flipped(windows, flips), flips) / len(flips)

    def body(total, index):
        stacked = lax.switch(index, [functools.partial(_flipped, flips=group) for group in groups], windows)
        out = _constrain(call(params, _constrain(stacked, window_sharding)).astype(jnp.float32), window_sharding)
        unflip = [functools.partial(_unflipped_sum, flips=group, batch=batch) for group in groups]
        return total + lax.switch(index, unflip, out), None

    out = jax.eval_shape(lambda w: call(params, w), windows)
    total, _ = lax.scan(body, jnp.zeros(out.shape, jnp.float32), jnp.arange(len(groups)))
    return total / len(flips)


def _constrain(x, sharding):
    return x if sharding is None else lax.with_sharding_constraint(x, sharding)


# --- compiled programs ------------------------------------------------------------------------------------


def _call_fn(apply_fn, with_params: bool):
    return (lambda params, x: apply_fn(params, x)) if with_params else (lambda params, x: apply_fn(x))


@functools.lru_cache(maxsize=8)
def _device_program(apply_fn, with_params, patch, batch_size, mirror_subsets, num_classes, window_sharding):
    """The jitted whole-image program: ``(params, image (N, *S, C), starts, valid, spatial_starts, weight)
    -> logits (N, *S, K)``. Cached per static configuration; ``jax.jit`` caches per input shape."""
    call = _call_fn(apply_fn, with_params)
    ndim = len(patch)

    def program(params, image, starts, valid, spatial_starts, weight):
        num_images, spatial, channels = image.shape[0], image.shape[1:-1], image.shape[-1]
        widths = _pad_widths(spatial, patch)
        padded = jnp.pad(image, [(0, 0), *widths, (0, 0)])

        def cut(start):
            return lax.dynamic_slice(padded, (start[0], *start[1:], 0), (1, *patch, channels))[0]

        def predict(window_starts):
            windows = _constrain(jax.vmap(cut)(window_starts), window_sharding)
            return _constrain(
                _mirrored_prediction(call, params, windows, mirror_subsets, window_sharding), window_sharding
            )

        k = num_classes
        if k is None:
            k = jax.eval_shape(predict, jax.ShapeDtypeStruct((batch_size, 1 + ndim), jnp.int32)).shape[-1]

        def add_batch(acc, batch):
            window_starts, window_valid = batch
            batch_weight = weight[None, ..., None] * window_valid.reshape((-1,) + (1,) * (ndim + 1))
            weighted = predict(window_starts) * batch_weight  # padding rows of the table weigh 0

            def add_one(b, acc):
                index = (window_starts[b, 0], *window_starts[b, 1:], 0)
                current = lax.dynamic_slice(acc, index, (1, *patch, k))
                return lax.dynamic_update_slice(acc, current + weighted[b][None], index)

            return lax.fori_loop(0, batch_size, add_one, acc), None

        acc = jnp.zeros((num_images, *padded.shape[1:-1], k), jnp.float32)
        batches = (starts.reshape(-1, batch_size, 1 + ndim), valid.reshape(-1, batch_size))
        acc, _ = lax.scan(add_batch, acc, batches)

        def add_weight(i, total):
            return lax.dynamic_update_slice(
                total, lax.dynamic_slice(total, spatial_starts[i], patch) + weight, spatial_starts[i]
            )

        total = lax.fori_loop(0, spatial_starts.shape[0], add_weight, jnp.zeros(padded.shape[1:-1], jnp.float32))
        logits = acc / total[None, ..., None]
        region = tuple(slice(lo, lo + n) for (lo, _), n in zip(widths, spatial))
        return logits[(slice(None), *region, slice(None))]

    return jax.jit(program)


@functools.lru_cache(maxsize=8)
def _batch_program(apply_fn, with_params, mirror_subsets, window_sharding):
    """The jitted per-batch program of host mode: ``(params, windows, weight (*patch)) -> weighted logits``."""
    call = _call_fn(apply_fn, with_params)

    def program(params, windows, weight):
        windows = _constrain(windows, window_sharding)
        logits = _mirrored_prediction(call, params, windows, mirror_subsets, window_sharding)
        return _constrain(logits * weight[None, ..., None], window_sharding)

    return jax.jit(program)


def _host_accumulate(program, params, image, patch, step, batch_size, weight, window_sharding):
    """Host mode: numpy padding, window cutting and accumulation; one batch on the device at a time."""
    num_images, spatial = image.shape[0], image.shape[1:-1]
    widths = _pad_widths(spatial, patch)
    padded = np.pad(image, [(0, 0), *widths, (0, 0)])
    starts, valid, spatial_starts = _window_table(num_images, padded.shape[1:-1], patch, step, batch_size)
    acc, pending = None, None

    def window_region(start):
        return (int(start[0]), *(slice(int(s), int(s) + p) for s, p in zip(start[1:], patch)))

    def drain(done):
        nonlocal acc
        batch_starts, batch_valid, result = done
        result = np.asarray(result)
        if acc is None:
            acc = np.zeros((num_images, *padded.shape[1:-1], result.shape[-1]), np.float32)
        for start, is_valid, logits in zip(batch_starts, batch_valid, result):
            if is_valid:
                acc[window_region(start)] += logits

    for first in range(0, len(starts), batch_size):
        batch_starts, batch_valid = starts[first : first + batch_size], valid[first : first + batch_size]
        windows = np.stack([padded[window_region(s)] for s in batch_starts])
        if window_sharding is not None:
            windows = jax.device_put(windows, window_sharding)
        result = program(params, windows, weight)
        if pending is not None:  # the device works on this batch while the host adds the previous one
            drain(pending)
        pending = (batch_starts, batch_valid, result)
    drain(pending)
    total = np.zeros(padded.shape[1:-1], np.float32)
    for start in spatial_starts:
        total[tuple(slice(int(s), int(s) + p) for s, p in zip(start, patch))] += weight
    acc /= total[None, ..., None]  # in place: a second K x voxels array is what host mode exists to avoid
    region = tuple(slice(lo, lo + n) for (lo, _), n in zip(widths, spatial))
    return acc[(slice(None), *region, slice(None))]


def _window_sharding(mesh, data_axis: str, batch_size: int):
    """``(sharding of the window batch or None, batch size rounded up to a multiple of the data axis)``."""
    if mesh is None:
        return None, batch_size
    from jax.sharding import NamedSharding, PartitionSpec

    if data_axis not in mesh.shape:
        raise ConfigError(f"mesh has no axis {data_axis!r} (axes: {tuple(mesh.shape)})")
    devices = mesh.shape[data_axis]
    return NamedSharding(mesh, PartitionSpec(data_axis)), -(-batch_size // devices) * devices


def _cached(builder, *key):
    """``builder(*key)`` through its lru_cache, or built afresh when an argument is unhashable."""
    try:
        return builder(*key)
    except TypeError:
        return builder.__wrapped__(*key)


def sliding_window(
    apply_fn: Callable,
    image,
    patch_size: Sequence[int],
    step: float = 0.5,
    blend: str = "gaussian",
    sigma_scale: float = 1.0 / 8,
    batch_size: int = 2,
    mirror_axes: Sequence[int] | None = None,
    num_classes: int | None = None,
    *,
    params=None,
    accumulate: str = "device",
    mesh=None,
    data_axis: str = "data",
):
    """Blended logits of ``apply_fn`` over a whole image (see the module docstring for the conventions).

    Args:
      apply_fn: ``apply_fn(windows)`` (or ``apply_fn(params, windows)`` when ``params`` is given) maps
        ``(B, *patch_size, C)`` to logits ``(B, *patch_size, K)``. Pass the same function object (and
        ``params`` as an argument rather than closed over) to reuse the compiled program across calls.
      image: ``(*spatial, C)`` for one image or ``(N, *spatial, C)`` for N images of one shape (windows
        of all images share the batches: 2D slices of a volume go through together).
      patch_size: window size, one entry per spatial axis; images smaller than it are zero-padded.
      step: window step as a fraction of the patch (nnU-Net: 0.5).
      blend: ``"gaussian"`` (:func:`gaussian_importance_map` with ``sigma_scale``) or ``"constant"``.
      batch_size: windows per ``apply_fn`` call (rounded up to a multiple of the mesh's data axis).
      mirror_axes: spatial axes (0-based, channel and batch axes not counted) whose every flip
        combination is averaged; ``None`` = all spatial axes (nnU-Net's default), ``()`` = no mirroring.
      num_classes: K, if known (saves one trace of ``apply_fn`` to find it).
      accumulate: ``"device"`` (one jitted program) or ``"host"`` (memory-bounded; see module docstring).
      mesh / data_axis: split the window batches over the devices along ``data_axis`` of ``mesh``.

    Returns:
      float32 logits ``(*spatial, K)`` (or ``(N, *spatial, K)``): a ``jax.Array`` in device mode, a numpy
      array in host mode.
    """
    patch = tuple(int(p) for p in patch_size)
    ndim = len(patch)
    if np.ndim(image) not in (ndim + 1, ndim + 2):
        raise ConfigError(
            f"image of shape {np.shape(image)} does not fit a {ndim}D patch_size {patch}: expected "
            f"(*{ndim} spatial, C) or (N, *{ndim} spatial, C)"
        )
    if blend not in ("gaussian", "constant"):
        raise ConfigError(f"blend must be 'gaussian' or 'constant', got {blend!r}")
    if accumulate not in ("device", "host"):
        raise ConfigError(f"accumulate must be 'device' or 'host', got {accumulate!r}")
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    compute_window_starts(patch, patch, step)  # validates step and patch
    single = np.ndim(image) == ndim + 1
    weight = gaussian_importance_map(patch, sigma_scale) if blend == "gaussian" else np.ones(patch, np.float32)
    mirror_subsets = _mirror_subsets(mirror_axes, ndim)
    window_sharding, batch_size = _window_sharding(mesh, data_axis, int(batch_size))
    with_params = params is not None

    if accumulate == "host":
        program = _cached(_batch_program, apply_fn, with_params, mirror_subsets, window_sharding)
        batched = np.asarray(image)[None] if single else np.asarray(image)
        logits = _host_accumulate(program, params, batched, patch, step, batch_size, weight, window_sharding)
    else:
        program = _cached(
            _device_program,
            apply_fn,
            with_params,
            patch,
            batch_size,
            mirror_subsets,
            None if num_classes is None else int(num_classes),
            window_sharding,
        )
        batched = image[None] if single else image
        padded = [max(s, p) for s, p in zip(np.shape(batched)[1:-1], patch)]
        starts, valid, spatial_starts = _window_table(np.shape(batched)[0], padded, patch, step, batch_size)
        logits = program(params, batched, starts, valid, spatial_starts, weight)
    return logits[0] if single else logits
