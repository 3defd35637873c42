"""The experiment plan: target spacing, normalisation, patch / batch size and U-Net topology.

:func:`make_plan` turns a fingerprint (:func:`medseg_jax.data.fingerprint.compute_fingerprint`) into a
JSON dict; :func:`check_plan` validates one, :func:`write_plan` / :func:`read_plan` are the only way plan
files are written and read (both validate), :func:`plan_differences` compares two. Rules of the default preset, in
the spirit of nnU-Net v2's ``ExperimentPlanner`` (axes in RAS order; a 2D plan works on the in-plane axes x, y and
treats the last axis z as the slice axis); nnU-Net's ResEnc presets and the 3d_lowres configuration are in
:mod:`medseg_jax.data.planners`:

1. Target spacing: the per-axis median over cases. If the median spacing is anisotropic — the thickest
   axis is more than 3x the next thickest *and* its median size times 3 is below the smallest other
   median size — that axis gets the 10th percentile of its spacings instead (but stays above the other
   axes' spacing). A 2D plan stores ``null`` for the slice axis: every case keeps its own slice spacing.
2. Normalisation per channel: a channel named "CT" (any case) uses the dataset foreground statistics
   (clip to the 0.5 / 99.5 percentiles, z-score with foreground mean / std), or with ``hu_window`` the
   fixed window mapped to [0, 1]; every other channel a per-case z-score.
3. Patch: voxels per batch are budgeted as ``2 * 128**3 * gpu_memory_gb / 8`` (about nnU-Net's 3D
   patch and batch on an 8 GB card; U-Net activation memory grows about linearly with voxels per batch),
   or ``voxel_budget``. The patch starts as the box of equal physical extent per axis holding
   ``budget / min_batch_size`` voxels, clipped to the median shape at target spacing and rounded up to a
   multiple of the total stride; while over budget, the axis with the largest patch / median-shape
   ratio shrinks by its total stride. Batch size = budget // patch voxels, at most 5% of the dataset's
   voxels, at least ``min_batch_size`` (2).
4. Topology (nnU-Net's ``get_pool_and_conv_props``): stage 0 has stride 1; each further stage halves
   every axis whose feature map stays >= 4 voxels and whose current spacing is less than 2x the finest
   axis's (a lone axis must be >= 12 voxels), up to 6 stages in 3D / 7 in 2D. An axis's kernel is 1
   while its spacing is at least 2x the finest (thick slices), 3 from then on; the bottleneck is 3.
   Features per stage: min(32 * 2**i, 320 in 3D / 512 in 2D).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from medseg_jax.atomic import read_json, write_json_atomic
from medseg_jax.data.resample import ANISOTROPY_THRESHOLD
from medseg_jax.errors import ConfigError, DataError

PLAN_FORMAT_VERSION = 1
MIN_FEATURE_MAP = 4
MAX_STAGES = {2: 7, 3: 6}
MAX_FEATURES = {2: 512, 3: 320}
REFERENCE_BATCH_VOXELS = 2 * 128**3  # per 8 GB of accelerator memory
DATASET_FRACTION_PER_BATCH = 0.05

REQUIRED_KEYS = (
    "plan_format_version",
    "dim",
    "channel_names",
    "labels",
    "num_classes",
    "target_spacing",
    "normalization",
    "patch_size",
    "batch_size",
    "n_stages",
    "kernel_sizes",
    "strides",
    "features_per_stage",
    "preprocessing",
)
PREPROCESSING_KEYS = ("denoise", "clahe", "hu_window")
SCHEME_KEYS = {
    "ct": ("mean", "std", "percentile_00_5", "percentile_99_5"),
    "zscore": (),
    "hu_window": ("lower", "upper"),
    "rescale_01": (),  # nnU-Net's RescaleTo01Normalization (plans imported from nnU-Net)
    "none": (),  # nnU-Net's NoNormalization
}


def target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> tuple[np.ndarray, bool]:
    """nnU-Net's full-resolution target spacing from per-case ``spacings`` and ``shapes`` (N, ndim)."""
    target = np.percentile(spacings, 50, axis=0)
    if spacings.shape[1] < 3:
        return target, False
    median_shape = np.percentile(shapes, 50, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(len(target)) if a != worst]
    anisotropic = target[worst] > ANISOTROPY_THRESHOLD * max(target[others]) and median_shape[
        worst
    ] * ANISOTROPY_THRESHOLD < min(median_shape[others])
    if anisotropic:
        thick = np.percentile(spacings[:, worst], 10)
        if thick < max(target[others]):
            thick = max(target[others]) + 1e-5
        target[worst] = thick
    return target, bool(anisotropic)


def stage_topology(
    spacing: Sequence[float] | np.ndarray, patch: Sequence[int] | np.ndarray, max_stages: int
) -> tuple[list, list]:
    """``(strides, kernel_sizes)``, one ``[per axis]`` list per stage, for ``patch`` at ``spacing`` (rule 4)."""
    ndim = len(spacing)
    current_spacing = [float(s) for s in spacing]
    size = [float(n) for n in patch]
    kernel = [1] * ndim
    strides, kernels = [[1] * ndim], []
    while len(strides) < max_stages:
        valid = [a for a in range(ndim) if size[a] >= 2 * MIN_FEATURE_MAP]
        if not valid:
            break
        finest = min(current_spacing[a] for a in valid)
        valid = [a for a in valid if current_spacing[a] / finest < 2]
        if len(valid) == 1 and size[valid[0]] < 3 * MIN_FEATURE_MAP:
            break
        # Kernels switch to 3 once an axis is within 2x of the finest; they never go back to 1.
        finest_all = min(current_spacing)
        kernel = [3 if k == 3 or current_spacing[a] / finest_all < 2 else 1 for a, k in enumerate(kernel)]
        stride = [2 if a in valid else 1 for a in range(ndim)]
        for a in valid:
            current_spacing[a] *= 2
            size[a] = np.ceil(size[a] / 2)
        strides.append(stride)
        kernels.append(list(kernel))
    kernels.append([3] * ndim)  # bottleneck
    return strides, kernels


def total_stride(strides) -> np.ndarray:
    """The factor each patch axis must be divisible by: the product of the stage strides along it."""
    return np.prod(np.asarray(strides), axis=0).astype(np.int64)


def plan_patch_and_topology(
    spacing: np.ndarray, median_shape: np.ndarray, patch_voxel_budget: float, max_stages: int
) -> tuple[list[int], list, list]:
    """``(patch_size, strides, kernel_sizes)`` for the planned axes (rule 3 and 4 of the module docstring)."""
    inverse = 1.0 / spacing
    initial = inverse * (patch_voxel_budget / np.prod(inverse)) ** (1.0 / len(spacing))
    patch = np.maximum(np.minimum(np.round(initial), np.round(median_shape)), 1).astype(np.int64)
    while True:
        strides, kernels = stage_topology(spacing, patch, max_stages)
        divisor = total_stride(strides)
        patch = (-(-patch // divisor)) * divisor  # round up to a multiple of the total stride
        if np.prod(patch) <= patch_voxel_budget:
            break
        shrinkable = patch > divisor
        if not shrinkable.any():
            break
        ratio = np.where(shrinkable, patch / np.maximum(median_shape, 1), -np.inf)
        axis = int(np.argmax(ratio))
        patch[axis] -= divisor[axis]
    return [int(n) for n in patch], strides, kernels


def _normalization(channel_names: Sequence[str], intensity: dict, hu_window) -> list[dict]:
    schemes: list[dict] = []
    for c, name in enumerate(channel_names):
        if name.strip().lower() != "ct":
            schemes.append({"channel": name, "scheme": "zscore"})
        elif hu_window is not None:
            schemes.append(
                {"channel": name, "scheme": "hu_window", "lower": float(hu_window[0]), "upper": float(hu_window[1])}
            )
        else:
            stats = intensity.get(str(c))
            if stats is None:
                raise DataError(
                    f"channel {c} ({name}): no foreground voxels in any case, so CT normalisation "
                    "has no statistics (add labels or pass hu_window)"
                )
            schemes.append({"channel": name, "scheme": "ct", **{k: float(stats[k]) for k in SCHEME_KEYS["ct"]}})
    return schemes


def _check_options(hu_window, denoise, clahe, channel_names) -> None:
    if hu_window is not None:
        if len(hu_window) != 2 or not float(hu_window[0]) < float(hu_window[1]):
            raise ConfigError(f"hu_window must be [lower, upper] with lower < upper, got {hu_window!r}")
        if not any(n.strip().lower() == "ct" for n in channel_names):
            raise ConfigError(f"hu_window is set but no channel is named CT (channels: {list(channel_names)})")
    if denoise is not None:
        method = denoise.get("method")
        needed = {"gaussian": "sigma", "median": "size"}.get(method)
        if needed is None:
            raise ConfigError(f"denoise.method must be 'gaussian' or 'median', got {method!r}")
        if needed not in denoise or not float(denoise[needed]) > 0:
            raise ConfigError(f"denoise.{needed} must be a positive number for method {method!r}, got {denoise!r}")
    if clahe is not None and not 0 < float(clahe.get("clip_limit", 0.01)) <= 1:
        raise ConfigError(f"clahe.clip_limit must be in (0, 1], got {clahe.get('clip_limit')!r}")


def default_planner(
    dim: int, budget: float, min_batch_size: int, max_stages: int | None, base_features: int
) -> Callable[[np.ndarray, np.ndarray, float], dict]:
    """``plan_at(spacing, median_shape, dataset_voxels)`` -> patch, batch and topology of one configuration
    by rules 3 and 4 of the module docstring, for a ``budget`` of voxels per batch."""

    def plan_at(spacing: np.ndarray, median_shape: np.ndarray, dataset_voxels: float) -> dict:
        patch, strides, kernels = plan_patch_and_topology(
            spacing, median_shape, budget / min_batch_size, max_stages or MAX_STAGES[dim]
        )
        batch = int(budget // np.prod(patch))
        covered = int(round(DATASET_FRACTION_PER_BATCH * dataset_voxels / np.prod(patch)))
        return {
            "patch_size": patch,
            "batch_size": max(min_batch_size, min(batch, covered)),
            "n_stages": len(strides),
            "kernel_sizes": kernels,
            "strides": strides,
            "features_per_stage": [min(base_features * 2**i, MAX_FEATURES[dim]) for i in range(len(strides))],
        }

    return plan_at


def make_plan(
    fingerprint: dict,
    dim: int | None = None,
    gpu_memory_gb: float | None = None,
    voxel_budget: float | None = None,
    hu_window: Sequence[float] | None = None,
    denoise: dict | None = None,
    clahe: dict | None = None,
    min_batch_size: int = 2,
    max_stages: int | None = None,
    base_features: int = 32,
    preset: str = "default",
    configuration: str | None = None,
) -> dict:
    """A JSON-able plan from a fingerprint (rules in the module docstring).

    ``voxel_budget`` (voxels per batch) overrides the one derived from ``gpu_memory_gb`` (default 8).
    ``hu_window``, ``denoise`` (``{"method": "gaussian", "sigma": mm}`` or ``{"method": "median", "size":
    voxels}``) and ``clahe`` (``{"clip_limit": 0.01, "kernel_size": None}``) go to ``plan["preprocessing"]``.
    ``preset`` ``resenc-m`` / ``resenc-l`` / ``resenc-xl`` plans as nnU-Net's ResEnc planners
    (:mod:`medseg_jax.data.planners`; ``gpu_memory_gb`` defaults to the preset's). ``configuration`` is
    ``2d``, ``3d_fullres``, ``3d_lowres`` or ``3d_cascade_fullres`` (3d_fullres whose network also takes the
    3d_lowres prediction, :mod:`medseg_jax.cascade`; default: ``2d`` for ``dim`` 2, else ``3d_fullres``).
    """
    from medseg_jax.cascade import previous_stage_entry
    from medseg_jax.data.planners import check_options, lowres_configuration, resenc_planner

    spacings = np.asarray(fingerprint["spacings"], dtype=np.float64)
    shapes = np.asarray(fingerprint["shapes_after_crop"], dtype=np.float64)
    data_dim = spacings.shape[1]
    dim, configuration, resenc, gpu_memory_gb = check_options(dim, configuration, preset, voxel_budget, gpu_memory_gb)
    if dim not in (2, 3) or dim > data_dim:
        raise ConfigError(f"dim must be 2 or 3 and at most the data's {data_dim} dims, got {dim}")
    channel_names = list(fingerprint["channel_names"])
    _check_options(hu_window, denoise, clahe, channel_names)
    labels = {str(k): int(v) for k, v in fingerprint["labels"].items()}
    num_classes = max(labels.values()) + 1
    spacing, anisotropic = target_spacing(spacings, shapes)
    resampled = shapes * spacings / spacing
    # ResEnc presets clip the patch to the median itself: nnU-Net's, of the per-case shapes rounded to voxels
    median_shape = np.percentile(resampled, 50, axis=0) if resenc is None else np.median(np.round(resampled), axis=0)
    planned_axes = list(range(dim))  # 3D: all; 2D: x, y (the slice axis z is last)
    if resenc is None:
        budget = float(voxel_budget) if voxel_budget is not None else REFERENCE_BATCH_VOXELS * gpu_memory_gb / 8.0
        plan_at = default_planner(dim, budget, min_batch_size, max_stages, base_features)
    else:
        plan_at = resenc_planner(resenc, dim, num_classes, gpu_memory_gb, min_batch_size, max_stages, base_features)
    n_cases = len(spacings)
    network = plan_at(spacing[planned_axes], median_shape[planned_axes], np.prod(median_shape) * n_cases)
    lowres: dict = {}
    if configuration == "3d_lowres":
        fullres_spacing = spacing
        spacing, median_shape, network = lowres_configuration(
            plan_at, spacing, median_shape, network["patch_size"], n_cases
        )
        lowres = {"fullres_spacing": [float(s) for s in fullres_spacing]}
    elif configuration == "3d_cascade_fullres":
        try:  # nnU-Net plans the cascade only where it plans 3d_lowres (its first stage): the same check
            lowres_configuration(plan_at, spacing, median_shape, network["patch_size"], n_cases)
        except ConfigError as exc:
            raise ConfigError(f"no 3d_cascade_fullres without its first stage: {exc}") from None
        lowres = {"previous_stage": previous_stage_entry(labels)}
    return {
        "plan_format_version": PLAN_FORMAT_VERSION,
        "dataset_name": fingerprint.get("dataset_name"),
        "dim": dim,
        "configuration": configuration,
        "preset": preset,
        "channel_names": channel_names,
        "labels": labels,
        "num_classes": num_classes,
        "target_spacing": [float(s) if a in planned_axes or dim == 3 else None for a, s in enumerate(spacing)],
        **lowres,
        "anisotropic": anisotropic,
        "median_shape": [int(round(n)) for n in median_shape],
        "normalization": _normalization(
            channel_names, fingerprint["foreground_intensity_properties_per_channel"], hu_window
        ),
        **network,
        "preprocessing": {
            "crop_to_nonzero": True,
            "hu_window": None if hu_window is None else list(hu_window),
            "denoise": denoise,
            "clahe": clahe,
        },
        "resampling": {
            "image_order": 3,
            "label_order": 1,
            "separate_axis_order": 0,
            "anisotropy_threshold": ANISOTROPY_THRESHOLD,
        },
    }


def check_plan(plan: dict, source: str = "plan") -> None:
    """Raise ``DataError`` naming ``source`` and the offending key if ``plan`` is incomplete or inconsistent."""
    missing = [k for k in REQUIRED_KEYS if k not in plan]
    if missing:
        raise DataError(f"{source}: plan is missing the key(s) {', '.join(repr(k) for k in missing)}")
    if plan["plan_format_version"] != PLAN_FORMAT_VERSION:
        raise DataError(
            f"{source}: plan_format_version {plan['plan_format_version']!r} is not supported "
            f"(this version reads {PLAN_FORMAT_VERSION})"
        )
    dim = plan["dim"]
    if dim not in (2, 3) or len(plan["patch_size"]) != dim:
        raise DataError(f"{source}: 'patch_size' {plan['patch_size']!r} does not match 'dim' {dim!r}")
    n_stages = plan["n_stages"]
    for key in ("kernel_sizes", "strides", "features_per_stage"):
        if len(plan[key]) != n_stages:
            raise DataError(f"{source}: '{key}' has {len(plan[key])} entries but 'n_stages' is {n_stages}")
    if len(plan["normalization"]) != len(plan["channel_names"]):
        raise DataError(
            f"{source}: 'normalization' has {len(plan['normalization'])} entries for "
            f"{len(plan['channel_names'])} channels"
        )
    for c, scheme in enumerate(plan["normalization"]):
        needed = SCHEME_KEYS.get(scheme.get("scheme"))
        if needed is None:
            raise DataError(f"{source}: 'normalization[{c}].scheme' {scheme.get('scheme')!r} is unknown")
        for key in needed:
            if key not in scheme:
                raise DataError(f"{source}: 'normalization[{c}]' is missing the key {key!r}")
    for key in PREPROCESSING_KEYS:
        if key not in plan["preprocessing"]:
            raise DataError(f"{source}: 'preprocessing' is missing the key {key!r}")
    from medseg_jax.data.planners import check_planner_fields

    check_planner_fields(plan, source)


def read_plan(path: str | os.PathLike) -> dict:
    """Read and validate a plan JSON; a missing or malformed entry raises ``DataError`` naming it and the file."""
    plan = read_json(path, expect=dict)
    check_plan(plan, source=str(path))
    return plan


def write_plan(plan: dict, path: str | os.PathLike) -> Path:
    """Validate ``plan`` and write it to ``path`` atomically (strict JSON: a NaN in it is an error)."""
    check_plan(plan, source=str(path))
    return write_json_atomic(path, plan)


def plan_differences(plan: dict, other: dict) -> list[str]:
    """Top-level keys whose values differ between two plans, compared as JSON (tuples equal lists)."""
    a, b = (json.loads(json.dumps(p, default=_plain)) for p in (plan, other))
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _plain(value):
    """JSON fallback for the numpy values a freshly made plan may hold."""
    return value.tolist() if isinstance(value, (np.ndarray, np.generic)) else str(value)
