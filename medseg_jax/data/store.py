"""Preprocessed cases on disk: one chunked zarr array per image and label, read patch by patch.

Layout of a store folder (one sub-folder per case; a case folder that exists is complete)::

    store/
      plan.json                the plan every case was preprocessed with (written before the first case)
      {case_id}/
        image.zarr/            float32 (C, *spatial), chunks (1, 64, 64, 64) by default
        label.zarr/            uint8   (*spatial), same spatial chunks
        properties.json        what preprocessing recorded (geometry to undo, statistics, ...)
        class_locations.npz    per foreground class, up to ~10000 voxel coordinates (n, ndim) int32
      .tmp-{case_id}-{hex}/    a write in progress (or killed): ignored, removed by the next write

Arrays are zarr v3 (tensorstore's ``zarr3`` driver) unless ``zarr_format=2`` is asked for; both are
read back whatever the store was created with. Chunks are small enough that a training patch touches
only a few of them: :meth:`CaseStore.read_patch` reads the intersection of the patch with the case
through tensorstore, never the whole volume.

Spatial axes keep the preprocessing's RAS voxel order (x, y, z); z is last. For 2D training on 3D
cases pass a ``chunk_shape`` whose last entry is 1 (e.g. ``(128, 128, 1)``): a slice then reads only
its own chunks instead of 64 neighbouring slices.

The plan is recorded first (:meth:`CaseStore.write_plan`, called by
:func:`medseg_jax.data.preprocess.preprocess_dataset` before any case), so a store resumed after an
interruption can tell whether it is being continued with the same plan, and refuses another one instead
of mixing cases of two plans.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

from medseg_jax.atomic import read_json
from medseg_jax.data.plan import plan_differences, read_plan, write_plan
from medseg_jax.errors import DataError

PLAN_NAME = "plan.json"
IMAGE_NAME = "image.zarr"
LABEL_NAME = "label.zarr"
PROPERTIES_NAME = "properties.json"
LOCATIONS_NAME = "class_locations.npz"
TMP_PREFIX = ".tmp-"

# Chunk edge per spatial axis, chosen so that a float32 chunk is about 1 MiB in 3D and 2D.
DEFAULT_CHUNK_EDGE = {2: 512, 3: 64}
# nnU-Net's foreground sampling: up to 10000 voxels per class, at least 1% of the class, fixed seed.
MAX_LOCATIONS_PER_CLASS = 10000
MIN_LOCATION_COVERAGE = 0.01
LOCATIONS_SEED = 1234

# lz4 with byte shuffle: fast to decompress (reads are on the training path) and shrinks labels and
# the zero background of images well.
_BLOSC = {"cname": "lz4", "clevel": 5, "shuffle": "shuffle"}


def _check_case_id(case_id: str) -> None:
    """Case ids become folder names: refuse anything that could escape the store or hide as a temp."""
    if (
        not isinstance(case_id, str)
        or not case_id
        or case_id != case_id.strip()
        or case_id.startswith(".")
        or any(c in case_id for c in "/\\\0")
    ):
        raise DataError(f"invalid case id {case_id!r}: must be a non-empty name without '/', '\\' or a leading '.'")


def _tmp_pattern(case_id: str) -> re.Pattern:
    # The 32-hex suffix keeps case "a" from matching the temp folder of case "a-b".
    return re.compile(re.escape(TMP_PREFIX + case_id + "-") + "[0-9a-f]{32}")


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


def _array_spec(path: Path, shape, dtype: str, chunks, zarr_format: int) -> dict:
    kvstore = {"driver": "file", "path": str(path)}
    if zarr_format == 3:
        metadata = {
            "shape": list(shape),
            "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
            "codecs": [
                {"name": "bytes", "configuration": {"endian": "little"}},
                {"name": "blosc", "configuration": _BLOSC},
            ],
        }
        return {"driver": "zarr3", "kvstore": kvstore, "metadata": metadata, "create": True}
    numpy_dtype = {"float32": "<f4", "uint8": "|u1"}[dtype]
    compressor = {"id": "blosc", "cname": _BLOSC["cname"], "clevel": _BLOSC["clevel"], "shuffle": 1}
    metadata = {"shape": list(shape), "chunks": list(chunks), "dtype": numpy_dtype, "compressor": compressor}
    return {"driver": "zarr", "kvstore": kvstore, "metadata": metadata, "create": True}


def zarr3_supported() -> bool:
    """Whether the installed tensorstore has the zarr v3 driver."""
    try:
        ts.Spec({"driver": "zarr3", "kvstore": "memory://"})
    except ValueError:
        return False
    return True


class CaseStore:
    """A folder of preprocessed cases (see the module docstring for the layout).

    Args:
      path: the store folder; created by the first :meth:`write_case`.
      chunk_shape: spatial chunk shape for new cases (default 64 per axis in 3D, 512 in 2D, clipped
        to the case). The channel axis is chunked by 1.
      zarr_format: 3 (default where tensorstore supports it) or 2 for new cases.

    Opened arrays are cached per process; the object pickles to its path and settings only, so it
    can be sent to data-loading worker processes. Writing the same case from two processes at once
    is not supported.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        chunk_shape: Sequence[int] | None = None,
        zarr_format: int | None = None,
    ):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise DataError(f"case store {self.path}: exists and is not a folder")
        if zarr_format is None:
            zarr_format = 3 if zarr3_supported() else 2
        if zarr_format not in (2, 3):
            raise DataError(f"case store {self.path}: zarr_format must be 2 or 3, got {zarr_format!r}")
        if chunk_shape is not None and (len(chunk_shape) not in (2, 3) or min(chunk_shape) < 1):
            raise DataError(f"case store {self.path}: chunk_shape must be 2 or 3 positive ints, got {chunk_shape!r}")
        self.chunk_shape = None if chunk_shape is None else tuple(int(c) for c in chunk_shape)
        self.zarr_format = zarr_format
        self._arrays: dict[tuple[str, str], ts.TensorStore] = {}

    def __getstate__(self):
        return {"path": self.path, "chunk_shape": self.chunk_shape, "zarr_format": self.zarr_format}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._arrays = {}

    def __repr__(self):
        return f"CaseStore({str(self.path)!r})"

    # ----------------------------------------------------------------------------------- the plan

    @property
    def plan_path(self) -> Path:
        return self.path / PLAN_NAME

    def read_plan(self) -> dict:
        """The plan the store's cases were preprocessed with (``plan.json``), validated."""
        if not self.plan_path.is_file():
            raise DataError(
                f"{self.plan_path}: the store has no plan; preprocess with `medseg-jax preprocess` (it writes it)"
            )
        return read_plan(self.plan_path)

    def write_plan(self, plan: dict) -> Path:
        """Record ``plan`` as the store's plan, before any case is written with it.

        Recording the same plan again does nothing. A store that already has another plan, or holds
        cases without a plan (left by an interrupted run of a version that wrote the plan last), is
        refused with a :class:`DataError`: continuing it would mix cases preprocessed two ways.
        """
        if self.plan_path.is_file():
            differences = plan_differences(self.read_plan(), plan)
            if differences:
                raise DataError(
                    f"{self.plan_path}: the store was preprocessed with another plan (differing in "
                    f"{', '.join(differences)}); use a new output folder"
                )
            return self.plan_path
        if self.path.is_dir() and self.case_ids():
            raise DataError(
                f"case store {self.path}: holds {len(self.case_ids())} case(s) but no {PLAN_NAME}, so "
                "the plan they were preprocessed with is unknown; use a new output folder"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        return write_plan(plan, self.plan_path)

    # ----------------------------------------------------------------------------------- writing

    def write_case(self, case_id: str, image: np.ndarray, label: np.ndarray | None, properties: dict[str, Any]) -> Path:
        """Store one case atomically; an existing case of that id is replaced.

        Args:
          image: (C, *spatial) intensities, stored as float32.
          label: (*spatial) integer class map with values in [0, 255] (stored as uint8), or None for
            an unlabelled case (stored as all zeros, no class locations).
          properties: JSON-serialisable metadata, returned by :meth:`read_properties`.

        Everything is written into ``.tmp-{case_id}-{hex}`` inside the store and renamed to
        ``{case_id}`` when complete, so a crash never leaves a case folder half written. Leftover
        temporary folders of this case (from a killed write) are removed first.
        """
        _check_case_id(case_id)
        image, label = self._check_arrays(case_id, image, label)
        try:
            properties_text = json.dumps(properties, indent=2, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise DataError(f"case {case_id!r}: properties are not JSON-serialisable ({exc})") from exc

        self.path.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers(case_id)
        tmp = self.path / f"{TMP_PREFIX}{case_id}-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            chunks = self._chunks(label.shape)
            writes = [
                self._create(tmp / IMAGE_NAME, image.shape, "float32", (1, *chunks)).write(image),
                self._create(tmp / LABEL_NAME, label.shape, "uint8", chunks).write(label),
            ]
            locations = compute_class_locations(label)
            # allow_pickle spelled out (its default) so type checkers do not match the arrays to it.
            np.savez(tmp / LOCATIONS_NAME, allow_pickle=True, **{f"class_{c}": v for c, v in locations.items()})
            (tmp / PROPERTIES_NAME).write_text(properties_text)
            for write in writes:
                write.result()
            self._publish(case_id, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.path / case_id

    def _check_arrays(self, case_id, image, label):
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

    def _chunks(self, spatial_shape) -> tuple[int, ...]:
        ndim = len(spatial_shape)
        wanted = self.chunk_shape or (DEFAULT_CHUNK_EDGE[ndim],) * ndim
        if len(wanted) != ndim:
            raise DataError(f"case store {self.path}: chunk_shape {wanted} does not fit {ndim}D cases")
        return tuple(max(1, min(c, s)) for c, s in zip(wanted, spatial_shape))

    def _create(self, path: Path, shape, dtype: str, chunks) -> ts.TensorStore:
        return ts.open(_array_spec(path, shape, dtype, chunks, self.zarr_format)).result()

    def _remove_leftovers(self, case_id: str) -> None:
        pattern = _tmp_pattern(case_id)
        for entry in self.path.iterdir():
            if pattern.fullmatch(entry.name):
                shutil.rmtree(entry, ignore_errors=True)

    def _publish(self, case_id: str, tmp: Path) -> None:
        """Rename the finished temporary folder to the case folder, replacing an older version."""
        final = self.path / case_id
        self._arrays.pop((case_id, IMAGE_NAME), None)
        self._arrays.pop((case_id, LABEL_NAME), None)
        if final.exists():
            # A directory cannot be renamed over a non-empty one: move the old version aside under a
            # temporary name (cleaned up like any leftover if we die here) before putting the new in.
            trash = self.path / f"{TMP_PREFIX}{case_id}-{uuid.uuid4().hex}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)

    # ----------------------------------------------------------------------------------- reading

    def _require_store(self) -> None:
        if not self.path.is_dir():
            raise DataError(f"case store {self.path}: folder does not exist")

    def _case_dir(self, case_id: str) -> Path:
        _check_case_id(case_id)
        self._require_store()
        case_dir = self.path / case_id
        if not case_dir.is_dir():
            raise DataError(f"case {case_id!r} not found in case store {self.path}")
        return case_dir

    def _array(self, case_id: str, name: str) -> ts.TensorStore:
        key = (case_id, name)
        if key not in self._arrays:
            path = self._case_dir(case_id) / name
            driver = "zarr3" if (path / "zarr.json").is_file() else "zarr"
            spec = {"driver": driver, "kvstore": {"driver": "file", "path": str(path)}, "open": True}
            try:
                self._arrays[key] = ts.open(spec).result()
            except ValueError as exc:
                raise DataError(f"case {case_id!r} in case store {self.path}: cannot open {name} ({exc})") from exc
        return self._arrays[key]

    def has_case(self, case_id: str) -> bool:
        """Whether a complete case of that id is stored."""
        _check_case_id(case_id)
        return (self.path / case_id).is_dir()

    def case_ids(self) -> list[str]:
        """Sorted ids of the complete cases (temporary folders of unfinished writes are skipped)."""
        self._require_store()
        return sorted(e.name for e in self.path.iterdir() if e.is_dir() and not e.name.startswith("."))

    def read_properties(self, case_id: str) -> dict[str, Any]:
        """The properties dict given to :meth:`write_case`."""
        return read_json(self._case_dir(case_id) / PROPERTIES_NAME, expect=dict)

    def case_shape(self, case_id: str) -> tuple[int, ...]:
        """Spatial shape of the case (without the channel axis)."""
        return tuple(int(s) for s in self._array(case_id, LABEL_NAME).shape)

    def case_channels(self, case_id: str) -> int:
        return int(self._array(case_id, IMAGE_NAME).shape[0])

    @property
    def num_channels(self) -> int:
        """Number of image channels (read from the first case; every case of a store has the same)."""
        ids = self.case_ids()
        if not ids:
            raise DataError(f"case store {self.path}: holds no cases")
        return self.case_channels(ids[0])

    def class_locations(self, case_id: str) -> dict[int, np.ndarray]:
        """``{class: int32 (n, ndim) voxel coordinates}`` for each foreground class present."""
        path = self._case_dir(case_id) / LOCATIONS_NAME
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {int(key.removeprefix("class_")): npz[key] for key in npz.files}
        except (OSError, ValueError) as exc:
            where = f"case {case_id!r} in case store {self.path}"
            raise DataError(f"{where}: unreadable {LOCATIONS_NAME} ({exc})") from exc

    def read_case(self, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        """The whole case: image float32 (C, *spatial) and label uint8 (*spatial)."""
        image, label = self._array(case_id, IMAGE_NAME).read(), self._array(case_id, LABEL_NAME).read()
        return image.result(), label.result()

    def read_patch(
        self, case_id: str, start: Sequence[int] | np.ndarray, size: Sequence[int] | np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The box ``[start, start + size)`` of a case: image float32 (C, *size), label uint8 (*size).

        ``start`` may be negative and the box may extend past the case: the outside is padded with 0
        in both image and label (label 0 is background; image 0 is the mean intensity after z-score
        normalisation, the padding nnU-Net uses too). Only the part of the box inside the case is
        read from disk, so the cost is a few chunks, not the volume.
        """
        image_ts, label_ts = self._array(case_id, IMAGE_NAME), self._array(case_id, LABEL_NAME)
        shape = np.asarray(label_ts.shape)
        start, size = np.asarray(start, dtype=np.int64), np.asarray(size, dtype=np.int64)
        if start.shape != shape.shape or size.shape != shape.shape or (size < 1).any():
            raise DataError(
                f"case {case_id!r} in case store {self.path}: patch start {start.tolist()} / size {size.tolist()} "
                f"must have {shape.size} entries (positive sizes) for a case of shape {tuple(shape.tolist())}"
            )
        image = np.zeros((image_ts.shape[0], *size.tolist()), np.float32)
        label = np.zeros(tuple(size.tolist()), np.uint8)
        lo, hi = np.maximum(start, 0), np.minimum(start + size, shape)
        if (hi <= lo).any():
            return image, label  # the box lies entirely outside the case
        source = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        target = tuple(slice(int(a), int(b)) for a, b in zip(lo - start, hi - start))
        image_read, label_read = image_ts[(slice(None), *source)].read(), label_ts[source].read()
        image[(slice(None), *target)] = image_read.result()
        label[target] = label_read.result()
        return image, label
