"""Dice and IoU as pure JAX functions, usable inside a jitted eval step.

Same definitions and empty-mask conventions as the numpy :mod:`medseg_jax.metrics.overlap`, whose
:func:`~medseg_jax.metrics.overlap.dice_iou_from_counts` computes the scores here too (with
``xp=jax.numpy``): per class ``dice = 2 TP / (2 TP + FP + FN)``, ``iou = TP / (TP + FP + FN)``;
``empty="nnunet"`` (default) gives NaN when both masks are empty and 0 when one is; ``empty="monai"``
gives NaN whenever the reference is empty. ``num_classes`` and ``empty`` are Python values (static under
``jax.jit``). Counts are summed over every axis (the whole batch); ``jax.vmap`` over the batch axis gives
per-sample values. Counts are int32, so a single call must cover fewer than 2^31 voxels.
"""

from __future__ import annotations

import jax.numpy as jnp

from medseg_jax.metrics.overlap import dice_iou_from_counts


def per_class_tp_fp_fn(prediction, reference, num_classes: int, valid=None):
    """Per-class ``(tp, fp, fn)``, each int32 of shape ``(num_classes,)``, from two label maps.

    ``prediction``, ``reference``: integer arrays of equal shape ``(...)``; ``valid``: optional boolean
    array of that shape, False voxels are not counted (e.g. padding).
    """
    classes = jnp.arange(num_classes)
    pred = prediction[..., None] == classes
    ref = reference[..., None] == classes
    if valid is not None:
        pred, ref = pred & valid[..., None], ref & valid[..., None]
    axes = tuple(range(pred.ndim - 1))
    tp = jnp.sum(pred & ref, axis=axes, dtype=jnp.int32)
    return tp, jnp.sum(pred, axis=axes, dtype=jnp.int32) - tp, jnp.sum(ref, axis=axes, dtype=jnp.int32) - tp


def dice_iou(prediction, reference, num_classes: int, empty: str = "nnunet", valid=None) -> dict:
    """``{"dice", "iou", "tp", "fp", "fn"}``, each of shape ``(num_classes,)``, from two label maps."""
    tp, fp, fn = per_class_tp_fp_fn(prediction, reference, num_classes, valid)
    dice, iou = dice_iou_from_counts(tp, fp, fn, empty, xp=jnp)
    return {"dice": dice, "iou": iou, "tp": tp, "fp": fp, "fn": fn}


def dice_iou_from_logits(logits, reference, empty: str = "nnunet", valid=None) -> dict:
    """As :func:`dice_iou` with the prediction the argmax of channels-last ``logits`` ``(..., C)``."""
    return dice_iou(jnp.argmax(logits, axis=-1), reference, logits.shape[-1], empty, valid)
