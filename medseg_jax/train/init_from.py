"""``medseg-jax train --init-from RUN_DIR``: start training from another run's weights (fine-tuning).

The source is any run folder ``predict`` reads: one trained here, or one made by ``import-nnunet``. The
network settings (``model.*`` that shape the parameters: features, encoder, blocks, convs per stage)
come from the source's ``config.yaml``; the topology the plan decides (stages, kernels, strides,
channels, classes) comes from the training data's plan as always, and must fit the source's weights
(preprocess the new data with the source's ``plan.json`` to keep nnU-Net's preprocessing). Every tensor
is copied except the segmentation heads when the number of classes differs: those keep their fresh
initialisation, and the log says so. A resumed run continues from its own checkpoint instead.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from medseg_jax.errors import ConfigError

# ModelConfig fields that shape the parameters and are not decided by the plan: taken from the source.
NETWORK_FIELDS = ("features", "base_features", "n_conv_per_stage", "n_conv_per_stage_decoder", "encoder")
PLAN_FIELDS = ("spatial_dims", "in_channels", "num_classes", "n_stages", "kernel_sizes", "strides")
HEAD_PREFIX = "head_"


def adopt_network(config, source_dir):
    """``config`` with the source run's network settings (``model.n_blocks_per_stage`` too), the plan's
    fields left for the training plan to fill in. A fold ensemble is refused: fine-tune one fold."""
    from medseg_jax.config import load_config
    from medseg_jax.inference.run_folder import CONFIG_NAME

    path = Path(source_dir) / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"--init-from {source_dir}: not a run folder (no {CONFIG_NAME})")
    source = load_config(path).model
    if source.ensemble != 1:
        raise ConfigError(
            f"--init-from {source_dir}: an ensemble of {source.ensemble} networks; fine-tune one fold "
            "(import it alone: import-nnunet --folds N)"
        )
    changes = {name: getattr(source, name) for name in (*NETWORK_FIELDS, "n_blocks_per_stage")}
    changes |= {name: None for name in PLAN_FIELDS}
    return dataclasses.replace(config, model=dataclasses.replace(config.model, **changes))


def merged_params(fresh, source, source_dir) -> tuple[dict, list[str]]:
    """The source's tensors in the tree of ``fresh`` (this run's initialisation); ``(params, kept)`` where
    ``kept`` lists the head tensors left fresh because the class count differs. Any other missing or
    differently shaped tensor is a :class:`ConfigError` naming it."""
    import jax

    source_leaves = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(source)}
    kept: list[str] = []

    def take(path, leaf):
        name = jax.tree_util.keystr(path)
        other = source_leaves.get(name)
        if other is not None and tuple(other.shape) == tuple(leaf.shape):
            return other.astype(leaf.dtype)
        if HEAD_PREFIX in name and other is not None:
            kept.append(name)
            return leaf
        found = "missing" if other is None else f"of shape {tuple(other.shape)}"
        raise ConfigError(
            f"--init-from {source_dir}: parameter {name} {found} in the source, this run needs {tuple(leaf.shape)}; "
            "train with the source's network (and its plan.json for preprocessing)"
        )

    params = jax.tree_util.tree_map_with_path(take, fresh)
    unused = sorted(
        set(source_leaves) - {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(fresh)}
    )
    if unused:
        raise ConfigError(f"--init-from {source_dir}: the source has parameters this run lacks, first {unused[0]}")
    return params, kept


def initialise_from(state, source_dir, shardings, log):
    """``state`` (freshly initialised, placed by ``shardings``) with the source run's parameters."""
    import jax

    from medseg_jax.inference.run_folder import load_run

    _, source, _, _ = load_run(source_dir)
    params, kept = merged_params(state.params, source, source_dir)
    params = jax.device_put(params, shardings.params)
    ema = None if state.ema_params is None else jax.device_put(params, shardings.ema_params)
    count = len(jax.tree_util.tree_leaves(params))
    heads = f"; {len(kept)} head tensor(s) re-initialised (another number of classes)" if kept else ""
    log(f"initialised from {source_dir}: {count - len(kept)} of {count} tensors copied{heads}")
    return state.replace(params=params, ema_params=ema)
