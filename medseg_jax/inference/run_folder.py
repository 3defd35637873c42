"""A trained run folder as prediction needs it: the network, its parameters, the run's plan and config.

A run folder (written by ``medseg-jax train``) holds ``config.yaml`` (the resolved run config),
``plan.json`` (the store's plan with the patch and batch as trained) and ``checkpoints/``. The model is
rebuilt from ``config.yaml``; the checkpoint's own copy of the config is compared first, so a
``config.yaml`` edited after training is reported as such instead of as an unreadable checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from medseg_jax.errors import ConfigError, DataError

CONFIG_NAME = "config.yaml"
PLAN_NAME = "plan.json"
CHECKPOINTS_NAME = "checkpoints"


def check_config_matches_checkpoint(run_dir: Path, model_section: dict, checkpoint_meta: dict) -> None:
    """Raise :class:`DataError` naming ``config.yaml`` and the fields that differ from the model config
    the checkpoint was trained with. Fields that only choose how the network is computed
    (``EXECUTION_ONLY_MODEL_FIELDS``: conv / upsampling implementation, compute dtype, rematerialisation)
    may differ: the parameters are the same."""
    from medseg_jax.config import EXECUTION_ONLY_MODEL_FIELDS

    saved = checkpoint_meta.get("config", {}).get("model")
    if saved is None:
        return
    changed = sorted(
        k
        for k in set(saved) | set(model_section)
        if k not in EXECUTION_ONLY_MODEL_FIELDS and saved.get(k) != model_section.get(k)
    )
    if not changed:
        return
    details = ", ".join(f"model.{k}: {model_section.get(k)!r} (checkpoint: {saved.get(k)!r})" for k in changed)
    raise DataError(
        f"{run_dir / CONFIG_NAME} disagrees with the checkpoint it should describe ({details}); "
        "was it edited after training? Restore the trained values"
    )


def load_run(run_dir, checkpoint_choice: str = "latest"):
    """``(model, params, plan, config)`` of a finished or running training run, for prediction.

    ``checkpoint_choice``: ``latest`` (the newest readable checkpoint) or ``best`` (best validation
    pseudo-Dice). EMA parameters are used when the run kept them. The model is built without deep
    supervision (only the full-resolution output), on the default device.
    """
    import jax
    import jax.numpy as jnp

    from medseg_jax import checkpoint
    from medseg_jax.atomic import read_json
    from medseg_jax.config import load_config, to_dict
    from medseg_jax.models.factory import build_unet
    from medseg_jax.train.optim import make_optimizer
    from medseg_jax.train.state import create_train_state

    run_dir = Path(run_dir)
    missing = [name for name in (CONFIG_NAME, PLAN_NAME, CHECKPOINTS_NAME) if not (run_dir / name).exists()]
    if missing:
        raise DataError(f"{run_dir}: not a training run folder (missing {', '.join(missing)})")
    if checkpoint_choice not in ("latest", "best"):
        raise ConfigError(f"checkpoint choice must be 'latest' or 'best', got {checkpoint_choice!r}")
    config = load_config(run_dir / CONFIG_NAME)
    plan = read_json(run_dir / PLAN_NAME)
    patch = plan.get("patch_size")
    if patch is None or config.model.in_channels is None:
        raise DataError(
            f"{run_dir}: {PLAN_NAME} has no patch_size or {CONFIG_NAME} no model.in_channels; "
            "it was not written by `medseg-jax train`"
        )
    manager = checkpoint.make_manager(run_dir / CHECKPOINTS_NAME)
    try:
        steps = sorted(manager.all_steps(), reverse=True)
        if not steps:
            raise DataError(f"{run_dir / CHECKPOINTS_NAME}: no checkpoint yet")
        step = manager.best_step() if checkpoint_choice == "best" else steps[0]
        if step is None:
            raise DataError(f"{run_dir}: no checkpoint carries a validation score; use the latest one")
        try:
            meta = checkpoint.restore_meta(manager, step)
        except Exception:  # a damaged checkpoint: restore_latest_good below reports it
            meta = {}
        check_config_matches_checkpoint(run_dir, to_dict(config.model), meta)

        model = build_unet(config.model)
        optimizer = make_optimizer(config.train)
        sample = jnp.zeros((1, *patch, config.model.in_channels))
        abstract = jax.eval_shape(
            lambda key: create_train_state(model, optimizer, key, sample, use_ema=config.train.ema_decay is not None),
            jax.random.key(0),
        )
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = checkpoint.abstract_with_shardings(abstract, jax.tree_util.tree_map(lambda _: device, abstract))
        if checkpoint_choice == "best":
            state = checkpoint.restore_step(manager, step, target)[0]
        else:
            restored = checkpoint.restore_latest_good(manager, target)
            if restored is None:
                raise DataError(f"{run_dir / CHECKPOINTS_NAME}: no checkpoint yet")
            state = restored[1]
    finally:
        manager.close()
    params = state.ema_params if state.ema_params is not None else state.params
    return build_unet(config.model, deep_supervision=False), params, plan, config
