"""Dataset fingerprint (spacings, shapes, foreground intensities) and the plan derived from it.

The fingerprint follows nnU-Net v2's ``DatasetFingerprintExtractor``: every case is reoriented to RAS
(``volume.to_ras``) and cropped to the bounding box of its *nonzero* voxels over all channels (the rule is
``image != 0`` as in nnU-Net; raw CT with -1024 HU air therefore rarely shrinks, while skull-stripped MR
or pre-masked scans do). From the cropped case it records spacing, shape, shape after crop, the label
values present and up to ``samples_per_case`` foreground intensities per channel (voxels with label > 0,
drawn without replacement from a generator seeded by ``(seed, case index)`` so results do not depend on
worker scheduling). The pooled samples give per-channel mean, std, median, min, max and the 0.5 / 99.5
percentiles (``np.percentile``, linear interpolation) used by CT normalisation.

Every case is read with :func:`medseg_jax.data.image_io.read_case`, which refuses NaN or infinite voxels
(naming the file) before they can reach the statistics; any error while fingerprinting a case is a
:class:`DataError` naming the case and its files. The plan (:func:`medseg_jax.data.plan.make_plan`) is a
plain JSON dict.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medseg_jax.data.image_io import read_case
from medseg_jax.data.preprocess import CASE_ERRORS, case_error, crop, nonzero_bbox
from medseg_jax.data.volume import Volume, to_ras
from medseg_jax.errors import DataError
from medseg_jax.process_pool import map_in_processes

FINGERPRINT_FORMAT_VERSION = 1
_PERCENTILES = {"percentile_00_5": 0.5, "percentile_99_5": 99.5}


def case_fingerprint(
    images: Sequence[Volume], label: Volume | None, samples_per_case: int, rng: np.random.Generator
) -> tuple[dict, list[np.ndarray]]:
    """Fingerprint of one case: ``(record, samples)``.

    ``record`` (JSON-able): spacing and shape in RAS order, shape after crop, label values present.
    ``samples``: per channel a 1D float64 array of up to ``samples_per_case`` foreground intensities.
    """
    images = [to_ras(v) for v in images]
    stack = np.stack([v.array for v in images])
    bbox = nonzero_bbox(stack)
    cropped = crop(stack, bbox)
    samples = [np.zeros(0) for _ in images]
    labels_present: list[int] = []
    if label is not None:
        label_array = crop(to_ras(label).array, bbox)
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
    stats = {
        "mean": float(np.mean(samples)),
        "std": float(np.std(samples)),
        "median": float(np.median(samples)),
        "min": float(np.min(samples)),
        "max": float(np.max(samples)),
    }
    for key, q in _PERCENTILES.items():
        stats[key] = float(np.percentile(samples, q))
    stats["num_samples"] = int(samples.size)
    return stats


def _fingerprint_job(index: int, case_id: str, image_paths, label_path, samples_per_case: int, seed: int):
    """One case's fingerprint from its files (module level so worker processes can run it)."""
    try:
        images, label = read_case(image_paths, label_path)
        rng = np.random.default_rng([seed, index])
        record, samples = case_fingerprint(images, label, samples_per_case, rng)
    except CASE_ERRORS as exc:
        raise case_error(case_id, image_paths, label_path, exc) from exc
    return {"case_id": case_id, **record}, samples


def compute_fingerprint(dataset, num_workers: int = 1, samples_per_case: int = 10000, seed: int = 1234) -> dict:
    """Fingerprint of a :class:`~medseg_jax.data.dataset.Dataset` (see the module docstring).

    Returns a JSON-able dict with ``cases`` (per-case records), ``spacings`` and ``shapes_after_crop``
    (RAS order), ``foreground_intensity_properties_per_channel`` (keyed by channel index as a string,
    ``None`` for a channel without any foreground sample), ``labels_present`` (union over cases),
    ``channel_names``, ``labels``, ``dataset_name``. ``num_workers > 1`` reads cases in worker processes.
    """
    jobs = [
        (
            i,
            c.case_id,
            [str(p) for p in c.image_paths],
            None if c.label_path is None else str(c.label_path),
            samples_per_case,
            seed,
        )
        for i, c in enumerate(dataset.cases)
    ]
    if not jobs:
        raise DataError(f"dataset {dataset.root}: no cases to fingerprint")
    results = list(map_in_processes(_fingerprint_job, jobs, num_workers))
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
        "foreground_intensity_properties_per_channel": {
            str(c): intensity_statistics(pooled[c]) for c in range(num_channels)
        },
    }
