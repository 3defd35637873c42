"""Segmentation losses with nnU-Net's conventions.

Shapes: ``logits`` are channels-last ``(N, *spatial, K)`` (K classes, class 0 = background) and
``labels`` are integer maps ``(N, *spatial)``. Voxels whose label equals ``ignore_index`` contribute
to no term. Every loss returns a float32 scalar.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def valid_mask(labels, ignore_index: int | None):
    """1.0 where a voxel counts, 0.0 where its label is ``ignore_index`` (shape of ``labels``)."""
    if ignore_index is None:
        return jnp.ones(labels.shape, jnp.float32)
    return (labels != ignore_index).astype(jnp.float32)


def soft_dice_loss(
    logits,
    labels,
    *,
    smooth: float = 1e-5,
    include_background: bool = False,
    batch_dice: bool = False,
    ignore_index: int | None = None,
):
    """``1 - mean_k dice_k`` with the soft Dice of nnU-Net's ``MemoryEfficientSoftDiceLoss``.

    ``dice_k = (2 * sum(p_k * y_k) + smooth) / max(sum(p_k) + sum(y_k) + smooth, 1e-8)`` where ``p`` is the
    softmax of ``logits`` and ``y`` the one-hot labels, summed over the spatial axes (and over the batch
    when ``batch_dice``), then averaged over samples and classes. Background (class 0) is left out unless
    ``include_background``. nnU-Net reports ``-dice``; ``1 - dice`` has the same gradient and stays >= 0.
    """
    num_classes = logits.shape[-1]
    mask = valid_mask(labels, ignore_index)[..., None]
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1) * mask
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * mask
    sum_axes = tuple(range(0 if batch_dice else 1, logits.ndim - 1))
    intersection = jnp.sum(probs * onehot, axis=sum_axes)
    denominator = jnp.sum(probs, axis=sum_axes) + jnp.sum(onehot, axis=sum_axes)
    dice = (2.0 * intersection + smooth) / jnp.maximum(denominator + smooth, 1e-8)
    if not include_background:
        dice = dice[..., 1:]
    return 1.0 - jnp.mean(dice)


def cross_entropy_loss(logits, labels, *, ignore_index: int | None = None):
    """Mean softmax cross-entropy over the voxels that are not ``ignore_index``."""
    mask = valid_mask(labels, ignore_index)
    safe_labels = jnp.where(mask > 0, labels, 0)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, safe_labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def dice_ce_loss(
    logits,
    labels,
    *,
    dice_weight: float = 1.0,
    ce_weight: float = 1.0,
    smooth: float = 1e-5,
    include_background: bool = False,
    batch_dice: bool = False,
    ignore_index: int | None = None,
):
    """nnU-Net's ``DC_and_CE_loss``: ``ce_weight * CE + dice_weight * (1 - soft Dice)``, 1:1 by default."""
    dice = soft_dice_loss(
        logits,
        labels,
        smooth=smooth,
        include_background=include_background,
        batch_dice=batch_dice,
        ignore_index=ignore_index,
    )
    ce = cross_entropy_loss(logits, labels, ignore_index=ignore_index)
    return ce_weight * ce + dice_weight * dice


def deep_supervision_weights(num_outputs: int) -> tuple[float, ...]:
    """nnU-Net's weights for outputs ordered highest resolution first: ``1/2^i``, the lowest resolution
    gets 0, normalised to sum to 1. A single output gets weight 1."""
    if num_outputs == 1:
        return (1.0,)
    raw = [0.5**i for i in range(num_outputs)]
    raw[-1] = 0.0
    total = sum(raw)
    return tuple(w / total for w in raw)


def downsample_labels(labels, shape: Sequence[int]):
    """Nearest-neighbour downsampling of ``labels (N, *spatial)`` to ``(N, *shape)`` by strided slicing
    (each output voxel takes the label of the first voxel of its block). Sizes must divide evenly."""
    factors = []
    for full, small in zip(labels.shape[1:], shape):
        if full % small:
            raise ValueError(f"label size {labels.shape[1:]} is not a multiple of output size {tuple(shape)}")
        factors.append(full // small)
    return labels[(slice(None),) + tuple(slice(None, None, f) for f in factors)]


def deep_supervision_loss(outputs, labels, loss_fn=dice_ce_loss, **loss_kwargs):
    """Weighted sum of ``loss_fn`` over deep-supervision outputs (highest resolution first), with labels
    downsampled to each output's resolution and the weights of :func:`deep_supervision_weights`."""
    if not isinstance(outputs, (list, tuple)):
        return loss_fn(outputs, labels, **loss_kwargs)
    total = jnp.float32(0.0)
    for weight, output in zip(deep_supervision_weights(len(outputs)), outputs):
        if weight == 0.0:
            continue  # nnU-Net's lowest-resolution output has weight 0: skip its (dead) computation
        total = total + weight * loss_fn(output, downsample_labels(labels, output.shape[1:-1]), **loss_kwargs)
    return total
