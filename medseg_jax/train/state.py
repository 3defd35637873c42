"""The training state: one pytree holding everything a step changes."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """``step`` (int32 scalar), ``params``, ``opt_state``, ``rng`` (the run's base key as raw ``uint32``
    key data, so that checkpoints and shardings treat it like any array; each step folds its step number
    into it) and ``ema_params`` (``None`` unless an EMA decay is configured)."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    ema_params: Any = None


def create_train_state(model, optimizer: optax.GradientTransformation, rng, sample_input, use_ema: bool = False):
    """Initialise parameters from ``sample_input`` (only its shape and dtype matter) and the optimiser.

    Pure, so it can be jitted straight into target shardings (``jax.jit(..., out_shardings=...)``).
    """
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng)
    init_key, run_key = jax.random.split(rng)
    params = model.init(init_key, sample_input)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(run_key),
        ema_params=jax.tree_util.tree_map(jnp.copy, params) if use_ema else None,
    )


def step_key(state: TrainState):
    """The key of the current step: ``fold_in(base key, step)``; the same whether or not the run resumed."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
