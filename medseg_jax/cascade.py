"""nnU-Net's cascade (``3d_cascade_fullres``): a full-resolution network that also sees the 3d_lowres prediction.

nnU-Net plans the cascade where it plans ``3d_lowres`` (the full-resolution patch covers too little of the
median image): a first network predicts the whole image at low resolution, and a 3d_fullres network takes
that prediction, one channel per foreground class, besides the scan. Here:

1. ``medseg-jax plan DATASET --configuration 3d_cascade_fullres``: the 3d_fullres plan with
   ``previous_stage: {"configuration": "3d_lowres", "foreground_labels": [...]}`` (refused where nnU-Net
   would plan no 3d_lowres).
2. ``medseg-jax preprocess DATASET --plan plan_3d_cascade_fullres.json --previous-stage CV_LOWRES --out STORE``:
   every case's input holds the scan's channels and then the one-hot foreground masks of the 3d_lowres
   cross-validation's prediction of that case (made by the fold that did not train on it, as nnU-Net's
   ``predicted_next_stage``), preprocessed as a label (:func:`~medseg_jax.data.preprocess.preprocess_case`).
   The store's plan records the lowres cross-validation and its runs (:func:`bind_previous_stage`).
3. ``medseg-jax cv --data STORE ...`` (or ``train``): the network has ``len(channel_names) +
   len(foreground_labels)`` input channels. During training the masks are degraded as nnU-Net's cascade
   trainer does (:func:`degrade_masks`: random dilation / erosion / opening / closing, random removal of a
   small connected component), so that the network learns to correct the first stage rather than copy it;
   the spatial augmentation moves them with the scan and keeps them binary, the intensity augmentation leaves
   them alone (:mod:`medseg_jax.augment`).
4. ``medseg-jax predict --model CASCADE_RUN ...``: the 3d_lowres runs recorded in the plan predict the scan
   first (their ensemble on the scan's grid), then the cascade network predicts with that label map as its
   extra input (:class:`~medseg_jax.inference.predict.Predictor`).

One difference from nnU-Net: its trainer degrades the masks after the spatial augmentation, here the loader
degrades them before it (the device augments after the loader). The operations are local and the spatial
transform smooth, so the distribution of degraded masks the network sees is alike.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
from scipy import ndimage

from medseg_jax.errors import ConfigError, DataError

PREVIOUS_STAGE = "previous_stage"
FIRST_STAGE_CONFIGURATION = "3d_lowres"
CASCADE_CONFIGURATION = "3d_cascade_fullres"
# nnU-Net's cascade trainer: a binary operator per foreground mask in 40% of samples (ball of radius 1-8
# voxels), the removal of one connected component per mask in 20% of samples (of components covering at
# most 15% of the patch)
BINARY_OPERATOR_PROBABILITY = 0.4
STRUCTURE_RADIUS = (1, 8)
REMOVE_COMPONENT_PROBABILITY = 0.2
MAX_REMOVED_FRACTION = 0.15


def previous_stage_entry(labels: dict[str, int]) -> dict:
    """The cascade plan's ``previous_stage`` as planned (no runs bound yet)."""
    return {"configuration": FIRST_STAGE_CONFIGURATION, "foreground_labels": foreground_labels(labels)}


def foreground_labels(labels: dict[str, int]) -> list[int]:
    return sorted(int(v) for v in labels.values() if int(v) > 0)


def is_cascade(plan: dict) -> bool:
    return PREVIOUS_STAGE in plan


def mask_channels(plan: dict) -> int:
    """The number of input channels that hold the previous stage's masks (0 for other plans)."""
    return len(plan[PREVIOUS_STAGE]["foreground_labels"]) if is_cascade(plan) else 0


def check_previous_stage(plan: dict, source: str) -> None:
    """A plan's ``previous_stage`` entry, if any: a DataError naming ``source`` and the field when wrong."""
    if not is_cascade(plan):
        if plan.get("configuration") == CASCADE_CONFIGURATION:
            raise DataError(f"{source}: a {CASCADE_CONFIGURATION} plan needs '{PREVIOUS_STAGE}'")
        return
    entry = plan[PREVIOUS_STAGE]
    if plan.get("configuration") != CASCADE_CONFIGURATION:
        raise DataError(f"{source}: '{PREVIOUS_STAGE}' belongs to a {CASCADE_CONFIGURATION} plan only")
    if not isinstance(entry, dict) or entry.get("configuration") != FIRST_STAGE_CONFIGURATION:
        raise DataError(f"{source}: '{PREVIOUS_STAGE}' must name configuration {FIRST_STAGE_CONFIGURATION!r}")
    if entry.get("foreground_labels") != foreground_labels(plan["labels"]):
        raise DataError(
            f"{source}: '{PREVIOUS_STAGE}.foreground_labels' {entry.get('foreground_labels')!r} must be the plan's "
            f"foreground label values {foreground_labels(plan['labels'])}"
        )
    runs = entry.get("runs")
    if runs is not None and (not isinstance(runs, list) or not runs or not all(isinstance(r, str) for r in runs)):
        raise DataError(f"{source}: '{PREVIOUS_STAGE}.runs' must be a non-empty list of run folders")


def bind_previous_stage(plan: dict, cv_dir) -> tuple[dict, dict[str, Path]]:
    """``(plan, {case: predicted label file})``: the cascade ``plan`` with the 3d_lowres cross-validation
    ``cv_dir`` recorded (its folder and fold runs, which ``predict`` runs first), and that cross-validation's
    prediction of each case. The cross-validation must be complete and of a 3d_lowres plan of the same
    classes, else a DataError; a plan that is no cascade is a ConfigError."""
    from medseg_jax.atomic import read_json
    from medseg_jax.train.cross_validation import fold_dir, read_record, validation_cases

    if not is_cascade(plan):
        raise ConfigError(
            f"--previous-stage is for a {CASCADE_CONFIGURATION} plan (`medseg-jax plan --configuration "
            f"{CASCADE_CONFIGURATION}`); this plan is {plan.get('configuration', 'not one')}"
        )
    cv_dir = Path(cv_dir).resolve()
    record = read_record(cv_dir)
    cases = validation_cases(cv_dir)  # every fold complete, or a DataError naming the missing ones
    first_plan_file = fold_dir(cv_dir, 0) / "plan.json"
    first_plan = read_json(first_plan_file)
    if first_plan.get("configuration") != FIRST_STAGE_CONFIGURATION:
        raise DataError(
            f"{cv_dir}: the cascade's first stage must be a {FIRST_STAGE_CONFIGURATION} cross-validation; "
            f"{first_plan_file} is {first_plan.get('configuration', '3d_fullres')!r}"
        )
    if record["labels"] != plan["labels"]:
        raise DataError(
            f"{cv_dir} predicts the classes {record['labels']}, the cascade plan has {plan['labels']}: "
            "both stages segment the same classes"
        )
    bound = copy.deepcopy(plan)
    bound[PREVIOUS_STAGE].update(
        cross_validation=str(cv_dir), runs=[str(fold_dir(cv_dir, fold)) for fold in range(record["folds"])]
    )
    return bound, {case: paths[0] for case, paths in cases.items()}


def previous_stage_runs(plan: dict) -> list[Path]:
    """The 3d_lowres runs a cascade plan was bound to (ConfigError when it was not)."""
    runs = plan[PREVIOUS_STAGE].get("runs")
    if not runs:
        raise ConfigError(
            "this cascade plan names no 3d_lowres runs: preprocess with `--previous-stage CV_LOWRES` "
            "(the 3d_lowres cross-validation) before training"
        )
    return [Path(run) for run in runs]


def mask_input(label: np.ndarray, plan: dict) -> np.ndarray:
    """The previous stage's ``label`` ``(*spatial)`` as float32 one-hot masks ``(K, *spatial)`` of the plan's
    foreground labels (the network's extra input channels)."""
    values = plan[PREVIOUS_STAGE]["foreground_labels"]
    return np.stack([label == value for value in values]).astype(np.float32)


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation with a ball of ``radius`` voxels, through the distance transform (linear time, where a
    ball of radius 8 as a structuring element costs 4,913 operations per voxel in 3D)."""
    if mask.all() or not mask.any():
        return mask.copy()
    return ndimage.distance_transform_edt(~mask) <= radius


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    return ~_dilate(~mask, radius)


def _binary_operator(mask: np.ndarray, operator: str, radius: int) -> np.ndarray:
    if operator == "dilation":
        return _dilate(mask, radius)
    if operator == "erosion":
        return _erode(mask, radius)
    if operator == "opening":
        return _dilate(_erode(mask, radius), radius)
    return _erode(_dilate(mask, radius), radius)  # closing


def degrade_masks(rng: np.random.Generator, masks: np.ndarray) -> np.ndarray:
    """nnU-Net's cascade degradations of one sample's masks ``(*spatial, K)`` (0/1, channels last).

    With probability 0.4, each mask in a random order gets a random binary dilation, erosion, opening or
    closing with a ball of radius 1-8 voxels; voxels a mask gains leave the other masks (they stay
    disjoint). Then with probability 0.2, each mask loses one of its connected components, chosen at random
    among those covering at most 15% of the sample (nnU-Net: of the patch; the loader's crop here, the patch
    plus the margin the spatial augmentation needs)."""
    out = masks > 0.5
    k = out.shape[-1]
    if rng.random() < BINARY_OPERATOR_PROBABILITY:
        for c in rng.permutation(k):
            operator = ("dilation", "erosion", "opening", "closing")[rng.integers(4)]
            radius = int(rng.integers(STRUCTURE_RADIUS[0], STRUCTURE_RADIUS[1] + 1))
            before = out[..., c]
            after = _binary_operator(before, operator, radius)
            gained = after & ~before
            out[gained] = False
            out[..., c] = after
    if rng.random() < REMOVE_COMPONENT_PROBABILITY:
        limit = MAX_REMOVED_FRACTION * out[..., 0].size
        for c in range(k):
            components, count = ndimage.label(out[..., c])
            if count == 0:
                continue
            sizes = np.bincount(components.ravel())[1:]
            small = np.flatnonzero(sizes <= limit) + 1
            if len(small):
                out[..., c][components == small[rng.integers(len(small))]] = False
    return out.astype(masks.dtype)


def degrade_batch(rng: np.random.Generator, batch: dict, mask_channels: int) -> dict:
    """:func:`degrade_masks` on the last ``mask_channels`` image channels of each sample of a loader batch."""
    image = np.array(batch["image"], copy=True)
    for sample in image:
        sample[..., -mask_channels:] = degrade_masks(rng, sample[..., -mask_channels:])
    return {**batch, "image": image}
