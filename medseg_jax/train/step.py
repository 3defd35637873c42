"""Pure train and eval steps.

``train_step(state, batch) -> (state, metrics)`` and ``eval_step(params, batch) -> metrics`` are plain
functions of arrays: build them once, jit them once (:func:`jit_train_step`), and call them every step
without retracing. ``batch`` is ``{"image": (B, *spatial, C) float, "label": (B, *spatial) int}``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from medseg_jax.losses import deep_supervision_loss, dice_ce_loss
from medseg_jax.metrics.jax_overlap import per_class_tp_fp_fn
from medseg_jax.train.state import TrainState, step_key


def loss_kwargs(loss_config) -> dict:
    c = loss_config
    return dict(
        dice_weight=c.dice_weight,
        ce_weight=c.ce_weight,
        smooth=c.smooth,
        include_background=c.include_background,
        batch_dice=c.batch_dice,
        ignore_index=c.ignore_index,
    )


def tree_all_finite(tree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def make_train_step(
    model,
    optimizer: optax.GradientTransformation,
    loss_config,
    *,
    lr_schedule: optax.Schedule | None = None,
    ema_decay: float | None = None,
    augment_fn: Callable | None = None,
):
    """The pure training step of ``model`` (deep supervision follows the model's own switch).

    Randomness: the step's key is ``fold_in(state.rng, state.step)``, so a resumed run draws the same
    numbers as an uninterrupted one. ``augment_fn(key, image, label) -> (image, label)`` runs inside the
    step when given.

    Non-finite loss or gradients: parameters, optimiser state and EMA are left unchanged (the update
    is skipped) while ``step`` still advances; ``metrics["finite"]`` is False so that the loop can stop
    with the step number or carry on, as configured.
    """
    kwargs = loss_kwargs(loss_config)

    def train_step(state: TrainState, batch):
        key = step_key(state)
        image, label = batch["image"], batch["label"]
        if augment_fn is not None:
            image, label = augment_fn(key, image, label)

        def loss_fn(params):
            outputs = model.apply(params, image)
            return deep_supervision_loss(outputs, label, dice_ce_loss, **kwargs)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        finite = jnp.isfinite(loss) & tree_all_finite(grads)
        updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        new_ema = state.ema_params
        if ema_decay is not None:
            new_ema = optax.incremental_update(new_params, state.ema_params, step_size=1.0 - ema_decay)

        def keep_if_finite(new, old):
            return jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)

        # flax.struct.dataclass adds replace() at run time; its stubs do not declare it.
        new_state = state.replace(  # type: ignore[attr-defined]
            step=state.step + 1,
            params=keep_if_finite(new_params, state.params),
            opt_state=keep_if_finite(new_opt_state, state.opt_state),
            ema_params=keep_if_finite(new_ema, state.ema_params) if ema_decay is not None else None,
        )
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "finite": finite}
        if lr_schedule is not None:
            metrics["learning_rate"] = lr_schedule(state.step)
        return new_state, metrics

    return train_step


def make_eval_step(model, loss_config):
    """The pure evaluation step: loss of the full-resolution output and per-class hard-label counts
    ``tp``, ``fp``, ``fn`` of shape ``(K,)`` summed over the batch (Dice_k = 2tp / (2tp + fp + fn),
    which the caller aggregates over batches, like nnU-Net's pseudo-Dice)."""
    kwargs = loss_kwargs(loss_config)
    full_resolution = model.clone(deep_supervision=False)

    def eval_step(params, batch):
        logits = full_resolution.apply(params, batch["image"])
        label = batch["label"]
        valid = None if kwargs["ignore_index"] is None else label != kwargs["ignore_index"]
        tp, fp, fn = per_class_tp_fp_fn(jnp.argmax(logits, axis=-1), label, logits.shape[-1], valid)
        return {"loss": dice_ce_loss(logits, label, **kwargs), "tp": tp, "fp": fp, "fn": fn}

    return eval_step


def jit_train_step(train_step, state_sharding=None, batch_sharding=None):
    """Jit ``train_step`` once, donating the state's buffers; shardings are optional (single device)."""
    if state_sharding is None and batch_sharding is None:
        return jax.jit(train_step, donate_argnums=0)
    return jax.jit(
        train_step,
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, None),
        donate_argnums=0,
    )
