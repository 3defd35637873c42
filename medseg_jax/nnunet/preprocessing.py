"""nnU-Net v2's preprocessing of one configuration as a medseg-jax plan (the ``plan.json`` of a run folder).

What nnU-Net does to an image before its network sees it (``DefaultPreprocessor.run_case``), and where
each step lands in the plan this module writes:

1. Reading: ``SimpleITKIO`` and ``NibabelIO`` give the file's voxel array with its axes reversed
   (ITK's ``z, y, x``: file voxel axes ``k, j, i``), no flips; ``NibabelIOWithReorient`` first reorients
   to RAS (nibabel's closest canonical) and then reverses. -> ``plan["orientation"]["frame"]``
   (``"file"``: the file's voxel order, or ``"ras"``).
2. ``transpose_forward`` permutes those axes; the network's axis ``a`` is the reversed-frame axis
   ``transpose_forward[a]``, i.e. frame axis ``2 - transpose_forward[a]``. medseg-jax keeps that order
   for the preprocessed array, except that a 2D network's slice axis (nnU-Net's axis 0) goes last,
   where medseg-jax's 2D prediction slices: ``plan["orientation"]["axes"]`` lists, per preprocessed
   axis, the frame axis it is (:func:`orientation_axes`). Axes are only permuted, never flipped, so the
   network sees exactly nnU-Net's array and its weights are used as they are.
3. Crop to the non-zero box of all channels (the mask with its holes filled, for ``use_mask_for_norm``).
4. Normalisation per channel (``CTNormalization`` with the plans' foreground percentiles, mean and std;
   ``ZScoreNormalization`` with ``use_mask_for_norm``; ``NoNormalization``; ``RescaleTo01Normalization``;
   ``RGBTo01Normalization`` as the window 0..255), *before* resampling as nnU-Net does
   (``plan["preprocessing"]["normalize_before_resampling"]``).
5. Resampling to the configuration's spacing with ``resample_data_or_seg_to_shape``: spline order 3,
   out-of-plane axis separately with order 0 for anisotropic spacing, each resize clipped to its
   input's range as scikit-image's ``resize`` does (``plan["resampling"]["clip_to_input_range"]``).
   A 2D configuration keeps each case's own slice spacing. Predictions go back with order 1.

Anything the medseg-jax pipeline would not reproduce -- another reader, preprocessor or resampling
function, ``force_separate_z``, region-based labels, a cascade stage -- is refused with a
:class:`~medseg_jax.errors.DataError` naming the field.
"""

from __future__ import annotations

from typing import Any

from medseg_jax.data.dataset import parse_labels
from medseg_jax.data.plan import PLAN_FORMAT_VERSION
from medseg_jax.data.resample import ANISOTROPY_THRESHOLD
from medseg_jax.errors import DataError
from medseg_jax.nnunet.architecture import Architecture

READER_FRAMES = {"SimpleITKIO": "file", "NibabelIO": "file", "NibabelIOWithReorient": "ras"}
RESAMPLING_FUNCTION = "resample_data_or_seg_to_shape"


def orientation_axes(transpose_forward, dim: int) -> list[int]:
    """Per preprocessed axis, the frame axis (file voxel or RAS axis) it holds.

    nnU-Net's array is the frame's axes reversed, then ``transpose_forward``: nnU-Net axis ``a`` is frame
    axis ``2 - transpose_forward[a]``. A 3D network keeps nnU-Net's order; a 2D network's slices run
    along nnU-Net's axis 0, which goes last (medseg-jax slices along the last axis).
    """
    nnunet = [2 - int(t) for t in transpose_forward]
    return nnunet if dim == 3 else [nnunet[1], nnunet[2], nnunet[0]]


def _to_plan_axes(values: list, dim: int) -> list:
    """A per-axis list in nnU-Net's axis order (3 entries in 3D; 2 in-plane entries for a 2D
    configuration) in the preprocessed array's order (2D: in-plane first, ``None`` for the slice axis)."""
    return list(values) if dim == 3 else [*values, None]


def channel_names(dataset_json: dict, source: str) -> list[str]:
    """The channel names in channel order (``channel_names``, or ``modality`` of older files)."""
    value = dataset_json.get("channel_names", dataset_json.get("modality"))
    if not isinstance(value, dict) or sorted(value) != sorted(str(i) for i in range(len(value))) or not value:
        raise DataError(f'{source}: \'channel_names\' must map "0".."C-1" to names, got {value!r}')
    return [str(value[str(i)]) for i in range(len(value))]


def labels(dataset_json: dict, source: str) -> dict[str, int]:
    """``{name: value}`` of the classes the network predicts. An ``ignore`` label (only in the training
    loss) is dropped; region-based labels are refused. Values must be 0..K-1, as nnU-Net requires."""
    meta = dict(dataset_json)
    raw = meta.get("labels")
    if isinstance(raw, dict) and "ignore" in raw:
        meta["labels"] = {k: v for k, v in raw.items() if k != "ignore"}
    found, problems = parse_labels(meta, "nnunetv2")
    if problems:
        raise DataError(f"{source}: {'; '.join(problems)}")
    values = sorted(found.values())
    if values != list(range(len(values))):
        raise DataError(f"{source}: 'labels' values must be 0..{len(values) - 1} without gaps, got {values}")
    return found


def _normalization(config: dict, plans: dict, names: list[str], where: str) -> list[dict]:
    schemes = config.get("normalization_schemes")
    masks = config.get("use_mask_for_norm")
    if not isinstance(schemes, list) or len(schemes) != len(names):
        raise DataError(f"{where}.normalization_schemes: expected one per channel ({len(names)}), got {schemes!r}")
    if not isinstance(masks, list) or len(masks) != len(names):
        raise DataError(f"{where}.use_mask_for_norm: expected one per channel ({len(names)}), got {masks!r}")
    intensities = plans.get("foreground_intensity_properties_per_channel", {})
    out = []
    for c, (scheme, use_mask, name) in enumerate(zip(schemes, masks, names)):
        entry: dict[str, Any] = {"channel": name}
        if scheme == "CTNormalization":
            stats = intensities.get(str(c))
            keys = ("mean", "std", "percentile_00_5", "percentile_99_5")
            if not isinstance(stats, dict) or any(k not in stats for k in keys):
                raise DataError(
                    f"plans.json: foreground_intensity_properties_per_channel.{c} lacks {', '.join(keys)}, "
                    f"which {where}.normalization_schemes[{c}] = CTNormalization needs"
                )
            entry.update(scheme="ct", **{k: float(stats[k]) for k in keys})
        elif scheme == "ZScoreNormalization":
            entry.update(scheme="zscore", use_mask=bool(use_mask))
        elif scheme == "NoNormalization":
            entry.update(scheme="none")
        elif scheme == "RescaleTo01Normalization":
            entry.update(scheme="rescale_01")
        elif scheme == "RGBTo01Normalization":  # x / 255 on values nnU-Net asserts lie in 0..255
            entry.update(scheme="hu_window", lower=0.0, upper=255.0)
        else:
            raise DataError(f"{where}.normalization_schemes[{c}]: {scheme!r} is not supported")
        out.append(entry)
    return out


def _resampling(config: dict, where: str) -> dict:
    """The plan's ``resampling`` from nnU-Net's data and probability resampling settings."""
    orders = {}
    for kind, default_order in (("data", 3), ("probabilities", 1)):
        function = config.get(f"resampling_fn_{kind}")
        kwargs = config.get(f"resampling_fn_{kind}_kwargs") or {}
        if function != RESAMPLING_FUNCTION:
            raise DataError(f"{where}.resampling_fn_{kind}: {function!r} is not supported (only {RESAMPLING_FUNCTION})")
        if kwargs.get("force_separate_z") is not None:
            raise DataError(
                f"{where}.resampling_fn_{kind}_kwargs.force_separate_z: {kwargs['force_separate_z']!r} is not "
                "supported (only null: decided by the spacing)"
            )
        if int(kwargs.get("order_z", 0)) != 0:
            raise DataError(f"{where}.resampling_fn_{kind}_kwargs.order_z: only 0 is supported")
        orders[kind] = int(kwargs.get("order", default_order))
    if orders["probabilities"] != 1:
        raise DataError(f"{where}.resampling_fn_probabilities_kwargs.order: only 1 is supported")
    return {
        "image_order": orders["data"],
        "label_order": 1,
        "separate_axis_order": 0,
        "anisotropy_threshold": ANISOTROPY_THRESHOLD,
        "clip_to_input_range": True,
        "resample_logits": True,
    }


def make_plan(plans: dict, dataset_json: dict, config: dict, config_name: str, arch: Architecture, mirror_axes) -> dict:
    """The medseg-jax plan reproducing nnU-Net's preprocessing of configuration ``config_name``.

    ``config``: the resolved configuration (:func:`medseg_jax.nnunet.architecture.configuration`);
    ``mirror_axes``: the checkpoint's ``inference_allowed_mirroring_axes`` (recorded for reference; the
    run's ``inference.mirror_axes`` applies them).
    """
    where = f"plans.json: configurations.{config_name}"
    if config.get("previous_stage") is not None or "cascade" in config_name:
        raise DataError(
            f"{where}: a cascade stage needs the previous stage's segmentation as input; cascades are not supported"
        )
    preprocessor = config.get("preprocessor_name", "DefaultPreprocessor")
    if preprocessor != "DefaultPreprocessor":
        raise DataError(f"{where}.preprocessor_name: {preprocessor!r} is not supported (only DefaultPreprocessor)")
    reader = plans.get("image_reader_writer", "SimpleITKIO")
    frame = READER_FRAMES.get(reader)
    if frame is None:
        raise DataError(
            f"plans.json: image_reader_writer {reader!r} is not supported (only {', '.join(READER_FRAMES)})"
        )
    transpose = plans.get("transpose_forward", [0, 1, 2])
    if sorted(int(t) for t in transpose) != [0, 1, 2]:
        raise DataError(f"plans.json: transpose_forward {transpose!r} is not a permutation of 0, 1, 2")
    names = channel_names(dataset_json, "dataset.json")
    found = labels(dataset_json, "dataset.json")
    dim = arch.spatial_dims
    spacing = config.get("spacing")
    patch = config.get("patch_size")
    if not isinstance(spacing, list) or len(spacing) != dim:
        raise DataError(f"{where}.spacing: expected {dim} values, got {spacing!r}")
    if not isinstance(patch, list) or len(patch) != dim:
        raise DataError(f"{where}.patch_size: expected {dim} values, got {patch!r}")
    median = config.get("median_image_size_in_voxels") or patch
    return {
        "plan_format_version": PLAN_FORMAT_VERSION,
        "dataset_name": plans.get("dataset_name"),
        "dim": dim,
        "channel_names": names,
        "labels": found,
        "num_classes": len(found),
        "target_spacing": _to_plan_axes([float(s) for s in spacing], dim),
        "anisotropic": max(spacing) / min(spacing) > ANISOTROPY_THRESHOLD,
        "median_shape": _to_plan_axes([int(round(float(n))) for n in median], dim),
        "normalization": _normalization(config, plans, names, where),
        "patch_size": [int(p) for p in patch],
        "batch_size": int(config.get("batch_size", 2)),
        "n_stages": arch.n_stages,
        "kernel_sizes": [list(k) for k in arch.kernel_sizes],
        "strides": [list(s) for s in arch.strides],
        "features_per_stage": list(arch.features),
        "orientation": {"frame": frame, "axes": orientation_axes(transpose, dim)},
        "preprocessing": {
            "crop_to_nonzero": True,
            "hu_window": None,
            "denoise": None,
            "clahe": None,
            "normalize_before_resampling": True,
        },
        "resampling": _resampling(config, where),
        "source": {
            "format": "nnU-Net v2",
            "plans_name": plans.get("plans_name"),
            "configuration": config_name,
            "reader": reader,
            "transpose_forward": [int(t) for t in transpose],
            "inference_allowed_mirroring_axes": None if mirror_axes is None else [int(a) for a in mirror_axes],
        },
    }
