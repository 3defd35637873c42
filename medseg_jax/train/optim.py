"""Optimisers and learning-rate schedules (optax), configured by :class:`medseg_jax.config.TrainConfig`."""

from __future__ import annotations

import optax


def make_lr_schedule(train_config) -> optax.Schedule:
    """sgd: nnU-Net's poly decay ``lr * (1 - t/T)^power`` (after an optional linear warmup);
    adamw: linear warmup then cosine decay to 0 at ``steps``."""
    c = train_config
    warmup = min(c.warmup_steps, max(c.steps - 1, 0))
    if c.optimizer == "adamw":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0 if warmup else c.learning_rate,
            peak_value=c.learning_rate,
            warmup_steps=warmup,
            decay_steps=max(c.steps, warmup + 1),
            end_value=0.0,
        )
    decay = optax.polynomial_schedule(
        init_value=c.learning_rate, end_value=0.0, power=c.poly_power, transition_steps=max(c.steps - warmup, 1)
    )
    if not warmup:
        return decay
    ramp = optax.linear_schedule(0.0, c.learning_rate, warmup)
    return optax.join_schedules([ramp, decay], boundaries=[warmup])


def make_optimizer(train_config) -> optax.GradientTransformation:
    """nnU-Net's default (``optimizer: sgd``): gradient-norm clip 12 on the raw gradients, then PyTorch
    SGD semantics -- L2 weight decay added to the gradient, Nesterov momentum 0.99 -- with poly decay.
    ``adamw``: clip, then AdamW with decoupled weight decay, warmup and cosine decay."""
    c = train_config
    schedule = make_lr_schedule(c)
    clip = [optax.clip_by_global_norm(c.grad_clip_norm)] if c.grad_clip_norm else []
    if c.optimizer == "adamw":
        return optax.chain(*clip, optax.adamw(schedule, weight_decay=c.weight_decay))
    return optax.chain(
        *clip,
        optax.add_decayed_weights(c.weight_decay),
        optax.sgd(schedule, momentum=c.momentum, nesterov=True),
    )
