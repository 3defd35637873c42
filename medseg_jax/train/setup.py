"""Setting up a training run: every decision about what is trained, made once, before anything is
written or compiled.

:func:`resolve_run` takes the run config and the store's plan and returns a :class:`ResolvedRun`: the
model config with the plan's topology, the patch and batch, the crop the loader cuts, the augmentation
settings and the mesh shape. It is the only place that checks them against each other: a config value
that disagrees with the plan, a patch not divisible by the network's total stride or a batch not
divisible by the mesh is a :class:`~medseg_jax.errors.ConfigError` naming the field, raised before a
file is written. ``medseg-jax config --plan PLAN`` prints the result.

The rest of this module prepares the run folder (the fold's cases, the files that record the run) and
refuses to continue a run with an incompatible config. The loop itself is in :mod:`medseg_jax.train.loop`.
"""

from __future__ import annotations

import dataclasses
import platform
from pathlib import Path
from typing import Any

from medseg_jax.atomic import write_json_atomic
from medseg_jax.config import RunConfig, load_config, save_config, to_dict
from medseg_jax.errors import ConfigError, DataError

PLAN_NAME = "plan.json"
CONFIG_NAME = "config.yaml"
DEFAULT_VAL_BATCHES = 4  # patch batches per validation when train.val_mode is patches
# The network of a plan that leaves it to the config (the default preset): nnU-Net's PlainConvUNet.
UNPLANNED_NETWORK = {"encoder": "plain", "n_conv_per_stage_decoder": 2}
STAGE_COUNT_FIELDS = ("n_blocks_per_stage", "n_conv_per_stage_decoder")  # one int per stage (per decoder stage)


@dataclasses.dataclass(frozen=True)
class ResolvedRun:
    """What will actually be trained.

    ``config``: the run config with every plan-owned field filled in (written as the run's
    ``config.yaml``); ``plan``: the store's plan with the patch and batch as trained (the run's
    ``plan.json``, which prediction reads). ``crop_size``: what the loader cuts per sample (larger
    than the patch when augmentation rotates or scales); ``device_input_size``: what reaches the
    device (the crop when augmenting there, else the patch). ``mesh_shape``: (data, spatial).
    """

    config: RunConfig
    plan: dict
    patch_size: tuple[int, ...]
    batch_size: int
    crop_size: tuple[int, ...]
    device_input_size: tuple[int, ...]
    mesh_shape: tuple[int, int]
    per_process_batch: int

    @property
    def model(self):
        return self.config.model

    @property
    def augment(self):
        return self.config.augment

    def describe(self) -> dict:
        """A plain summary (for ``medseg-jax config --plan`` and logs)."""
        return {
            "patch_size": list(self.patch_size),
            "batch_size": self.batch_size,
            "per_process_batch": self.per_process_batch,
            "crop_size": list(self.crop_size),
            "device_input_size": list(self.device_input_size),
            "mesh": {"data": self.mesh_shape[0], "spatial": self.mesh_shape[1]},
        }


def plan_model_fields(plan: dict) -> dict[str, Any]:
    """The model fields a plan decides, in ModelConfig's types (the plan JSON format stays here,
    :mod:`medseg_jax.models` never reads it). A ResEnc preset's plan also decides the network
    (``encoder``, ``n_blocks_per_stage``, ``n_conv_per_stage_decoder``); other plans leave it to the config."""
    from medseg_jax.cascade import mask_channels

    try:
        fields: dict[str, Any] = {
            "spatial_dims": int(plan["dim"]),
            "in_channels": len(plan["channel_names"]) + mask_channels(plan),  # a cascade also reads masks
            "num_classes": int(plan["num_classes"]),
            "n_stages": int(plan["n_stages"]),
            "kernel_sizes": tuple(tuple(int(k) for k in stage) for stage in plan["kernel_sizes"]),
            "strides": tuple(tuple(int(s) for s in stage) for stage in plan["strides"]),
        }
        if "encoder" in plan:
            fields["encoder"] = str(plan["encoder"])
        fields |= {key: tuple(int(n) for n in plan[key]) for key in STAGE_COUNT_FIELDS if key in plan}
        return fields
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(
            f"the plan lacks or mangles a model field ({type(exc).__name__}: {exc}); "
            "make it again with `medseg-jax plan`"
        ) from exc


def per_stage_axes(value, n_stages: int, spatial_dims: int) -> tuple[tuple[int, ...], ...] | None:
    """A kernel-size or stride setting (one int, or one int / per-axis list per stage) as one tuple of
    per-axis sizes per stage; None when it has the wrong number of stages or axes."""
    if isinstance(value, int):
        return ((value,) * spatial_dims,) * n_stages
    if len(value) != n_stages:
        return None
    stages = tuple((s,) * spatial_dims if isinstance(s, int) else tuple(s) for s in value)
    return stages if all(len(s) == spatial_dims for s in stages) else None


def check_stage_count(value, count: int, key: str) -> None:
    if value is not None and not isinstance(value, int) and len(value) != count:
        raise ConfigError(
            f"{key}: {list(value)} has {len(value)} entries, the network has {count} "
            "(one per stage; or give one number for all)"
        )


def resolve_model(model_config, plan: dict):
    """``model_config`` with the plan's topology. A plan-owned field the user set to another value than
    the plan's is a ConfigError naming the key and both values; it is never silently replaced."""
    from medseg_jax.data.planners import resenc_blocks
    from medseg_jax.models.unet import default_features

    if model_config.ensemble != 1:
        raise ConfigError(
            f"model.ensemble: {model_config.ensemble} networks are a prediction ensemble; training needs 1 "
            "(fine-tune one fold of an imported model)"
        )
    planned = plan_model_fields(plan)
    dims, n_stages = planned["spatial_dims"], planned["n_stages"]
    for key, plan_value in planned.items():
        value = getattr(model_config, key)
        if value is None:
            continue
        if key in ("kernel_sizes", "strides"):
            same = per_stage_axes(value, n_stages, dims) == plan_value
        elif key in STAGE_COUNT_FIELDS:  # one number for every stage equals the plan's list of it
            same = (tuple(value) if not isinstance(value, int) else (value,) * len(plan_value)) == plan_value
        else:
            same = value == plan_value
        if not same:
            raise ConfigError(
                f"model.{key}: the config says {to_dict(value)!r} but the plan says {to_dict(plan_value)!r}; the "
                f"plan decides it (leave model.{key} null) or make a new plan"
            )
    check_stage_count(model_config.features, n_stages, "model.features")
    check_stage_count(model_config.n_conv_per_stage, n_stages, "model.n_conv_per_stage")
    check_stage_count(model_config.n_conv_per_stage_decoder, n_stages - 1, "model.n_conv_per_stage_decoder")
    check_stage_count(model_config.n_blocks_per_stage, n_stages, "model.n_blocks_per_stage")
    features = model_config.features or default_features(n_stages, dims, model_config.base_features)
    unplanned = {k: v for k, v in UNPLANNED_NETWORK.items() if getattr(model_config, k) is None}
    resolved = dataclasses.replace(model_config, **unplanned, features=tuple(features))
    if resolved.n_blocks_per_stage is None:  # ResEnc's 1, 3, 4, 6, 6, ... (kept when the encoder is plain)
        resolved = dataclasses.replace(resolved, n_blocks_per_stage=resenc_blocks(n_stages))
    return dataclasses.replace(resolved, **planned)


def resolve_data(data_config, plan: dict, spatial_dims: int, strides):
    """The data config with the plan's patch and batch where it leaves them null, checked against the
    network (patch axes divisible by the total stride)."""
    patch = tuple(data_config.patch_size or plan["patch_size"])
    batch = int(data_config.batch_size or plan["batch_size"])
    if len(patch) != spatial_dims:
        raise ConfigError(f"data.patch_size {list(patch)} has {len(patch)} axes but the plan is {spatial_dims}D")
    from medseg_jax.data.plan import total_stride

    stride = [int(s) for s in total_stride(strides)]
    if any(size % s for size, s in zip(patch, stride)):
        raise ConfigError(
            f"data.patch_size {list(patch)} is not divisible by the network's total stride "
            f"{list(stride)} along every axis (the plan's patch is {list(plan['patch_size'])})"
        )
    return dataclasses.replace(data_config, patch_size=patch, batch_size=batch)


def resolve_train(train_config):
    """Validation settings that only one ``val_mode`` reads must not be set for the other."""
    c = train_config
    if c.warmup_steps >= c.steps:
        raise ConfigError(f"train.warmup_steps={c.warmup_steps} must be below train.steps={c.steps}")
    if c.loss.dice_weight == 0 and c.loss.ce_weight == 0:
        raise ConfigError("train.loss.dice_weight and train.loss.ce_weight are both 0: nothing to train")
    if c.val_mode == "sliding_window":
        if c.val_batches is not None:
            raise ConfigError(
                f"train.val_batches={c.val_batches} is ignored by train.val_mode=sliding_window "
                "(whole cases are validated): drop it, or set train.val_mode=patches"
            )
        return c
    return dataclasses.replace(c, val_batches=c.val_batches or DEFAULT_VAL_BATCHES)


def check_axes(axes, spatial_dims: int, key: str) -> None:
    for axis in axes or ():
        if not 0 <= axis < spatial_dims:
            raise ConfigError(f"{key}: axis {axis} is not a spatial axis of a {spatial_dims}D network")


def resolve_run(
    config: RunConfig, plan: dict, device_count: int | None = None, process_count: int | None = None
) -> ResolvedRun:
    """Check ``config`` against ``plan`` and the devices, and fill in what the plan decides.

    ``device_count`` / ``process_count`` default to JAX's (global devices, processes); pass them to
    resolve a run for another machine without starting a backend.
    """
    from medseg_jax.augment import check_augment_config, loader_crop_size
    from medseg_jax.parallel import mesh_shape

    if device_count is None or process_count is None:
        import jax

        device_count = jax.device_count() if device_count is None else device_count
        process_count = jax.process_count() if process_count is None else process_count
    if device_count < 1 or process_count < 1 or device_count % process_count:
        raise ConfigError(f"{device_count} device(s) cannot be shared by {process_count} process(es)")
    model = resolve_model(config.model, plan)
    data = resolve_data(config.data, plan, model.spatial_dims, model.strides)
    train = resolve_train(config.train)
    check_axes(config.inference.mirror_axes, model.spatial_dims, "inference.mirror_axes")
    check_augment_config(config.augment, model.spatial_dims)
    patch = tuple(data.patch_size)
    crop = loader_crop_size(config.augment, patch)
    device_input = crop if config.augment.mode == "device" else patch

    data_axis, spatial_axis = mesh_shape(config.mesh, device_count)
    if data.batch_size % data_axis:
        raise ConfigError(
            f"data.batch_size={data.batch_size} is not divisible by the mesh's data axis "
            f"({data_axis} of {device_count} devices; mesh.data={config.mesh.data})"
        )
    if data.batch_size % process_count:
        raise ConfigError(f"data.batch_size={data.batch_size} is not divisible by the {process_count} processes")
    if device_input[0] % spatial_axis:
        raise ConfigError(
            f"the first axis of what reaches the device ({device_input[0]}: data.patch_size, with the "
            f"augmentation crop margin when augment.mode=device) is not divisible by "
            f"mesh.spatial={spatial_axis}"
        )

    resolved = dataclasses.replace(config, model=model, data=data, train=train)
    run_plan = plan | {"patch_size": list(patch), "batch_size": int(data.batch_size)}
    return ResolvedRun(
        config=resolved,
        plan=run_plan,
        patch_size=patch,
        batch_size=int(data.batch_size),
        crop_size=tuple(crop),
        device_input_size=tuple(device_input),
        mesh_shape=(data_axis, spatial_axis),
        per_process_batch=data.batch_size // process_count,
    )


def store_fold(store, fold: int, n_folds: int = 5) -> dict[str, list[str]]:
    """Fold ``fold`` of ``STORE/splits.json`` (made from the store's cases with nnU-Net's k-fold rule,
    the same folds as the raw dataset's, if absent); ``fold = -1`` trains on every case ("all").

    nnU-Net's ``splits_final.json`` copied into the store is used when ``splits.json`` is absent, and
    both must agree when both are there (:func:`medseg_jax.data.splits.read_existing_splits`); either
    file must name only the store's cases."""
    case_ids = store.case_ids()
    if not case_ids:
        raise DataError(f"{store.path}: the store holds no cases")
    if fold == -1:
        return {"train": case_ids, "val": []}
    splits, name = store_splits(store, n_folds)
    if not 0 <= fold < len(splits):
        raise ConfigError(
            f"fold {fold} does not exist: {store.location(name)} has folds 0..{len(splits) - 1} (or -1 for all cases)"
        )
    return splits[fold]


def store_splits(store, n_folds: int = 5) -> tuple[list[dict[str, list[str]]], str]:
    """``(the store's folds, the name of the file holding them)``: ``splits.json`` or nnU-Net's
    ``splits_final.json`` (see :func:`store_fold`), made and written as ``splits.json`` if neither exists."""
    from medseg_jax.data.splits import SPLITS_JSON, make_splits, read_existing_splits

    case_ids = store.case_ids()
    if not case_ids:
        raise DataError(f"{store.path}: the store holds no cases")
    # A file, or a key in a bucket: read and written through the store.
    existing = read_existing_splits(store.read_json, store.location, set(case_ids))
    if existing is not None:
        return existing
    splits = make_splits(case_ids, n_folds=n_folds)
    store.write_json(SPLITS_JSON, splits)
    return splits, SPLITS_JSON


def environment() -> dict:
    """Versions and devices, written into the run folder for reproducibility."""
    import flax
    import jax
    import optax
    import orbax.checkpoint

    import medseg_jax

    return {
        "medseg_jax": medseg_jax.__version__,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", None) or jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "orbax_checkpoint": getattr(orbax.checkpoint, "__version__", "unknown"),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "process_count": jax.process_count(),
    }


def check_run_folder(run_dir: Path, store_dir: Path) -> None:
    """A run folder must not be, or lie inside, the store (its checkpoints would become a "case")."""
    run, store = Path(run_dir).resolve(), Path(store_dir).resolve()
    if run == store or store in run.parents:
        raise ConfigError(f"--out {run_dir} is inside the store --data {store_dir}: choose a run folder outside it")
    if run.exists() and not run.is_dir():
        raise ConfigError(f"--out {run_dir} exists and is not a folder")


def has_checkpoints(run_dir: Path) -> bool:
    folder = Path(run_dir) / "checkpoints"
    return folder.is_dir() and any(folder.iterdir())


def check_existing_run(run_dir: Path, config: RunConfig) -> None:
    """Before anything is written: a run folder with checkpoints continues only with the same model
    and optimiser (its ``config.yaml`` is what prediction reads, so it must not be replaced by another
    network's)."""
    path = Path(run_dir) / CONFIG_NAME
    if has_checkpoints(run_dir) and path.is_file():
        check_compatible({"config": to_dict(load_config(path))}, config, run_dir)


def write_run_files(run_dir: Path, run: ResolvedRun, fold: int) -> None:
    """config.yaml, plan.json (the run's plan) and environment.json (seed, versions) in the run folder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(run.config, run_dir / CONFIG_NAME)
    write_json_atomic(run_dir / PLAN_NAME, run.plan)
    write_json_atomic(run_dir / "environment.json", environment() | {"seed": run.config.train.seed, "fold": fold})


def check_compatible(saved_meta: dict, config, run_dir: Path) -> None:
    """Refuse to resume a run whose checkpoint was made with another model or optimiser."""
    saved = saved_meta.get("config", {})
    now = to_dict(config)
    if saved.get("model") != now["model"]:
        changed = sorted(k for k in now["model"] if saved.get("model", {}).get(k) != now["model"][k])
        raise ConfigError(
            f"{run_dir}: the checkpoint was trained with a different model config "
            f"({', '.join('model.' + k for k in changed)}); use a new --out folder to start a new run"
        )
    # train.steps may change (a finished run can be trained longer): the loop checks it against the
    # checkpoint's step, and the learning-rate schedule follows the new total from there.
    for key in ("optimizer",):
        if saved.get("train", {}).get(key) != now["train"][key]:
            raise ConfigError(
                f"{run_dir}: the checkpoint has train.{key}={saved.get('train', {}).get(key)!r}, "
                f"this run asks for {now['train'][key]!r}; use a new --out folder"
            )


def sample_input_shape(run: ResolvedRun) -> tuple[int, ...]:
    """The shape parameters are initialised from: one patch with the model's channels."""
    return (1, *run.patch_size, run.model.in_channels)
