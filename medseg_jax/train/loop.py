"""The training loop: jitted step over a stream of batches, with progress and a non-finite guard.

This is the single-process loop; checkpointing, sharding and validation hook in here.
"""

from __future__ import annotations

import time
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from medseg_jax.errors import TrainingError
from medseg_jax.train.optim import make_lr_schedule, make_optimizer
from medseg_jax.train.state import create_train_state
from medseg_jax.train.step import jit_train_step, make_train_step


def init_state(model, train_config, sample_input):
    """A fresh TrainState for ``model`` with the configured optimiser and seed."""
    optimizer = make_optimizer(train_config)
    return create_train_state(
        model, optimizer, jax.random.key(train_config.seed), sample_input,
        use_ema=train_config.ema_decay is not None,
    ), optimizer


def fit(model, train_config, batches: Iterator[dict], *, state=None, progress: bool = True, log_every: int = 1):
    """Train ``model`` for ``train_config.steps`` steps on ``batches``; returns ``(state, history)``.

    ``history`` holds one dict per logged step: ``step``, ``loss``, ``learning_rate``, ``seconds``.
    A non-finite loss raises :class:`TrainingError` with the step number under ``nan_policy: stop``;
    under ``skip`` the update is dropped and training continues.
    """
    from tqdm.auto import tqdm

    first = next(batches)
    if state is None:
        state, optimizer = init_state(model, train_config, jnp.zeros((1, *first["image"].shape[1:]), jnp.float32))
    else:
        optimizer = make_optimizer(train_config)
    schedule = make_lr_schedule(train_config)
    step_fn = jit_train_step(make_train_step(model, optimizer, train_config.loss, lr_schedule=schedule,
                                             ema_decay=train_config.ema_decay))
    history = []
    start_step = int(state.step)
    bar = tqdm(total=train_config.steps, initial=start_step, desc="train", unit="step", disable=not progress)
    started = time.perf_counter()
    batch = first
    for step in range(start_step, train_config.steps):
        state, metrics = step_fn(state, batch)
        if step + 1 < train_config.steps:
            batch = next(batches)  # overlap host-side loading with the asynchronous device step
        if (step + 1) % log_every == 0 or step + 1 == train_config.steps:
            metrics = jax.device_get(metrics)
            if not bool(metrics["finite"]):
                if train_config.nan_policy == "stop":
                    bar.close()
                    raise TrainingError(
                        f"non-finite loss ({float(metrics['loss'])}) at step {step}; the update was not applied. "
                        "Lower train.learning_rate, check the input intensities, or set train.nan_policy=skip."
                    )
            entry = {"step": step + 1, "loss": float(metrics["loss"]),
                     "learning_rate": float(metrics["learning_rate"]), "seconds": time.perf_counter() - started}
            history.append(entry)
            bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{entry['learning_rate']:.2e}")
        bar.update(1)
    bar.close()
    return state, history


def loss_summary(history: list[dict]) -> str:
    """One line: first and last loss and the time taken."""
    if not history:
        return "no steps run"
    losses = np.array([h["loss"] for h in history])
    return (f"{history[-1]['step']} steps in {history[-1]['seconds']:.1f} s, loss {losses[0]:.3f} -> "
            f"{losses[-min(10, len(losses)):].mean():.3f} (mean of last {min(10, len(losses))})")
