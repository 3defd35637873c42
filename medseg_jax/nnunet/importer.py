"""``medseg-jax import-nnunet``: an nnU-Net v2 trained-model folder -> a medseg-jax run folder.

The input is what ``nnUNetv2_train`` leaves in ``nnUNet_results``: ``Dataset.../{trainer}__{plans}__{configuration}/``
with ``plans.json``, ``dataset.json`` and ``fold_{X}/checkpoint_final.pth`` (``checkpoint_best.pth``). The
output is the folder ``medseg-jax predict --model`` (and ``train --init-from``) reads:

- ``config.yaml``: the network (:mod:`medseg_jax.nnunet.architecture`), ``model.ensemble`` = the number
  of folds, ``inference.mirror_axes`` = the checkpoint's ``inference_allowed_mirroring_axes`` (none for
  trainers such as ``nnUNetTrainerNoMirroring``);
- ``plan.json``: nnU-Net's preprocessing in medseg-jax's terms (:mod:`medseg_jax.nnunet.preprocessing`);
- ``checkpoints/0``: an Orbax checkpoint whose parameters are the converted weights
  (:mod:`medseg_jax.nnunet.convert`), one ``member_{i}`` per fold when there are several;
- ``nnunet_import.json``: where it all came from.

Everything is read, checked and converted before anything is written, and the folder is written under a
temporary name and renamed at the end: a failing import leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from medseg_jax.atomic import read_json
from medseg_jax.errors import DataError
from medseg_jax.nnunet.architecture import Architecture, architecture, configuration
from medseg_jax.nnunet.convert import convert_state_dict
from medseg_jax.nnunet.preprocessing import channel_names, labels, make_plan
from medseg_jax.nnunet.pth import load_pth

CHECKPOINT_FILES = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth"}
FOLD_DIR = re.compile(r"fold_(\d+|all)")
SOURCE_NAME = "nnunet_import.json"


@dataclasses.dataclass(frozen=True)
class Fold:
    """One fold's converted parameters and what its checkpoint says about inference."""

    name: str
    path: Path
    params: dict
    mirror_axes: tuple[int, ...] | None
    trainer: str | None


def _model_files(folder: Path) -> tuple[dict, dict]:
    missing = [name for name in ("plans.json", "dataset.json") if not (folder / name).is_file()]
    if not folder.is_dir() or missing:
        raise DataError(
            f"{folder}: not an nnU-Net v2 trained-model folder (Dataset.../Trainer__Plans__Configuration/ "
            f"holding plans.json, dataset.json and fold_X/); missing {', '.join(missing) or 'the folder'}"
        )
    return read_json(folder / "plans.json", expect=dict), read_json(folder / "dataset.json", expect=dict)


def fold_paths(folder: Path, folds, checkpoint: str) -> list[tuple[str, Path]]:
    """``(fold name, checkpoint path)`` of the requested folds: ``folds`` ``"all"`` (every ``fold_X`` with the
    checkpoint) or a list of fold numbers / ``"all"`` entries naming ``fold_X`` folders."""
    if checkpoint not in CHECKPOINT_FILES:
        raise DataError(f"--checkpoint must be one of {', '.join(CHECKPOINT_FILES)}, got {checkpoint!r}")
    filename = CHECKPOINT_FILES[checkpoint]
    if folds == "all" or folds == ["all"]:
        found = [p for p in folder.iterdir() if p.is_dir() and FOLD_DIR.fullmatch(p.name) and (p / filename).is_file()]
        found.sort(key=lambda p: (p.name == "fold_all", int(p.name[5:]) if p.name[5:].isdigit() else 0))
        if not found:
            raise DataError(f"{folder}: no fold_X/{filename} found (is training finished? try --checkpoint best)")
        return [(p.name[5:], p / filename) for p in found]
    out = []
    for fold in folds:
        path = folder / f"fold_{fold}" / filename
        if not path.is_file():
            raise DataError(f"{path}: fold {fold} has no {filename} (missing fold, or training not finished)")
        out.append((str(fold), path))
    if len({name for name, _ in out}) != len(out):
        raise DataError(f"--folds {' '.join(str(f) for f in folds)}: a fold is given twice")
    return out


def _configuration_name(folder: Path, checkpoint: dict) -> str:
    """nnU-Net names the folder ``{trainer}__{plans}__{configuration}``; older checkpoints lack nothing
    either way, as ``init_args.configuration`` names it too."""
    parts = folder.name.split("__")
    from_folder = parts[2] if len(parts) == 3 else None
    init_args = checkpoint.get("init_args")
    from_checkpoint = init_args.get("configuration") if isinstance(init_args, dict) else None
    if from_folder and from_checkpoint and from_folder != from_checkpoint:
        raise DataError(
            f"{folder}: the folder name says configuration {from_folder!r}, its checkpoint {from_checkpoint!r}"
        )
    name = from_folder or from_checkpoint
    if not isinstance(name, str):
        raise DataError(
            f"{folder}: cannot tell the configuration (the folder is not named Trainer__Plans__Configuration "
            "and the checkpoint does not name it)"
        )
    return name


def _load_checkpoint(path: Path) -> dict:
    checkpoint = load_pth(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("network_weights"), dict):
        raise DataError(f"{path}: not an nnU-Net checkpoint (no 'network_weights' state dict)")
    return checkpoint


def _convert_fold(name: str, path: Path, checkpoint: dict, arch: Architecture, in_channels: int, num_classes: int):
    """A :class:`Fold` from one loaded checkpoint."""
    params = convert_state_dict(checkpoint["network_weights"], arch, in_channels, num_classes, str(path))
    axes = checkpoint.get("inference_allowed_mirroring_axes")
    mirror = None if axes is None else tuple(int(a) for a in axes)
    trainer = checkpoint.get("trainer_name")
    return Fold(name, path, params, mirror, trainer if isinstance(trainer, str) else None)


def build_run(folder, folds="all", checkpoint: str = "final"):
    """Read and convert everything: ``(config, plan, params, source)`` for :func:`write_run`."""
    from medseg_jax.config import InferenceConfig, ModelConfig, RunConfig, from_dict

    folder = Path(folder)
    plans, dataset_json = _model_files(folder)
    paths = fold_paths(folder, folds, checkpoint)
    names = channel_names(dataset_json, str(folder / "dataset.json"))
    classes = labels(dataset_json, str(folder / "dataset.json"))
    fold_list: list[Fold] = []
    for name, path in paths:  # one checkpoint in memory at a time (with optimiser state they are large)
        loaded = _load_checkpoint(path)
        if not fold_list:  # the first names the configuration; the network follows from the plans
            config_name = _configuration_name(folder, loaded)
            resolved = configuration(plans, config_name, str(folder / "plans.json"))
            arch = architecture(resolved, f"{folder / 'plans.json'}: configurations.{config_name}")
        fold_list.append(_convert_fold(name, path, loaded, arch, len(names), len(classes)))
        del loaded
    mirror = fold_list[0].mirror_axes  # nnU-Net's predictor takes the first fold's, too
    plan = make_plan(plans, dataset_json, resolved, config_name, arch, mirror)
    model = from_dict(
        ModelConfig,
        arch.model_fields()
        | {
            "in_channels": len(names),
            "num_classes": len(classes),
            "deep_supervision": True,
            "ensemble": len(fold_list),
        },
        prefix="model",
    )
    inference = InferenceConfig(mirror_axes=() if mirror is None else mirror)
    config = RunConfig(model=model, inference=inference)
    if len(fold_list) == 1:
        params = fold_list[0].params
    else:
        params = {"params": {f"member_{i}": fold.params["params"] for i, fold in enumerate(fold_list)}}
    source = {
        "format": "nnU-Net v2",
        "model_folder": folder.name,
        "configuration": config_name,
        "plans_name": plans.get("plans_name"),
        "trainer": fold_list[0].trainer,
        "folds": [fold.name for fold in fold_list],
        "checkpoint": CHECKPOINT_FILES[checkpoint],
        "inference_allowed_mirroring_axes": None if mirror is None else list(mirror),
        "conv_bias": arch.conv_bias,
        "norm_affine": arch.norm_affine,
    }
    return config, plan, params, source


def check_params(model, params, patch_size, in_channels: int) -> None:
    """The converted tree must be exactly the one ``model.init`` makes (names, shapes): a guard against the
    conversion and the U-Net drifting apart."""
    import jax
    import jax.numpy as jnp

    sample = jax.ShapeDtypeStruct((1, *patch_size, in_channels), jnp.float32)
    expected = jax.eval_shape(model.init, jax.random.key(0), sample)
    want = {jax.tree_util.keystr(p): tuple(leaf.shape) for p, leaf in jax.tree_util.tree_leaves_with_path(expected)}
    have = {jax.tree_util.keystr(p): tuple(np.shape(leaf)) for p, leaf in jax.tree_util.tree_leaves_with_path(params)}
    differing = sorted(set(want) ^ set(have)) or [name for name in want if want[name] != have[name]]
    if differing:
        name = differing[0]
        raise DataError(
            f"converted weight {name}: medseg-jax's U-Net needs {want.get(name, 'nothing')}, the conversion gives "
            f"{have.get(name, 'nothing')} (a bug: please report)"
        )


def write_run(out, config, plan: dict, params, source: dict) -> Path:
    """Write the run folder (see the module docstring) under a temporary name, then rename it to ``out``."""
    import jax
    import jax.numpy as jnp

    from medseg_jax import checkpoint
    from medseg_jax.atomic import check_new_folder, staged_folder, write_json_atomic
    from medseg_jax.config import save_config, to_dict
    from medseg_jax.data.plan import write_plan
    from medseg_jax.inference.run_folder import CHECKPOINTS_NAME, CONFIG_NAME, PLAN_NAME
    from medseg_jax.models.factory import build_unet
    from medseg_jax.train.optim import make_optimizer
    from medseg_jax.train.state import TrainState

    out = check_new_folder(out, "run folder")
    model = build_unet(config.model, deep_supervision=False)
    check_params(model, params, plan["patch_size"], config.model.in_channels)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=make_optimizer(config.train).init(params),
        rng=jax.random.key_data(jax.random.key(config.train.seed)),
        ema_params=None,
    )
    with staged_folder(out, "run folder") as staging:
        save_config(config, staging / CONFIG_NAME)
        write_plan(plan, staging / PLAN_NAME)
        write_json_atomic(staging / SOURCE_NAME, source)
        manager = checkpoint.make_manager(staging / CHECKPOINTS_NAME, keep=1, async_save=False)
        try:
            meta = {"config": to_dict(config), "plan": plan, "fold": None, "pseudo_dice": None, "source": source}
            checkpoint.save(manager, 0, state, {}, meta)
            manager.wait_until_finished()
        finally:
            manager.close()
    return out


def import_nnunet(folder, out, folds="all", checkpoint: str = "final") -> dict:
    """Import an nnU-Net v2 model folder into the run folder ``out``; returns a summary (the source record
    plus ``out`` and the parameter count)."""
    from medseg_jax.models.unet import count_parameters

    config, plan, params, source = build_run(folder, folds, checkpoint)
    write_run(out, config, plan, params, source)
    return source | {"out": str(out), "parameters": count_parameters(params), "dim": plan["dim"]}
