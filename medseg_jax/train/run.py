"""Setting up a training run: the run folder, the store's plan and splits, the model, the mesh and the
sharded, jitted functions. The loop itself is in :mod:`medseg_jax.train.loop`."""

from __future__ import annotations

import dataclasses
import platform
from pathlib import Path

import jax
import jax.numpy as jnp

from medseg_jax.atomic import write_json_atomic
from medseg_jax.config import save_config, to_dict
from medseg_jax.errors import ConfigError, DataError

PLAN_NAME = "plan.json"
SPLITS_NAME = "splits.json"


def store_plan(store_dir) -> dict:
    """The plan a store was preprocessed with (``STORE/plan.json``, written by ``medseg-jax preprocess``)."""
    from medseg_jax.data.fingerprint import load_plan

    path = Path(store_dir) / PLAN_NAME
    if not path.is_file():
        raise DataError(f"{path}: the store has no plan; preprocess with `medseg-jax preprocess` (it writes it)")
    return load_plan(path)


def store_fold(store, fold: int, n_folds: int = 5) -> dict[str, list[str]]:
    """Fold ``fold`` of ``STORE/splits.json`` (made from the store's cases with nnU-Net's k-fold rule,
    the same folds as the raw dataset's, if absent); ``fold = -1`` trains on every case ("all")."""
    from medseg_jax.data.splits import make_splits, read_json

    case_ids = store.case_ids()
    if not case_ids:
        raise DataError(f"{store.path}: the store holds no cases")
    if fold == -1:
        return {"train": case_ids, "val": []}
    path = Path(store.path) / SPLITS_NAME
    if path.is_file():
        splits = read_json(path)
    else:
        splits = make_splits(case_ids, n_folds=n_folds)
        write_json_atomic(path, splits)
    if not 0 <= fold < len(splits):
        raise ConfigError(f"fold {fold} does not exist: {path} has folds 0..{len(splits) - 1} (or -1 for all cases)")
    unknown = sorted(set(splits[fold]["train"] + splits[fold]["val"]) - set(case_ids))
    if unknown:
        raise DataError(f"{path}: fold {fold} names cases missing from the store: {unknown[:5]}")
    return splits[fold]


def environment() -> dict:
    """Versions and devices, written into the run folder for reproducibility."""
    import flax
    import optax
    import orbax.checkpoint

    import medseg_jax

    return {
        "medseg_jax": medseg_jax.__version__, "python": platform.python_version(), "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", None) or jax.__version__, "flax": flax.__version__,
        "optax": optax.__version__, "orbax_checkpoint": getattr(orbax.checkpoint, "__version__", "unknown"),
        "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
        "process_count": jax.process_count(),
    }


def run_plan(plan: dict, config) -> dict:
    """The plan as this run uses it: patch and batch size as trained (prediction uses the same patch)."""
    return plan | {"patch_size": list(config.data.patch_size), "batch_size": int(config.data.batch_size)}


def write_run_files(run_dir: Path, config, plan: dict, fold: int) -> None:
    """config.yaml, plan.json (the run's plan) and environment.json (seed, versions) in the run folder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    write_json_atomic(run_dir / PLAN_NAME, plan)
    write_json_atomic(run_dir / "environment.json", environment() | {"seed": config.train.seed, "fold": fold})


def resolve_config(config, plan: dict):
    """The run config with the model's data-dependent fields from the plan, and the plan's patch and
    batch size where the config leaves them null."""
    from medseg_jax.models.factory import model_config_from_plan

    model = model_config_from_plan(config.model, plan)
    data = dataclasses.replace(
        config.data,
        patch_size=tuple(config.data.patch_size or plan["patch_size"]),
        batch_size=int(config.data.batch_size or plan["batch_size"]),
    )
    if len(data.patch_size) != model.spatial_dims:
        raise ConfigError(f"data.patch_size {list(data.patch_size)} has {len(data.patch_size)} axes but the plan "
                          f"is {model.spatial_dims}D")
    return dataclasses.replace(config, model=model, data=data)


def check_compatible(saved_meta: dict, config, run_dir: Path) -> None:
    """Refuse to resume a run whose checkpoint was made with another model or optimiser."""
    saved = saved_meta.get("config", {})
    now = to_dict(config)
    for section in ("model",):
        if saved.get(section) != now[section]:
            raise ConfigError(f"{run_dir}: the checkpoint was trained with a different {section} config; "
                              "use a new --out folder to start a new run")
    for key in ("optimizer", "steps"):
        if saved.get("train", {}).get(key) != now["train"][key]:
            raise ConfigError(f"{run_dir}: the checkpoint has train.{key}={saved.get('train', {}).get(key)!r}, "
                              f"this run asks for {now['train'][key]!r}; use a new --out folder")


def sample_input(config) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((1, *config.data.patch_size, config.model.in_channels), jnp.float32)


def load_run(run_dir, checkpoint_choice: str = "latest"):
    """``(model, params, plan, config)`` of a finished or running training run, for prediction.

    ``checkpoint_choice``: ``latest`` (the newest readable checkpoint) or ``best`` (best validation
    pseudo-Dice). EMA parameters are used when the run kept them. The model is built without deep
    supervision (only the full-resolution output), on the default device.
    """
    from medseg_jax import checkpoint
    from medseg_jax.config import load_config
    from medseg_jax.data.fingerprint import load_plan
    from medseg_jax.models.factory import build_unet
    from medseg_jax.train.optim import make_optimizer
    from medseg_jax.train.state import create_train_state

    run_dir = Path(run_dir)
    missing = [name for name in ("config.yaml", PLAN_NAME, "checkpoints") if not (run_dir / name).exists()]
    if missing:
        raise DataError(f"{run_dir}: not a training run folder (missing {', '.join(missing)})")
    config = load_config(run_dir / "config.yaml")
    plan = load_plan(run_dir / PLAN_NAME)
    model = build_unet(config.model)
    optimizer = make_optimizer(config.train)
    abstract = jax.eval_shape(lambda key: create_train_state(model, optimizer, key, jnp.zeros(sample_input(config).shape),
                                                             use_ema=config.train.ema_decay is not None),
                              jax.random.key(0))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = checkpoint.abstract_with_shardings(abstract, jax.tree_util.tree_map(lambda _: device, abstract))
    manager = checkpoint.make_manager(run_dir / "checkpoints")
    if checkpoint_choice == "best":
        step = manager.best_step()
        if step is None:
            raise DataError(f"{run_dir}: no checkpoint carries a validation score; use the latest one")
        state = checkpoint.restore_step(manager, step, target)[0]
    elif checkpoint_choice == "latest":
        restored = checkpoint.restore_latest_good(manager, target)
        if restored is None:
            raise DataError(f"{run_dir / 'checkpoints'}: no checkpoint yet")
        state = restored[1]
    else:
        raise ConfigError(f"checkpoint choice must be 'latest' or 'best', got {checkpoint_choice!r}")
    params = state.ema_params if state.ema_params is not None else state.params
    return build_unet(config.model, deep_supervision=False), params, plan, config
