"""What one preprocessed case is, wherever it is stored: its id, its arrays, its record, its class locations.

The case store (:mod:`medseg_jax.data.store`) checks a case with these before it touches the store
(:func:`check_case_id`, :func:`check_case_arrays`), computes the foreground voxels the loader samples
patches around (:func:`compute_class_locations`), and checks each case's record (``complete.json``, or
its entry in ``index.json``) when it reads it back (:func:`check_case_record`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from medseg_jax.errors import DataError

# nnU-Net's foreground sampling: up to 10000 voxels per class, at least 1% of the class, fixed seed.
MAX_LOCATIONS_PER_CLASS = 10000
MIN_LOCATION_COVERAGE = 0.01
LOCATIONS_SEED = 1234


def check_case_id(case_id: str) -> None:
    """Case ids become key prefixes: refuse anything that could escape the store, hide, or meet a store file."""
    if (
        not isinstance(case_id, str)
        or not case_id
        or case_id != case_id.strip()
        or case_id.startswith(".")
        or case_id.endswith(".json")
        or any(c in case_id for c in "/\\\0")
    ):
        raise DataError(
            f"invalid case id {case_id!r}: must be a non-empty name without '/', '\\', a leading '.' "
            "or a '.json' ending"
        )


def compute_class_locations(
    label: np.ndarray,
    max_per_class: int = MAX_LOCATIONS_PER_CLASS,
    min_coverage: float = MIN_LOCATION_COVERAGE,
    seed: int = LOCATIONS_SEED,
) -> dict[int, np.ndarray]:
    """Random voxel coordinates of each non-zero class of ``label`` (*spatial), as in nnU-Net.

    Per class present: ``max(min(max_per_class, n), ceil(n * min_coverage))`` distinct voxels out of
    its ``n``, drawn with a fixed seed (the same label gives the same locations). Returns
    ``{class: int32 array (k, ndim)}``, coordinates sorted in C order; absent classes are left out.
    """
    flat_fg = np.flatnonzero(label)  # one pass over the volume; classes are split among fg voxels only
    values = label.reshape(-1)[flat_fg]
    rng = np.random.default_rng(seed)
    locations = {}
    for cls in np.unique(values):
        members = flat_fg[values == cls]
        count = max(min(max_per_class, members.size), math.ceil(members.size * min_coverage))
        chosen = np.sort(rng.choice(members, size=count, replace=False))
        locations[int(cls)] = np.stack(np.unravel_index(chosen, label.shape), axis=1).astype(np.int32)
    return locations


def check_case_record(value: Any, where: str) -> dict:
    """A case's ``complete.json`` (or its entry in the index), validated."""
    shape = value.get("shape") if isinstance(value, dict) else None
    if (
        not isinstance(shape, list)
        or len(shape) not in (2, 3)
        or not all(isinstance(n, int) and n >= 1 for n in shape)
        or not isinstance(value.get("channels"), int)
        or value["channels"] < 1
        or value.get("zarr_format") not in (2, 3)
    ):
        raise DataError(
            f"{where}: damaged case record {value!r} (expected shape, channels and zarr_format); "
            "preprocess the case again"
        )
    return {"shape": shape, "channels": value["channels"], "zarr_format": value["zarr_format"]}


def check_case_arrays(case_id: str, image, label) -> tuple[np.ndarray, np.ndarray]:
    """``image`` as float32 (C, *spatial) and ``label`` as uint8 (*spatial; zeros for None), checked."""
    image = np.asarray(image)
    if image.ndim not in (3, 4):
        raise DataError(
            f"case {case_id!r}: image must be (C, *spatial) with 2 or 3 spatial axes, got shape {image.shape}"
        )
    if label is None:
        label = np.zeros(image.shape[1:], np.uint8)
    label = np.asarray(label)
    if label.shape != image.shape[1:]:
        raise DataError(
            f"case {case_id!r}: label shape {label.shape} does not match image spatial shape {image.shape[1:]}"
        )
    if not np.issubdtype(label.dtype, np.integer) and not np.issubdtype(label.dtype, np.bool_):
        raise DataError(f"case {case_id!r}: label must hold integers, got dtype {label.dtype}")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise DataError(f"case {case_id!r}: label values must lie in [0, 255], got [{label.min()}, {label.max()}]")
    image = image.astype(np.float32, copy=False)
    if not np.isfinite(image).all():
        raise DataError(f"case {case_id!r}: image contains NaN or infinite values")
    return image, label.astype(np.uint8, copy=False)
