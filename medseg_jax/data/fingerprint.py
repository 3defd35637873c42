"""Dataset fingerprint (spacings, shapes, foreground intensities) and the plan derived from it.

The fingerprint follows nnU-Net v2's ``DatasetFingerprintExtractor``: every case is reoriented to RAS
(``io.to_ras``) and cropped to the bounding box of its *nonzero* voxels over all channels (the rule is
``image != 0`` as in nnU-Net; raw CT with -1024 HU air therefore rarely shrinks, while skull-stripped MR
or pre-masked scans do). From the cropped case it records spacing, shape, shape after crop, the label
values present and up to ``samples_per_case`` foreground intensities per channel (voxels with label > 0,
drawn without replacement from a generator seeded by ``(seed, case index)`` so results do not depend on
worker scheduling). The pooled samples give per-channel mean, std, median, min, max and the 0.5 / 99.5
percentiles (``np.percentile``, linear interpolation) used by CT normalisation.

The plan (:func:`make_plan`, rules in :mod:`medseg_jax.data.plan`) is a plain JSON dict.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medseg_jax.data import io
from medseg_jax.data.plan import PLAN_FORMAT_VERSION, check_plan, make_plan  # noqa: F401  (public API)
from medseg_jax.atomic import write_json_atomic
from medseg_jax.errors import DataError

FINGERPRINT_FORMAT_VERSION = 1
_PERCENTILES = {"percentile_00_5": 0.5, "percentile_99_5": 99.5}


def read_case(image_paths: Sequence[str | os.PathLike], label_path: str | os.PathLike | None,
              case_id: str = "") -> tuple[list[io.Volume], io.Volume | None]:
    """Read a case's channel volumes and optional label (NIfTI files or DICOM folders), checking shapes agree."""
    images = [io.read_image(p) for p in image_paths]
    label = io.read_image(label_path) if label_path is not None else None
    shapes = {tuple(v.shape) for v in images} | ({tuple(label.shape)} if label is not None else set())
    if len(shapes) != 1:
        raise DataError(f"case {case_id}: channel and label shapes differ {sorted(shapes)} "
                        f"({', '.join(str(p) for p in image_paths)}, label {label_path})")
    return images, label


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


def case_fingerprint(images: Sequence[io.Volume], label: io.Volume | None, samples_per_case: int,
                     rng: np.random.Generator) -> tuple[dict, list[np.ndarray]]:
    """Fingerprint of one case: ``(record, samples)``.

    ``record`` (JSON-able): spacing and shape in RAS order, shape after crop, label values present.
    ``samples``: per channel a 1D float64 array of up to ``samples_per_case`` foreground intensities.
    """
    images = [io.to_ras(v) for v in images]
    stack = np.stack([v.array for v in images])
    bbox = nonzero_bbox(stack)
    cropped = crop(stack, bbox)
    samples = [np.zeros(0) for _ in images]
    labels_present: list[int] = []
    if label is not None:
        label_array = crop(io.to_ras(label).array, bbox)
        labels_present = [int(v) for v in np.unique(label_array)]
        foreground = label_array > 0
        for c, channel in enumerate(cropped):
            values = channel[foreground].astype(np.float64)
            if values.size > samples_per_case:
                values = rng.choice(values, samples_per_case, replace=False)
            samples[c] = values
    record = {
        "spacing": [float(s) for s in images[0].spacing],
        "shape": [int(n) for n in stack.shape[1:]],
        "shape_after_crop": [int(n) for n in cropped.shape[1:]],
        "labels_present": labels_present,
    }
    return record, samples


def intensity_statistics(samples: np.ndarray) -> dict | None:
    """Mean, std, median, min, max and 0.5 / 99.5 percentiles of pooled samples (``None`` when empty)."""
    if samples.size == 0:
        return None
    stats = {"mean": float(np.mean(samples)), "std": float(np.std(samples)), "median": float(np.median(samples)),
             "min": float(np.min(samples)), "max": float(np.max(samples))}
    for key, q in _PERCENTILES.items():
        stats[key] = float(np.percentile(samples, q))
    stats["num_samples"] = int(samples.size)
    return stats


def _fingerprint_job(index: int, case_id: str, image_paths, label_path, samples_per_case: int, seed: int):
    """One case's fingerprint from its files (module level so worker processes can run it)."""
    images, label = read_case(image_paths, label_path, case_id)
    rng = np.random.default_rng([seed, index])
    record, samples = case_fingerprint(images, label, samples_per_case, rng)
    return {"case_id": case_id, **record}, samples


def compute_fingerprint(dataset, num_workers: int = 1, samples_per_case: int = 10000, seed: int = 1234) -> dict:
    """Fingerprint of a :class:`~medseg_jax.data.dataset.Dataset` (see the module docstring).

    Returns a JSON-able dict with ``cases`` (per-case records), ``spacings`` and ``shapes_after_crop``
    (RAS order), ``foreground_intensity_properties_per_channel`` (keyed by channel index as a string,
    ``None`` for a channel without any foreground sample), ``labels_present`` (union over cases),
    ``channel_names``, ``labels``, ``dataset_name``. ``num_workers > 1`` reads cases in worker processes.
    """
    jobs = [(i, c.case_id, [str(p) for p in c.image_paths], None if c.label_path is None else str(c.label_path),
             samples_per_case, seed) for i, c in enumerate(dataset.cases)]
    if not jobs:
        raise DataError(f"dataset {dataset.root}: no cases to fingerprint")
    if num_workers > 1:
        # "spawn" keeps workers free of any JAX state the parent process may hold.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as pool:
            results = list(pool.map(_fingerprint_job, *zip(*jobs)))
    else:
        results = [_fingerprint_job(*job) for job in jobs]
    records = [r for r, _ in results]
    num_channels = len(dataset.channel_names)
    pooled = [np.concatenate([s[c] for _, s in results]) for c in range(num_channels)]
    return {
        "fingerprint_format_version": FINGERPRINT_FORMAT_VERSION,
        "dataset_name": dataset.name,
        "channel_names": list(dataset.channel_names),
        "labels": {str(k): int(v) for k, v in dataset.labels.items()},
        "num_cases": len(records),
        "samples_per_case": samples_per_case,
        "seed": seed,
        "cases": records,
        "spacings": [r["spacing"] for r in records],
        "shapes_after_crop": [r["shape_after_crop"] for r in records],
        "labels_present": sorted({v for r in records for v in r["labels_present"]}),
        "foreground_intensity_properties_per_channel": {str(c): intensity_statistics(pooled[c])
                                                        for c in range(num_channels)},
    }


def save_json(obj, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON atomically (numpy values converted)."""
    return write_json_atomic(path, obj)


def load_json(path: str | os.PathLike) -> dict:
    """Read a JSON object from ``path`` (``DataError`` naming the file when missing or malformed)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def load_plan(path: str | os.PathLike) -> dict:
    """Read and validate a plan JSON; a missing or malformed entry raises ``DataError`` naming it and the file."""
    plan = load_json(path)
    check_plan(plan, source=str(path))
    return plan
