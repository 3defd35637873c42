"""Preprocessing of cases according to a plan, and its inverse for predictions.

Order of operations (:func:`preprocess_case`), per case:

1. reorient every channel and the label to RAS (``volume.to_ras``: axis permutation / flips, exact);
2. crop to the bounding box of voxels != 0 in any channel (nnU-Net's crop-to-nonzero, :func:`nonzero_bbox`
   and :func:`crop`; the label too; the fingerprint crops the same way);
3. resample to the plan's target spacing (images spline order 3, labels one-hot order 1 + arg-max,
   anisotropic data with the thick axis separately at order 0; see :mod:`medseg_jax.data.resample`);
   a ``null`` target entry (2D plans: the slice axis) keeps the case's own spacing;
4. optional denoising, then optional CLAHE, both on the raw intensities (HU for CT) so their settings
   mean the same for every case (:mod:`medseg_jax.data.intensity`);
5. normalisation per channel (``ct`` / ``zscore`` / ``hu_window``), last, so nothing after it changes
   the intensity scale the network sees. (nnU-Net normalises before resampling; normalising after it
   also clips the spline overshoot of order-3 resampling.)

Plans imported from nnU-Net (:mod:`medseg_jax.nnunet.preprocessing`) reproduce nnU-Net's own steps
instead: ``plan["orientation"]`` replaces 1 by a permutation of the file's (or RAS) voxel axes,
``preprocessing.normalize_before_resampling`` moves 5 before 3 (``zscore`` with ``use_mask`` then
normalises inside the non-zero mask, holes filled, as nnU-Net's ``use_mask_for_norm``), and
``resampling.clip_to_input_range`` clips each resize to its input's range (scikit-image's ``resize``).

:func:`restore_geometry` undoes 3, 2 and 1 for a network output so it lands on the original file's grid.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.ndimage import binary_fill_holes

from medseg_jax.cascade import is_cascade, mask_input
from medseg_jax.data.image_io import read_case, read_nifti
from medseg_jax.data.intensity import clahe, denoise, normalize_channel
from medseg_jax.data.plan import check_plan
from medseg_jax.data.resample import resample_image, resample_label, resample_probabilities
from medseg_jax.data.volume import Volume, from_ras, permute_axes, to_ras
from medseg_jax.errors import ConfigError, DataError, MedsegError
from medseg_jax.process_pool import map_in_processes


def nonzero_bbox(image: np.ndarray) -> list[list[int]]:
    """``[[start, stop], ...]`` per spatial axis of the voxels != 0 in any channel of ``image (C, *spatial)``.

    An image without any nonzero voxel keeps its full extent.
    """
    mask = np.any(image != 0, axis=0)
    if not mask.any():
        return [[0, int(n)] for n in mask.shape]
    bbox = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        bbox.append([int(hits[0]), int(hits[-1]) + 1])
    return bbox


def crop(array: np.ndarray, bbox: Sequence[Sequence[int]]) -> np.ndarray:
    """The ``bbox`` region of the trailing (spatial) axes of ``array``."""
    region = tuple(slice(start, stop) for start, stop in bbox)
    return array[(Ellipsis,) + region]


def _intensity_window(scheme: dict) -> tuple[float, float] | None:
    """The raw-intensity range CLAHE works in: the HU window, the CT percentiles, or the image's range."""
    if scheme["scheme"] == "hu_window":
        return scheme["lower"], scheme["upper"]
    if scheme["scheme"] == "ct":
        return scheme["percentile_00_5"], scheme["percentile_99_5"]
    return None


def _grid_affine(affine: np.ndarray, start, scale) -> np.ndarray:
    """Affine of a grid whose voxel ``o`` lies at voxel ``start + (o + 0.5) * scale - 0.5`` of ``affine``'s grid."""
    start = np.zeros(3) + np.pad(np.asarray(start, dtype=np.float64), (0, 3 - len(start)))
    scale = np.ones(3) + np.pad(np.asarray(scale, dtype=np.float64) - 1, (0, 3 - len(scale)))
    step = np.eye(4)
    step[:3, :3] = np.diag(scale)
    step[:3, 3] = start + 0.5 * scale - 0.5
    return affine @ step


def _source(volume: Volume) -> str:
    return str(volume.metadata.get("source", "<in-memory volume>"))


def orient(volume: Volume, orientation: dict | None) -> Volume:
    """A volume in the plan's voxel order: RAS (``orientation`` None), or ``orientation["axes"]`` of the
    ``"file"``'s voxel axes or of the ``"ras"`` axes (plans imported from nnU-Net). Exact."""
    if orientation is None:
        return to_ras(volume)
    if volume.array.ndim != 3:
        raise DataError(f"{_source(volume)}: a plan with an axis order needs 3D images, got shape {volume.shape}")
    frame = volume if orientation["frame"] == "file" else to_ras(volume)
    return permute_axes(frame, orientation["axes"])


def unorient(volume: Volume, orientation: dict | None, original_affine, original_shape) -> Volume:
    """Undo :func:`orient` for a volume on the oriented grid: the original file's voxel order and affine."""
    if orientation is not None:
        volume = permute_axes(volume, np.argsort(orientation["axes"]))
        if orientation["frame"] == "file":
            if volume.shape != tuple(original_shape):
                raise DataError(f"volume of shape {volume.shape} does not match the original {tuple(original_shape)}")
            return Volume(volume.array, np.asarray(original_affine, dtype=np.float64), dict(volume.metadata))
    return from_ras(volume, original_affine, original_shape)


def nonzero_mask(image: np.ndarray) -> np.ndarray:
    """Where any channel of ``image (C, *spatial)`` is != 0, holes filled (nnU-Net's ``create_nonzero_mask``;
    the region ``use_mask_for_norm`` normalises)."""
    return binary_fill_holes(np.any(image != 0, axis=0))


def _normalize(image: np.ndarray, plan: dict, spacing) -> np.ndarray:
    """Denoise, CLAHE and normalise every channel of ``image (C, *spatial)`` as the plan says."""
    options = plan["preprocessing"]
    mask = nonzero_mask(image) if any(s.get("use_mask") for s in plan["normalization"]) else None
    channels = []
    for c, scheme in enumerate(plan["normalization"]):
        x = image[c]
        if options["denoise"] is not None:
            x = denoise(x, options["denoise"], spacing, in_plane_only=plan["dim"] == 2)
        if options["clahe"] is not None:
            x = clahe(x, options["clahe"], _intensity_window(scheme))
        channels.append(normalize_channel(x, scheme, mask=mask))
    return np.stack(channels).astype(np.float32)


def preprocess_case(images: list[Volume], label: Volume | None, plan: dict, previous_stage: Volume | None = None):
    """Preprocess one case: ``(image float32 (C, *spatial), label uint8 (*spatial) or None, properties)``.

    A cascade plan (:mod:`medseg_jax.cascade`) needs ``previous_stage``, the 3d_lowres label map on the
    scans' grid: it is preprocessed as the label and appended to the image as one mask per foreground class.

    ``images`` holds one volume per channel in the plan's channel order (same grid). ``properties`` is
    JSON-able: ``original_shape`` / ``original_affine`` (file voxel order), ``ras_shape`` / ``ras_affine``,
    ``crop_bbox`` (``[[start, stop], ...]`` in RAS voxels), ``shape_after_crop``, ``spacing_original``
    (RAS order), ``spacing_target``, ``shape_after_resample``, ``affine_preprocessed`` (voxel -> RAS mm of
    the returned arrays) and ``num_channels``.
    """
    check_plan(plan)
    if len(images) != len(plan["channel_names"]):
        raise DataError(
            f"{_source(images[0]) if images else 'case'}: {len(images)} channel volume(s) given, "
            f"the plan expects {len(plan['channel_names'])} ({plan['channel_names']})"
        )
    orientation = plan.get("orientation")
    ras = [orient(v, orientation) for v in images]
    label_ras = orient(label, orientation) if label is not None else None
    shapes = {v.shape for v in ras} | ({label_ras.shape} if label_ras is not None else set())
    if len(shapes) != 1:
        raise DataError(f"{_source(images[0])}: channel / label shapes differ after reorientation: {sorted(shapes)}")
    spacing = ras[0].spacing
    if len(plan["target_spacing"]) != len(spacing):
        raise DataError(
            f"{_source(images[0])}: a {len(spacing)}D image does not fit a plan with target spacing "
            f"{plan['target_spacing']}"
        )
    target = [s if t is None else float(t) for s, t in zip(spacing, plan["target_spacing"])]

    stack = np.stack([v.array.astype(np.float32) for v in ras])
    bbox = nonzero_bbox(stack)
    image = crop(stack, bbox)
    shape_after_crop = image.shape[1:]
    resampling = plan.get("resampling", {})
    # nnU-Net normalises on the cropped grid and then resamples; medseg-jax's own plans normalise last
    early = bool(plan["preprocessing"].get("normalize_before_resampling"))
    if early:
        image = _normalize(image, plan, spacing)
    image = resample_image(
        image,
        spacing,
        target,
        order=resampling.get("image_order", 3),
        clip=bool(resampling.get("clip_to_input_range")),
    )
    new_shape = image.shape[1:]
    if not early:
        image = _normalize(image, plan, target)

    def label_on_grid(volume: Volume) -> np.ndarray:
        label_array = crop(volume.array, bbox)
        values = np.unique(label_array)
        if values.min() < 0 or values.max() >= plan["num_classes"] or np.any(values != np.round(values)):
            raise DataError(
                f"{_source(volume)}: label values {values.tolist()} are outside 0..{plan['num_classes'] - 1}"
            )
        return resample_label(
            label_array.astype(np.uint8), spacing, target, order=resampling.get("label_order", 1), new_shape=new_shape
        )

    label_out = None if label_ras is None else label_on_grid(label_ras)
    if is_cascade(plan):
        if previous_stage is None:
            raise DataError(
                f"{_source(images[0])}: the plan is a 3d_cascade_fullres plan; its input needs the 3d_lowres "
                "prediction of the case (the previous stage)"
            )
        previous = orient(previous_stage, orientation)
        if previous.shape != ras[0].shape or not np.allclose(previous.affine, ras[0].affine, atol=1e-3):
            raise DataError(
                f"{_source(previous_stage)}: the previous stage's label map (shape {previous_stage.shape}) is not on "
                f"the grid of the scan {_source(images[0])} (shape {images[0].shape})"
            )
        image = np.concatenate([image, mask_input(label_on_grid(previous), plan)])

    ras_affine = ras[0].affine
    properties = {
        "original_shape": list(images[0].shape),
        "original_affine": images[0].affine.tolist(),
        "ras_shape": list(ras[0].shape),
        "ras_affine": ras_affine.tolist(),
        "crop_bbox": bbox,
        "shape_after_crop": list(shape_after_crop),
        "spacing_original": list(spacing),
        "spacing_target": target,
        "shape_after_resample": list(new_shape),
        "affine_preprocessed": _grid_affine(
            ras_affine, [b[0] for b in bbox], np.divide(shape_after_crop, new_shape)
        ).tolist(),
        "num_channels": len(images),
    }
    if orientation is not None:  # restore_geometry undoes the plan's axis order instead of RAS
        properties["orientation"] = orientation
    return image, label_out, properties


def restore_geometry(array: np.ndarray, properties: dict, kind: str | None = None, background: bool = True):
    """Bring a preprocessed-grid array back to the original file's grid (undo resample, crop, reorientation).

    ``array``: ``(*spatial)`` or ``(K, *spatial)`` on the preprocessed grid (``shape_after_resample``).
    ``kind`` (default inferred): ``"label"`` (integer / bool ``(*spatial)``: one-hot order-1 resampling +
    arg-max, zero outside the crop box), ``"image"`` (float ``(*spatial)``: order 3, zero outside),
    ``"probabilities"`` (``(K, *spatial)``: order 1, outside the crop box background probability 1, i.e.
    channel 0 = 1 and the others 0), ``"logits"`` (``(K, *spatial)``: order 1 as nnU-Net resamples logits;
    outside the crop box 0 for class 0 and -inf for the others, so their softmax is background 1). Returns a
    :class:`~medseg_jax.data.Volume` with the original shape and affine, or for probabilities and logits a
    list of K such volumes (one per class). ``background=False``: channel 0 of ``array`` is not the
    background class (one class at a time, as the memory-bounded prediction maps them), so for
    probabilities it too is 0 outside the crop box, for logits -inf.
    """
    crop_shape = tuple(properties["shape_after_crop"])
    ndim = len(crop_shape)
    if kind is None:
        if array.ndim == ndim + 1:
            kind = "probabilities"
        else:
            kind = "label" if np.issubdtype(array.dtype, np.integer) or array.dtype == bool else "image"
    per_class = kind in ("probabilities", "logits")
    spatial = array.shape[1:] if per_class else array.shape
    if list(spatial) != list(properties["shape_after_resample"]):
        raise DataError(
            f"restore_geometry: array spatial shape {tuple(spatial)} is not the preprocessed shape "
            f"{tuple(properties['shape_after_resample'])}"
        )
    target, original = properties["spacing_target"], properties["spacing_original"]
    ras_shape = tuple(properties["ras_shape"])
    region = tuple(slice(start, stop) for start, stop in properties["crop_bbox"])
    if kind == "label":
        back = resample_label(array, target, original, order=1, new_shape=crop_shape)
        full = np.zeros(ras_shape, dtype=back.dtype)
    elif kind == "image":
        back = resample_image(array[None].astype(np.float32), target, original, order=3, new_shape=crop_shape)[0]
        full = np.zeros(ras_shape, dtype=np.float32)
    elif kind == "probabilities":
        back = resample_probabilities(array.astype(np.float32), target, original, new_shape=crop_shape)
        full = np.zeros((array.shape[0],) + ras_shape, dtype=np.float32)
        full[0] = 1.0 if background else 0.0
    elif kind == "logits":  # resampled as nnU-Net resamples logits; outside the box softmax gives background 1
        back = resample_probabilities(array.astype(np.float32), target, original, new_shape=crop_shape)
        full = np.full((array.shape[0],) + ras_shape, -np.inf, dtype=np.float32)
        full[0] = 0.0 if background else -np.inf
    else:
        raise DataError(f"restore_geometry: kind must be 'label', 'image', 'probabilities' or 'logits', got {kind!r}")
    full[(Ellipsis,) + region] = back
    ras_affine = np.asarray(properties["ras_affine"])
    original_affine = np.asarray(properties["original_affine"])
    original_shape = tuple(properties["original_shape"])

    def to_original(values):
        return unorient(Volume(values, ras_affine), properties.get("orientation"), original_affine, original_shape)

    if per_class:
        return [to_original(channel) for channel in full]
    return to_original(full)


# What per-case work may raise on a bad input file: our own errors, and nibabel's / numpy's on odd data.
CASE_ERRORS = (MedsegError, OSError, ValueError, ArithmeticError)


def case_error(case_id: str, image_paths, label_path, exc: Exception) -> DataError:
    """A DataError naming the case and its files around ``exc`` (per-case work in fingerprint and preprocess)."""
    files = [str(p) for p in image_paths] + ([] if label_path is None else [f"label {label_path}"])
    return DataError(f"case {case_id} ({', '.join(files)}): {exc}")


def _preprocess_job(case_id: str, image_paths, label_path, plan: dict, previous_stage_path=None):
    """Read and preprocess one case (module level so worker processes can run it)."""
    try:
        images, label = read_case(image_paths, label_path)
        previous = None if previous_stage_path is None else read_nifti(previous_stage_path)
        image, label_out, properties = preprocess_case(images, label, plan, previous)
    except CASE_ERRORS as exc:
        raise case_error(case_id, image_paths, label_path, exc) from exc
    if previous_stage_path is not None:
        properties["previous_stage_file"] = str(Path(previous_stage_path).resolve())
    properties["case_id"] = case_id
    # where the case came from: the final validation of a fold compares with the label as the dataset holds
    # it (on the scan's own grid), not with the resampled copy in the store
    properties["image_files"] = [str(Path(p).resolve()) for p in image_paths]
    properties["label_file"] = None if label_path is None else str(Path(label_path).resolve())
    return case_id, image, label_out, properties


def check_shard(index: int, count: int) -> None:
    """A shard is ``INDEX/COUNT`` with ``0 <= INDEX < COUNT``: refuse anything else before any work."""
    if isinstance(index, bool) or isinstance(count, bool) or not isinstance(index, int) or not isinstance(count, int):
        raise ConfigError(f"shard {index!r}/{count!r}: INDEX and COUNT must be integers")
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"shard {index}/{count}: needs COUNT >= 1 and 0 <= INDEX < COUNT (e.g. 0/4 ... 3/4)")


def shard_cases(cases: Sequence, index: int, count: int) -> list:
    """The cases of shard ``index`` of ``count``: every ``count``-th by position in case-id order.

    Sorting first makes the split the same on every host whatever order each listed the dataset in,
    and the shards are disjoint and together cover every case.
    """
    check_shard(index, count)
    ordered = sorted(cases, key=lambda case: case.case_id)
    return ordered[index::count]


def preprocess_dataset(
    dataset,
    plan: dict,
    store,
    num_workers: int = 1,
    progress: bool = True,
    shard: tuple[int, int] = (0, 1),
    previous_stage: dict | None = None,
) -> dict:
    """Preprocess the cases of ``dataset`` (of one shard) not yet in ``store`` (resumable); returns a summary.

    ``store`` is a :class:`~medseg_jax.data.store.CaseStore`. The plan is recorded in it first
    (:meth:`~medseg_jax.data.store.CaseStore.write_plan`, which refuses a store made with another plan,
    and lets several processes record the same plan at once). Workers only compute, the calling process
    writes, so each case is written whole or not at all. With ``num_workers > 1`` cases run in worker
    processes (:func:`medseg_jax.process_pool.map_in_processes`). A failing case raises ``DataError``
    naming it and its files (after the cases already in flight are written); run again to resume.

    ``shard = (INDEX, COUNT)`` preprocesses only :func:`shard_cases` ``(cases, INDEX, COUNT)``, so
    COUNT processes (hosts, SLURM array tasks) share a dataset, each with its own INDEX. An unsharded
    run (COUNT 1) that ends with every case present also writes the store's index
    (:meth:`~medseg_jax.data.store.CaseStore.finalize`); sharded runs leave that to ``preprocess
    --finalize`` once all shards are done, as no shard knows when the others finish.

    ``previous_stage`` (a cascade plan, :func:`medseg_jax.cascade.bind_previous_stage`): ``{case: the 3d_lowres
    prediction's file}``; a case without one is a DataError before anything is written.

    Summary: ``{"written": n, "skipped": n, "seconds": s, "cases": cases of this shard,
    "indexed": whether the index was written}``.
    """
    from tqdm.auto import tqdm

    check_plan(plan)
    index, count = shard
    mine = shard_cases(dataset.cases, index, count)  # checks the shard before anything is written
    previous_stage = previous_stage or {}
    if is_cascade(plan):
        lacking = [c.case_id for c in mine if c.case_id not in previous_stage]
        if lacking:
            raise DataError(
                f"the previous stage predicted no {', '.join(lacking[:5])}"
                f"{' ...' if len(lacking) > 5 else ''} ({len(lacking)} case(s)): the 3d_lowres cross-validation "
                "must be of this dataset"
            )
    started = time.perf_counter()
    store.write_plan(plan)  # before any case: a resumed store can then refuse another plan
    missing = set(store.missing_cases([c.case_id for c in mine]))
    todo = [c for c in mine if c.case_id in missing]
    jobs = [
        (
            c.case_id,
            [str(p) for p in c.image_paths],
            None if c.label_path is None else str(c.label_path),
            plan,
            None if c.case_id not in previous_stage else str(previous_stage[c.case_id]),
        )
        for c in todo
    ]
    written = 0
    with tqdm(total=len(jobs), desc="preprocess", unit="case", disable=not progress) as bar:
        for result in map_in_processes(_preprocess_job, jobs, num_workers):
            store.write_case(*result)
            written += 1
            bar.update(1)
    indexed = count == 1
    if indexed:
        store.finalize([c.case_id for c in dataset.cases], plan)
    return {
        "written": written,
        "skipped": len(mine) - len(todo),
        "seconds": round(time.perf_counter() - started, 3),
        "cases": len(mine),
        "indexed": indexed,
    }
