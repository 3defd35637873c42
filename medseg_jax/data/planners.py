"""nnU-Net v2's residual-encoder planner presets (ResEnc M / L / XL) and the ``3d_lowres`` configuration.

:func:`medseg_jax.data.plan.make_plan` plans with ``preset="default"`` by the rules of
:mod:`medseg_jax.data.plan`; a ResEnc preset (``medseg-jax plan --preset resenc-m``, nnU-Net's
``nnUNetv2_plan_experiment -pl nnUNetPlannerResEncM``) reproduces nnU-Net's ``nnUNetPlannerResEncM`` / ``L`` /
``XL``. Target spacing, normalisation and the stage topology rule are the default planner's (rules 1, 2 and 4
there), except that the stage count is not capped (as in nnU-Net, only the 4-voxel minimum feature map
limits it). The rest, per preset:

1. Patch: the box of equal physical extent per axis holding 256**3 voxels (2048**2 in 2D), clipped to the
   median shape and rounded up to a multiple of the total stride. While nnU-Net's memory estimate of the
   network (:func:`resenc_feature_map_size`) exceeds the preset's reference value times
   ``gpu_memory_gb / reference_gb``, the axis with the largest patch / median-shape ratio shrinks by its total
   stride, taken from the topology of the shrunk size (so that no valid size is skipped), and the topology is
   planned again. Ties go to the first axis in RAS order, which is nnU-Net's last axis in its z, y, x arrays.
2. Batch: ``round(reference / estimate * reference_batch)`` (reference batch 2 in 3D, 12 in 2D), at most the
   number of patches in ``max_dataset_covered`` (all) of the dataset's voxels, at least ``min_batch_size``.
3. Network: nnU-Net's ResidualEncoderUNet: features ``min(32 * 2**i, 320 in 3D / 512 in 2D)``, residual
   blocks per stage 1, 3, 4, 6, 6, ..., one conv per decoder stage. The plan records ``encoder``,
   ``n_blocks_per_stage`` and ``n_conv_per_stage_decoder``, which training takes as the plan's.

``3d_lowres`` (nnU-Net's ``ExperimentPlanner.plan_experiment``, for every preset): only when the 3d_fullres
patch holds less than 25% of the voxels of the median image. From the 3d_fullres spacing, the spacing grows
by 3% per step (while some axes are more than 2x finer than the coarsest, only those: anisotropic data first
loses its excess in-plane resolution; then every axis) and the configuration is planned again at that
spacing, with the median shape and the dataset's voxels scaled to it, until the patch holds at least 25% of
the median image. When that median image still has more than half the voxels of the full-resolution one,
nnU-Net drops 3d_lowres; here that, like a dataset that needs none, is a ``ConfigError`` naming the numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from medseg_jax.cascade import check_previous_stage
from medseg_jax.data.plan import MAX_FEATURES, stage_topology, total_stride
from medseg_jax.errors import ConfigError, DataError

CONFIGURATIONS = {"2d": 2, "3d_fullres": 3, "3d_lowres": 3, "3d_cascade_fullres": 3}  # nnU-Net's names, their dims
DEFAULT_GPU_MEMORY_GB = 8.0  # the default preset's, as nnU-Net's default ExperimentPlanner
INITIAL_PATCH_VOXELS = {2: 2048**2, 3: 256**3}  # nnU-Net starts large and shrinks to the memory target
REFERENCE_BATCH = {2: 12, 3: 2}  # the batch the reference values were measured with
RESENC_BLOCKS = (1, 3, 4, 6)  # residual blocks per stage of nnU-Net's ResEnc planners; 6 for every deeper stage
RESENC_DECODER_CONVS = 1  # convs per decoder stage of nnU-Net's ResEnc planners
UNCAPPED_STAGES = 10**6  # nnU-Net's max_numpool 999999: only the minimum feature map limits the depth
LOWRES_COVERAGE = 0.25  # nnU-Net's lowres_creation_threshold: below it the fullres patch sees too little
LOWRES_SPACING_STEP = 1.03  # nnU-Net's spacing_increase_factor per step
LOWRES_ANISOTROPY = 2.0  # axes more than this much finer than the coarsest grow first
LOWRES_MIN_REDUCTION = 2.0  # nnU-Net drops a 3d_lowres whose median image is not at least this much smaller

# what a planned configuration is: a dict of these plan keys (plus encoder, n_blocks_per_stage and
# n_conv_per_stage_decoder from a ResEnc preset)
NetworkPlanner = Callable[[np.ndarray, np.ndarray, float], dict]


@dataclasses.dataclass(frozen=True)
class Preset:
    """One of nnU-Net's ResEnc planner classes: its defaults and reference values."""

    name: str
    nnunet_planner: str  # the class ``nnUNetv2_plan_experiment -pl`` takes
    gpu_memory_gb: float  # its default gpu_memory_target_in_gb
    reference_gb: float  # UNet_reference_val_corresp_GB: the memory the reference values fill
    reference_2d: float  # UNet_reference_val_2d: a feature-map estimate that fits reference_gb in 2D
    reference_3d: float  # UNet_reference_val_3d
    max_dataset_covered: float = 1.0  # the batch holds at most this fraction of the dataset's voxels

    def reference(self, dim: int, gpu_memory_gb: float) -> float:
        """The feature-map estimate a network may reach for ``gpu_memory_gb`` of accelerator memory."""
        return (self.reference_2d if dim == 2 else self.reference_3d) * gpu_memory_gb / self.reference_gb


PRESETS = {
    p.name: p
    for p in (
        Preset("resenc-m", "nnUNetPlannerResEncM", 8, 8, 135_000_000, 680_000_000),
        Preset("resenc-l", "nnUNetPlannerResEncL", 24, 24, 380_000_000, 2_100_000_000),
        Preset("resenc-xl", "nnUNetPlannerResEncXL", 40, 40, 560_000_000, 3_600_000_000),
    )
}
PRESET_NAMES = ("default", *PRESETS)


def check_preset(preset: str) -> Preset | None:
    """The ResEnc preset named ``preset``; None for ``"default"``; ConfigError for an unknown name."""
    if preset == "default":
        return None
    if preset not in PRESETS:
        raise ConfigError(f"preset {preset!r} is unknown; choose one of {', '.join(PRESET_NAMES)}")
    return PRESETS[preset]


def resolve_configuration(dim: int | None, configuration: str | None) -> tuple[int, str]:
    """``(dim, configuration)`` from either or both (``--dim 3`` alone is 3d_fullres); a mismatch or an unknown
    name is a ConfigError."""
    if configuration is None:
        dim = 3 if dim is None else dim
        return dim, "2d" if dim == 2 else "3d_fullres"
    if configuration not in CONFIGURATIONS:
        raise ConfigError(f"configuration {configuration!r} is unknown; choose one of {', '.join(CONFIGURATIONS)}")
    if dim is not None and dim != CONFIGURATIONS[configuration]:
        raise ConfigError(
            f"dim {dim} does not match configuration {configuration!r}, which is "
            f"{CONFIGURATIONS[configuration]}D (give one of them)"
        )
    return CONFIGURATIONS[configuration], configuration


def check_options(
    dim: int | None, configuration: str | None, preset: str, voxel_budget: float | None, gpu_memory_gb: float | None
) -> tuple[int, str, Preset | None, float]:
    """``(dim, configuration, ResEnc preset or None, gpu_memory_gb)`` for :func:`~medseg_jax.data.plan.make_plan`'s
    options (``gpu_memory_gb`` null: the preset's, 8 for the default); a bad combination is a ConfigError."""
    dim, configuration = resolve_configuration(dim, configuration)
    resenc = check_preset(preset)
    if resenc is not None and voxel_budget is not None:
        raise ConfigError(
            f"voxel_budget sizes the default planner's patch; preset {preset!r} sizes it by nnU-Net's memory "
            "estimate of the network for gpu_memory_gb"
        )
    if gpu_memory_gb is None:
        gpu_memory_gb = DEFAULT_GPU_MEMORY_GB if resenc is None else resenc.gpu_memory_gb
    if not gpu_memory_gb > 0:
        raise ConfigError(f"gpu_memory_gb must be a positive number of gigabytes, got {gpu_memory_gb!r}")
    return dim, configuration, resenc, float(gpu_memory_gb)


def plan_file_name(configuration: str, preset: str) -> str:
    """The default file name of a plan: ``plan_2d.json``, ``plan_3d.json`` (3d_fullres), ``plan_3d_lowres.json``,
    with ``_<preset>`` before ``.json`` for a ResEnc preset."""
    stem = {"2d": "plan_2d", "3d_fullres": "plan_3d"}.get(configuration, f"plan_{configuration}")
    return f"{stem}.json" if preset == "default" else f"{stem}_{preset}.json"


def resenc_blocks(n_stages: int) -> tuple[int, ...]:
    """Residual blocks per stage of nnU-Net's ResEnc planners for a network of ``n_stages`` stages."""
    return tuple(RESENC_BLOCKS[min(i, len(RESENC_BLOCKS) - 1)] for i in range(n_stages))


def resenc_feature_map_size(
    patch: Sequence[int] | np.ndarray,
    strides: Sequence[Sequence[int]],
    features: Sequence[int],
    blocks: Sequence[int],
    decoder_convs: Sequence[int],
    num_classes: int,
) -> int:
    """nnU-Net's memory estimate of a ResidualEncoderUNet for one ``patch``: the summed element counts of every
    conv output (``compute_conv_feature_map_size``, without deep supervision, as its planner builds it).

    The stem conv; per encoder stage 2 convs per residual block, plus the first block's 1x1 projection where
    it strides or changes the feature count; per decoder stage its convs and its transposed conv at the skip's
    resolution; one segmentation head at full resolution.
    """
    size = np.asarray(patch, dtype=np.int64)
    total = int(features[0]) * int(np.prod(size))  # the stem
    voxels, in_features = [], int(features[0])
    for stride, out_features, n_blocks in zip(strides, features, blocks):
        out_size = size // np.asarray(stride, dtype=np.int64)
        projection = in_features != out_features or bool(np.any(out_size != size))
        total += (2 * int(n_blocks) + int(projection)) * int(out_features) * int(np.prod(out_size))
        voxels.append(int(np.prod(out_size)))
        size, in_features = out_size, int(out_features)
    n_stages = len(voxels)
    for d, convs in enumerate(decoder_convs):  # decoder stage d restores encoder stage n_stages - 2 - d
        target = n_stages - 2 - d
        total += (int(convs) + 1) * int(features[target]) * voxels[target]
    return total + int(num_classes) * voxels[0]


def _padded_topology(spacing: np.ndarray, patch: np.ndarray, max_stages: int):
    """nnU-Net's ``get_pool_and_conv_props``: ``(patch rounded up to the total stride, strides, kernels,
    total stride)`` for a (possibly fractional) patch."""
    strides, kernels = stage_topology(spacing, patch, max_stages)
    divisor = total_stride(strides)
    padded = (np.ceil(np.asarray(patch, dtype=np.float64) / divisor) * divisor).astype(np.int64)
    return padded, strides, kernels, divisor


def resenc_planner(
    preset: Preset,
    dim: int,
    num_classes: int,
    gpu_memory_gb: float,
    min_batch_size: int,
    max_stages: int | None,
    base_features: int,
) -> NetworkPlanner:
    """``plan_at(spacing, median_shape, dataset_voxels)`` -> the configuration's network, patch and batch by
    ``preset``'s rules (module docstring)."""
    reference = preset.reference(dim, gpu_memory_gb)
    stage_cap = max_stages or UNCAPPED_STAGES

    def network(strides: list) -> dict:
        n = len(strides)
        return {
            "n_stages": n,
            "features_per_stage": [min(base_features * 2**i, MAX_FEATURES[dim]) for i in range(n)],
            "encoder": "residual",
            "n_blocks_per_stage": list(resenc_blocks(n)),
            "n_conv_per_stage_decoder": [RESENC_DECODER_CONVS] * (n - 1),
        }

    def estimate(patch: np.ndarray, strides: list) -> int:
        net = network(strides)
        return resenc_feature_map_size(
            patch,
            strides,
            net["features_per_stage"],
            net["n_blocks_per_stage"],
            net["n_conv_per_stage_decoder"],
            num_classes,
        )

    def plan_at(spacing: np.ndarray, median_shape: np.ndarray, dataset_voxels: float) -> dict:
        inverse = 1.0 / spacing
        initial = np.round(inverse * (INITIAL_PATCH_VOXELS[dim] / np.prod(inverse)) ** (1.0 / dim))
        patch, strides, kernels, divisor = _padded_topology(spacing, np.minimum(initial, median_shape), stage_cap)
        size = estimate(patch, strides)
        while size > reference:
            axis = int(np.argmax(patch / median_shape))
            shrunk = patch.copy()
            shrunk[axis] -= divisor[axis]
            step = _padded_topology(spacing, shrunk, stage_cap)[3][axis]
            if patch[axis] - step < 1:
                raise ConfigError(
                    f"gpu_memory_gb={gpu_memory_gb:g} is too small for preset {preset.name!r}: even a patch of "
                    f"{patch.tolist()} needs a feature-map estimate of {size}, above {reference:.0f}"
                )
            patch[axis] -= step
            patch, strides, kernels, divisor = _padded_topology(spacing, patch, stage_cap)
            size = estimate(patch, strides)
        batch = int(round(reference / size * REFERENCE_BATCH[dim]))
        covered = int(round(dataset_voxels * preset.max_dataset_covered / np.prod(patch, dtype=np.float64)))
        batch = max(min(batch, covered), min_batch_size)
        net = network(strides)
        return {
            "patch_size": [int(n) for n in patch],
            "batch_size": batch,
            "n_stages": net.pop("n_stages"),
            "kernel_sizes": kernels,
            "strides": strides,
            **net,
        }

    return plan_at


def lowres_configuration(
    plan_at: NetworkPlanner, spacing: np.ndarray, median_shape: np.ndarray, fullres_patch: Sequence[int], n_cases: int
) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(spacing, median_shape, network)`` of nnU-Net's 3d_lowres configuration (module docstring) from the
    3d_fullres ``spacing``, ``median_shape`` and patch; a ConfigError naming the numbers when nnU-Net plans
    none for this dataset."""
    fullres_voxels = float(np.prod(median_shape, dtype=np.float64))
    coverage = float(np.prod(fullres_patch, dtype=np.float64)) / fullres_voxels
    if coverage >= LOWRES_COVERAGE:
        raise ConfigError(
            f"this dataset needs no 3d_lowres: the 3d_fullres patch {list(fullres_patch)} holds {coverage:.0%} of "
            f"the median image {np.round(median_shape).astype(int).tolist()} at spacing "
            f"{np.round(spacing, 4).tolist()}, and nnU-Net plans 3d_lowres only below {LOWRES_COVERAGE:.0%}; "
            "train 3d_fullres"
        )
    lowres = np.asarray(spacing, dtype=np.float64).copy()
    while True:
        fine = lowres.max() / lowres > LOWRES_ANISOTROPY
        lowres = np.where(fine, lowres * LOWRES_SPACING_STEP, lowres) if fine.any() else lowres * LOWRES_SPACING_STEP
        scaled = spacing / lowres * median_shape
        lowres_voxels = float(np.prod(scaled, dtype=np.float64))
        network = plan_at(lowres, np.round(scaled), lowres_voxels * n_cases)
        if np.prod(network["patch_size"], dtype=np.float64) / lowres_voxels >= LOWRES_COVERAGE:
            break
    if fullres_voxels / lowres_voxels < LOWRES_MIN_REDUCTION:
        raise ConfigError(
            f"this dataset needs no 3d_lowres: at spacing {np.round(lowres, 4).tolist()}, where the patch "
            f"{network['patch_size']} holds {LOWRES_COVERAGE:.0%} of the median image, that image "
            f"{np.round(scaled).astype(int).tolist()} is only {fullres_voxels / lowres_voxels:.2f}x smaller than "
            f"3d_fullres's {np.round(median_shape).astype(int).tolist()} (nnU-Net drops 3d_lowres below "
            f"{LOWRES_MIN_REDUCTION:g}x); train 3d_fullres"
        )
    return lowres, np.round(scaled), network


def check_planner_fields(plan: dict, source: str) -> None:
    """The optional plan keys of this module (configuration, preset, the ResEnc network, lowres' fullres
    spacing): a wrong one is a DataError naming ``source`` and the key."""
    configuration = plan.get("configuration", "2d" if plan["dim"] == 2 else "3d_fullres")
    if CONFIGURATIONS.get(configuration) != plan["dim"]:
        raise DataError(f"{source}: 'configuration' {configuration!r} does not match 'dim' {plan['dim']!r}")
    if plan.get("preset", "default") not in PRESET_NAMES:
        raise DataError(f"{source}: 'preset' {plan['preset']!r} is not one of {', '.join(PRESET_NAMES)}")
    if configuration == "3d_lowres" and not _positive_numbers(plan.get("fullres_spacing"), 3):
        raise DataError(f"{source}: a 3d_lowres plan needs 'fullres_spacing', three positive numbers")
    check_previous_stage(plan, source)
    if "encoder" in plan and plan["encoder"] not in ("plain", "residual"):
        raise DataError(f"{source}: 'encoder' {plan['encoder']!r} is not 'plain' or 'residual'")
    n_stages = plan["n_stages"]
    for key, count in (("n_blocks_per_stage", n_stages), ("n_conv_per_stage_decoder", n_stages - 1)):
        if key in plan and not _positive_numbers(plan[key], count, integers=True):
            raise DataError(f"{source}: '{key}' must be {count} positive integers, got {plan[key]!r}")


def _positive_numbers(value, count: int, integers: bool = False) -> bool:
    kinds = (int,) if integers else (int, float)
    return (
        isinstance(value, list)
        and len(value) == count
        and all(isinstance(v, kinds) and not isinstance(v, bool) and v > 0 for v in value)
    )
