"""Export a trained network so that it predicts where medseg-jax is not installed.

``medseg-jax export --model RUN --out DIR`` (:func:`export_run`) writes DIR with:

- ``forward.jaxexport``: the network's forward function ``(parameters, windows) -> logits`` serialised
  with ``jax.export`` (StableHLO), for every platform asked for, with a symbolic batch size: windows
  ``(b, *patch, C)`` float32 channels-last, logits ``(b, *patch, K)`` float32;
- ``parameters.npz``: its first argument, the flattened parameter arrays (``00000``, ``00001``, ...);
- ``importance_map.npy``: the Gaussian window weights of the sliding window (``patch`` float32);
- ``export.json``: the format and its version, the platforms, the function's layout, and everything
  pre- and postprocessing need (the run's plan: spacing, orientation, normalisation, resampling, labels;
  the inference settings: patch, step, window batch, mirrored axes);
- ``predict_exported.py``: a copy of :mod:`medseg_jax.inference.predict_exported`, a standalone predictor
  (jax, numpy, nibabel, scipy) that reproduces ``medseg-jax predict``'s labels from NIfTI files.

Parameters are an argument of the exported function rather than constants folded into it: the
StableHLO stays small whatever the network's size (serialised constants of a large network would run
into protobuf's 2 GB limit and make export slow), and an ``.npz`` opens with numpy alone for anyone who
wants to inspect or convert the weights.

The network is exported with XLA's convolution and the matmul upsampling (:func:`portable_model`):
``"auto"`` may choose the oneDNN convolution, an XLA custom call that exists only where medseg-jax built
it, and Pallas kernels are lowered for one platform; plain XLA operations run on every platform JAX does.
The folder is written under a temporary name and renamed at the end, so a failed export leaves nothing.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medseg_jax.errors import ConfigError, DataError
from medseg_jax.inference import predict_exported as standalone

DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
EXAMPLE_NAME = "predict_exported.py"
PORTABLE_IMPLEMENTATIONS = {"conv_implementation": "xla", "upsample_implementation": "matmul"}


def portable_model(model):
    """``model`` with every U-Net computing with XLA's own operations (no custom call, no Pallas kernel);
    same parameters and, up to float rounding, the same logits. Modules without implementation choices
    are returned as they are."""
    from medseg_jax.models.ensemble import Ensemble

    if isinstance(model, Ensemble):
        return model.clone(network=portable_model(model.network))
    if all(hasattr(model, name) for name in PORTABLE_IMPLEMENTATIONS):
        return model.clone(**PORTABLE_IMPLEMENTATIONS)
    return model


def check_platforms(platforms: Sequence[str]) -> tuple[str, ...]:
    """The platforms as ``jax.export`` names them, distinct and in the given order; ConfigError otherwise."""
    platforms = tuple(dict.fromkeys(str(p).lower() for p in platforms))
    unknown = [p for p in platforms if p not in standalone.PLATFORMS]
    if not platforms or unknown:
        raise ConfigError(
            f"--platforms {' '.join(unknown) or '(none)'}: choose one or more of {', '.join(standalone.PLATFORMS)}"
        )
    return platforms


def _stored(leaf) -> np.ndarray:
    """A parameter as numpy can save it: bfloat16 (no numpy type) is widened to float32, losslessly."""
    array = np.asarray(leaf)
    return array if array.dtype.kind in "fiub" else array.astype(np.float32)


def export_forward(model, params, patch_size: Sequence[int], in_channels: int, platforms: Sequence[str]):
    """``(exported, stored parameter arrays, their tree paths)`` of ``model.apply`` on windows with a
    symbolic batch size. The exported function casts each stored array back to the parameter's dtype."""
    import jax
    import jax.numpy as jnp

    with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    dtypes = [jnp.asarray(leaf).dtype for _, leaf in with_paths]
    stored = [_stored(leaf) for _, leaf in with_paths]

    def forward(parameters, windows):
        tree = jax.tree_util.tree_unflatten(treedef, [p.astype(d) for p, d in zip(parameters, dtypes)])
        logits = model.apply(tree, windows)
        logits = logits[0] if isinstance(logits, (list, tuple)) else logits  # deep supervision: full resolution
        return logits.astype(jnp.float32)

    (batch,) = jax.export.symbolic_shape("b")
    windows = jax.ShapeDtypeStruct((batch, *(int(p) for p in patch_size), int(in_channels)), jnp.float32)
    arguments = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in stored]
    try:
        exported = jax.export.export(jax.jit(forward), platforms=tuple(platforms))(arguments, windows)
    except Exception as exc:  # e.g. an operation with no lowering for one of the platforms
        raise ConfigError(f"the network cannot be exported for {', '.join(platforms)}: {exc}") from exc
    return exported, stored, [jax.tree_util.keystr(path) for path, _ in with_paths]


def export_metadata(plan: dict, inference_config, exported, parameter_paths, source: dict) -> dict:
    """The contents of ``export.json``."""
    import jax

    from medseg_jax import __version__

    dim = int(plan["dim"])
    patch = [int(p) for p in plan["patch_size"]]
    channels, classes = len(plan["channel_names"]), int(plan["num_classes"])
    mirror = inference_config.mirror_axes
    spatial = [f"spatial {a}" for a in range(dim)]
    return {
        "format": standalone.FORMAT,
        "format_version": standalone.FORMAT_VERSION,
        "created_by": {"medseg_jax": __version__, "jax": jax.__version__},
        "platforms": list(exported.platforms),
        "files": {
            "function": standalone.FUNCTION_NAME,
            "parameters": standalone.PARAMETERS_NAME,
            "importance_map": standalone.IMPORTANCE_MAP_NAME,
            "example": EXAMPLE_NAME,
        },
        "function": {
            "call": "forward(parameters, windows) -> logits, parameters = the arrays of parameters.npz in name order",
            "parameters": len(parameter_paths),
            "parameter_paths": list(parameter_paths),
            "input": {"shape": ["b", *patch, channels], "dtype": "float32", "axes": ["batch", *spatial, "channel"]},
            "output": {"shape": ["b", *patch, classes], "dtype": "float32", "axes": ["batch", *spatial, "class"]},
            "output_values": "logits; softmax over the class axis gives the class probabilities",
            "spatial_axes": "the preprocessed grid's: RAS voxel order, or plan.orientation when the plan has one"
            + ("; a 2D network sees one slice along the last axis" if dim == 2 else ""),
            "implementations": dict(PORTABLE_IMPLEMENTATIONS),
        },
        "inference": {
            "patch_size": patch,
            "step_size": float(inference_config.step_size),
            "sigma_scale": float(inference_config.sigma_scale),
            "blend": "gaussian",
            "batch_size": int(inference_config.batch_size),
            "mirror_axes": list(range(dim)) if mirror is None else [int(a) for a in mirror],
        },
        "labels": dict(plan["labels"]),
        "plan": plan,
        "source": source,
    }


def export_predictor(
    model,
    params,
    plan: dict,
    out,
    inference_config=None,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
    source: dict | None = None,
) -> dict:
    """Write the export folder ``out`` (module docstring) for ``model`` / ``params`` predicting with
    ``plan`` and ``inference_config`` (an :class:`~medseg_jax.config.InferenceConfig`); returns
    ``export.json``'s contents. ``out`` must not exist or be empty."""
    from medseg_jax.atomic import check_new_folder, json_text, staged_folder
    from medseg_jax.cascade import is_cascade
    from medseg_jax.config import InferenceConfig
    from medseg_jax.data.plan import check_plan
    from medseg_jax.inference.sliding_window import gaussian_importance_map

    out = check_new_folder(out, "export folder")
    platforms = check_platforms(platforms)
    check_plan(plan)
    if is_cascade(plan):  # the standalone predictor has no first stage to run
        raise ConfigError(
            "a 3d_cascade_fullres run cannot be exported: its input holds the 3d_lowres prediction, which the "
            "standalone predictor cannot make; export the 3d_lowres or 3d_fullres runs"
        )
    inference_config = inference_config or InferenceConfig()
    dim = int(plan["dim"])
    if inference_config.mirror_axes is not None and any(not 0 <= int(a) < dim for a in inference_config.mirror_axes):
        raise ConfigError(
            f"inference.mirror_axes {tuple(inference_config.mirror_axes)}: a {dim}D network has axes 0..{dim - 1}"
        )
    exported, stored, paths = export_forward(
        portable_model(model), params, plan["patch_size"], len(plan["channel_names"]), platforms
    )
    metadata = export_metadata(plan, inference_config, exported, paths, source or {})
    weight = gaussian_importance_map(plan["patch_size"], inference_config.sigma_scale)

    with staged_folder(out, "export folder") as staging:
        (staging / standalone.FUNCTION_NAME).write_bytes(bytes(exported.serialize()))
        with open(staging / standalone.PARAMETERS_NAME, "wb") as handle:
            np.savez(handle, **{f"{i:05d}": array for i, array in enumerate(stored)})
        np.save(staging / standalone.IMPORTANCE_MAP_NAME, np.asarray(weight, dtype=np.float32))
        shutil.copyfile(standalone.__file__, staging / EXAMPLE_NAME)
        (staging / standalone.METADATA_NAME).write_text(json_text(metadata, str(out / standalone.METADATA_NAME)))
    return metadata


def export_run(run_dir, out, platforms: Sequence[str] = DEFAULT_PLATFORMS, checkpoint_choice: str = "latest") -> dict:
    """Export a training run folder (``checkpoint_choice``: ``latest`` or ``best``) with its plan and
    inference settings into ``out``; returns ``export.json``'s contents."""
    from medseg_jax.atomic import check_new_folder
    from medseg_jax.inference.run_folder import load_run

    out = check_new_folder(out, "export folder")  # before the checkpoint is read: a wrong --out fails at once
    platforms = check_platforms(platforms)
    model, params, plan, config = load_run(run_dir, checkpoint_choice)
    source = {"run": Path(run_dir).resolve().name, "checkpoint": checkpoint_choice}
    return export_predictor(model, params, plan, out, config.inference, platforms, source)


def load_export(folder, platform: str | None = None) -> standalone.Artefact:
    """Load an export folder as the standalone predictor does, for ``platform`` (default: the one JAX runs
    on); a :class:`DataError` for a folder of another format version or not exported for the platform."""
    try:
        return standalone.load_artefact(folder, platform)
    except standalone.ExportError as exc:
        raise DataError(str(exc)) from exc
