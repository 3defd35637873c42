"""Preprocessed cases in a key-value store: one chunked zarr array per image and label, read patch by patch.

Where the store lives (a local folder, or a ``gs://``, ``s3://`` or ``memory://`` URL) and how its keys
are read and written is :mod:`medseg_jax.data.kvstore`'s; this module says what the keys hold.

Layout (keys under the store's root; on local files, folders and files)::

    plan.json                  the plan every case was preprocessed with (recorded before the first case)
    index.json                 written once every case is in (``medseg-jax preprocess --finalize``)
    {case_id}/
      image.zarr/              float32 (C, *spatial), chunks (1, 64, 64, 64) by default
      label.zarr/              uint8   (*spatial), same spatial chunks
      properties.json          what preprocessing recorded (geometry to undo, statistics, ...)
      class_locations.npz      per foreground class, up to ~10000 voxel coordinates (n, ndim) int32
      complete.json            written LAST: {"shape", "channels", "zarr_format"}

**A case is present exactly when its ``complete.json`` exists**, on every kind of store. Object stores
have no rename, so a case cannot be published by moving a finished folder into place; instead every
key of a case is written first and the small marker last. A write that dies half-way leaves keys
without a marker: the case stays absent (listing, :meth:`CaseStore.has_case` and reading all ask for
the marker), and the next write of that case clears them first. Replacing a case removes its marker
before anything else. (Stores written before the marker existed hold case folders without it, which
cannot be told from killed writes: they read as empty, and preprocessing into them again rewrites
every case in place.)

``index.json`` lists the cases with their shapes and channels and the plan's hash. Listing a bucket
without it means listing every key of the store (all chunks), so ``--finalize`` is recommended there;
on local files listing is a look at the top folder and the index only saves little. Any
:meth:`CaseStore.write_case` deletes the index first, so an index that exists is never stale.

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
of mixing cases of two plans. Several processes (hosts, SLURM array tasks) may preprocess into one store
at once, each its own cases: the plan is created only if absent (a conditional write), so the first
records it and the others compare theirs with it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import zipfile
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import tensorstore as ts

from medseg_jax.atomic import json_text, parse_json
from medseg_jax.data.case_content import check_case_arrays, check_case_id, check_case_record
from medseg_jax.data.case_content import compute_class_locations as compute_class_locations  # re-exported for callers
from medseg_jax.data.kvstore import ZARR_DRIVERS, KeyValueRoot, array_spec, open_array, zarr3_supported
from medseg_jax.data.kvstore import parse_location as parse_location  # re-exported for callers
from medseg_jax.data.plan import check_plan, plan_differences
from medseg_jax.errors import DataError

PLAN_NAME = "plan.json"
INDEX_NAME = "index.json"
IMAGE_NAME = "image.zarr"
LABEL_NAME = "label.zarr"
PROPERTIES_NAME = "properties.json"
LOCATIONS_NAME = "class_locations.npz"
MARKER_NAME = "complete.json"
INDEX_FORMAT = 1

# Chunk edge per spatial axis, chosen so that a float32 chunk is about 1 MiB in 3D and 2D.
DEFAULT_CHUNK_EDGE = {2: 512, 3: 64}


def _plan_hash(plan: dict) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class CaseStore(KeyValueRoot):
    """A store of preprocessed cases (see the module docstring for the layout and what "present" means).

    Args:
      path: a local folder (``str`` or path; created by the first write) or a store URL
        (``gs://bucket/path``, ``s3://bucket/path``, ``memory://name``, ``file:///folder``).
      chunk_shape: spatial chunk shape for new cases (default 64 per axis in 3D, 512 in 2D, clipped
        to the case). The channel axis is chunked by 1.
      zarr_format: 3 (default where tensorstore supports it) or 2 for new cases.

    Opened arrays are cached per process; the object pickles to its location and settings only, so it
    can be sent to data-loading worker processes, which reopen it: that works for local folders and
    buckets. A ``memory://`` store lives in its process's memory: every CaseStore of that process
    with the same URL shares it, but a worker process sees an empty store. Writing the same case from
    two processes at once is not supported; different cases from several processes are.
    """

    KIND = "case store"

    def __init__(
        self,
        path: str | os.PathLike,
        chunk_shape: Sequence[int] | None = None,
        zarr_format: int | None = None,
    ):
        super().__init__(path)
        self._location = path
        if zarr_format is None:
            zarr_format = 3 if zarr3_supported() else 2
        if zarr_format not in (2, 3):
            raise DataError(f"case store {self.path}: zarr_format must be 2 or 3, got {zarr_format!r}")
        if chunk_shape is not None and (len(chunk_shape) not in (2, 3) or min(chunk_shape) < 1):
            raise DataError(f"case store {self.path}: chunk_shape must be 2 or 3 positive ints, got {chunk_shape!r}")
        self.chunk_shape = None if chunk_shape is None else tuple(int(c) for c in chunk_shape)
        self.zarr_format = zarr_format

    def _forget_handles(self) -> None:
        super()._forget_handles()
        self._arrays: dict[tuple[str, str], ts.TensorStore] = {}
        self._markers: dict[str, dict] = {}

    def __getstate__(self):
        return {"path": self._location, "chunk_shape": self.chunk_shape, "zarr_format": self.zarr_format}

    def __setstate__(self, state):
        self.__init__(**state)

    def __repr__(self):
        return f"CaseStore({str(self.path)!r})"

    # ----------------------------------------------------------------------------------- the plan

    def read_plan(self) -> dict:
        """The plan the store's cases were preprocessed with (``plan.json``), validated."""
        where = self.location(PLAN_NAME)
        plan = self._read_json(PLAN_NAME, expect=dict)
        if plan is None:
            raise DataError(f"{where}: the store has no plan; preprocess with `medseg-jax preprocess` (it writes it)")
        check_plan(plan, source=where)
        return plan

    def _refuse_other_plan(self, recorded: dict, plan: dict) -> None:
        differences = plan_differences(recorded, plan)
        if differences:
            raise DataError(
                f"{self.location(PLAN_NAME)}: the store was preprocessed with another plan (differing in "
                f"{', '.join(differences)}); use a new output folder"
            )

    def write_plan(self, plan: dict) -> str:
        """Record ``plan`` as the store's plan, before any case is written with it; returns its location.

        Recording the same plan again does nothing, also when several processes record it at once (the
        first creates ``plan.json``, the others find it and compare). A store that already has another
        plan, or holds cases without a plan (left by an interrupted run of a version that wrote the plan
        last), is refused with a :class:`DataError`: continuing it would mix cases preprocessed two ways.
        """
        where = self.location(PLAN_NAME)
        check_plan(plan, source=where)
        recorded = self._read_json(PLAN_NAME, expect=dict)
        if recorded is None and self._holds_cases():
            recorded = self._read_json(PLAN_NAME, expect=dict)  # another process may have recorded it meanwhile
            if recorded is None:
                raise DataError(
                    f"case store {self.path}: holds {len(self.case_ids())} case(s) but no {PLAN_NAME}, so "
                    "the plan they were preprocessed with is unknown; use a new output folder"
                )
        if recorded is None and not self._create(PLAN_NAME, json_text(plan, source=where).encode()):
            recorded = self._read_json(PLAN_NAME, expect=dict)  # another process recorded its plan first
        if recorded is not None:
            check_plan(recorded, source=where)
            self._refuse_other_plan(recorded, plan)
        return where

    def _holds_cases(self) -> bool:
        if self._folder is not None and not self._folder.is_dir():
            return False
        return bool(self.case_ids())

    # ----------------------------------------------------------------------------------- writing

    def write_case(self, case_id: str, image: np.ndarray, label: np.ndarray | None, properties: dict[str, Any]) -> str:
        """Store one case; an existing case of that id is replaced. Returns the case's location.

        Args:
          image: (C, *spatial) intensities, stored as float32.
          label: (*spatial) integer class map with values in [0, 255] (stored as uint8), or None for
            an unlabelled case (stored as all zeros, no class locations).
          properties: JSON-serialisable metadata, returned by :meth:`read_properties`.

        Everything is checked before the store is touched. Then the store's index and the case's
        marker are deleted (the case is absent from here on), its old keys and any leftovers of a killed
        write are cleared, the arrays, properties and class locations are written, and the marker last:
        a crash at any point never leaves a case that reads as present but is incomplete.
        """
        check_case_id(case_id)
        image, label = check_case_arrays(case_id, image, label)
        try:
            properties_data = json.dumps(properties, indent=2, allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise DataError(f"case {case_id!r}: properties are not JSON-serialisable ({exc})") from exc
        chunks = self._chunks(label.shape)
        buffer = io.BytesIO()
        locations = compute_class_locations(label)
        # allow_pickle spelled out (its default) so type checkers do not match the arrays to it.
        np.savez(buffer, allow_pickle=True, **{f"class_{c}": v for c, v in locations.items()})
        marker = {"shape": list(label.shape), "channels": int(image.shape[0]), "zarr_format": self.zarr_format}

        prefix = f"{case_id}/"
        self._unpublish(case_id)
        try:
            kv = self._kv()
            pending: list[ts.WriteFutures | ts.Future] = [
                self._create_array(case_id, IMAGE_NAME, image.shape, "float32", (1, *chunks)).write(image),
                self._create_array(case_id, LABEL_NAME, label.shape, "uint8", chunks).write(label),
                kv.write(prefix + LOCATIONS_NAME, buffer.getvalue()),
                kv.write(prefix + PROPERTIES_NAME, properties_data),
            ]
            for future in pending:
                try:
                    future.result()
                except ValueError as exc:
                    raise DataError(f"case {case_id!r} in case store {self.path}: write failed ({exc})") from exc
            self._write(prefix + MARKER_NAME, json_text(marker).encode())  # last: now the case exists
        except BaseException:
            with contextlib.suppress(Exception):
                self._delete_tree(prefix)
            raise
        self._markers[case_id] = marker
        return self.location(case_id)

    def _unpublish(self, case_id: str) -> None:
        """Make the case absent, then remove whatever it had (old version, or keys of a killed write)."""
        self._arrays.pop((case_id, IMAGE_NAME), None)
        self._arrays.pop((case_id, LABEL_NAME), None)
        self._markers.pop(case_id, None)
        self._write(INDEX_NAME, None)  # the index would list the store as it was
        self._write(f"{case_id}/{MARKER_NAME}", None)
        self._delete_tree(f"{case_id}/")

    def _chunks(self, spatial_shape) -> tuple[int, ...]:
        ndim = len(spatial_shape)
        wanted = self.chunk_shape or (DEFAULT_CHUNK_EDGE[ndim],) * ndim
        if len(wanted) != ndim:
            raise DataError(f"case store {self.path}: chunk_shape {wanted} does not fit {ndim}D cases")
        return tuple(max(1, min(c, s)) for c, s in zip(wanted, spatial_shape))

    def _create_array(self, case_id: str, name: str, shape, dtype: str, chunks) -> ts.TensorStore:
        spec = array_spec(self._kvstore_at(f"{case_id}/{name}/"), shape, dtype, chunks, self.zarr_format)
        return open_array(spec, f"case {case_id!r} in case store {self.path}: cannot create {name}")

    # ----------------------------------------------------------------------------------- finalizing

    def finalize(self, case_ids: Iterable[str], plan: dict | None = None) -> dict:
        """Check that every case of ``case_ids`` is present, then write ``index.json``; returns the index.

        Run once after all processes preprocessing into the store are done (``medseg-jax preprocess
        --finalize``). A missing case is a :class:`DataError` naming it, and nothing is written. ``plan``
        (optional) must equal the store's recorded plan. The index lists exactly ``case_ids``.
        """
        recorded = self.read_plan()
        if plan is not None:
            self._refuse_other_plan(recorded, plan)
        ids = sorted(set(case_ids))
        for case_id in ids:
            check_case_id(case_id)
        keys = [f"{case_id}/{MARKER_NAME}" for case_id in ids]
        values = self._read_many(keys)
        missing = [case_id for case_id, value in zip(ids, values) if value is None]
        if missing:
            shown = ", ".join(missing[:20]) + (f", ... ({len(missing) - 20} more)" if len(missing) > 20 else "")
            raise DataError(
                f"case store {self.path}: {len(missing)} of {len(ids)} case(s) not preprocessed yet: {shown}; "
                "run `medseg-jax preprocess` for them (every --shard) before --finalize"
            )
        cases = {}
        for case_id, key, value in zip(ids, keys, values):
            assert value is not None
            where = self.location(key)
            cases[case_id] = check_case_record(parse_json(value.decode("utf-8", "replace"), where, dict), where)
        index = {"index_format": INDEX_FORMAT, "plan_sha256": _plan_hash(recorded), "cases": cases}
        self._write(INDEX_NAME, json_text(index, source=self.location(INDEX_NAME)).encode())
        return index

    def read_index(self) -> dict | None:
        """``index.json`` (validated), or None when the store has not been finalized since its last write."""
        where = self.location(INDEX_NAME)
        index = self._read_json(INDEX_NAME, expect=dict)
        if index is None:
            return None
        if index.get("index_format") != INDEX_FORMAT or not isinstance(index.get("cases"), dict):
            raise DataError(
                f"{where}: not an index this version reads (index_format {INDEX_FORMAT} with a 'cases' "
                "object); delete it and run `medseg-jax preprocess --finalize` again"
            )
        index["cases"] = {case_id: check_case_record(entry, where) for case_id, entry in index["cases"].items()}
        return index

    # ----------------------------------------------------------------------------------- reading

    def _marker(self, case_id: str) -> dict:
        """The case's ``complete.json``; a :class:`DataError` when the case is not (completely) stored."""
        check_case_id(case_id)
        self._reopen_after_fork()
        if case_id not in self._markers:
            self._require_store()
            key = f"{case_id}/{MARKER_NAME}"
            value = self._read_json(key)
            if value is None:
                raise DataError(f"case {case_id!r} not found in case store {self.path}")
            self._markers[case_id] = check_case_record(value, self.location(key))
        return self._markers[case_id]

    def _case_file(self, case_id: str, name: str) -> tuple[bytes, str]:
        self._marker(case_id)
        key = f"{case_id}/{name}"
        data = self._read(key)
        if data is None:
            raise DataError(f"case {case_id!r} in case store {self.path}: {name} is missing; preprocess the case again")
        return data, self.location(key)

    def _array(self, case_id: str, name: str) -> ts.TensorStore:
        marker = self._marker(case_id)
        key = (case_id, name)
        if key not in self._arrays:
            driver = ZARR_DRIVERS[marker["zarr_format"]]
            spec = {"driver": driver, "kvstore": self._kvstore_at(f"{case_id}/{name}/"), "open": True}
            self._arrays[key] = open_array(spec, f"case {case_id!r} in case store {self.path}: cannot open {name}")
        return self._arrays[key]

    def has_case(self, case_id: str) -> bool:
        """Whether a complete case of that id is stored (its ``complete.json`` exists)."""
        return not self.missing_cases([case_id])

    def missing_cases(self, case_ids: Iterable[str]) -> list[str]:
        """The ids among ``case_ids`` that are not completely stored, in order (markers read concurrently)."""
        self._reopen_after_fork()
        ids = list(case_ids)
        for case_id in ids:
            check_case_id(case_id)
        unknown = [case_id for case_id in ids if case_id not in self._markers]
        found = self._read_many([f"{case_id}/{MARKER_NAME}" for case_id in unknown])
        absent = {case_id for case_id, value in zip(unknown, found) if value is None}
        return [case_id for case_id in ids if case_id in absent]

    def case_ids(self) -> list[str]:
        """Sorted ids of the present cases: from ``index.json`` when there is one, else by listing markers."""
        self._require_store()
        index = self.read_index()
        if index is not None:
            self._markers.update(index["cases"])
            return sorted(index["cases"])
        return self._folders_holding(MARKER_NAME)  # on a bucket, every key of the store: finalize to avoid it

    def read_properties(self, case_id: str) -> dict[str, Any]:
        """The properties dict given to :meth:`write_case`."""
        data, where = self._case_file(case_id, PROPERTIES_NAME)
        return parse_json(data.decode("utf-8", "replace"), where, expect=dict)

    def case_shape(self, case_id: str) -> tuple[int, ...]:
        """Spatial shape of the case (without the channel axis)."""
        return tuple(self._marker(case_id)["shape"])

    def case_channels(self, case_id: str) -> int:
        return int(self._marker(case_id)["channels"])

    @property
    def num_channels(self) -> int:
        """Number of image channels (read from the first case; every case of a store has the same)."""
        ids = self.case_ids()
        if not ids:
            raise DataError(f"case store {self.path}: holds no cases")
        return self.case_channels(ids[0])

    def class_locations(self, case_id: str) -> dict[int, np.ndarray]:
        """``{class: int32 (n, ndim) voxel coordinates}`` for each foreground class present."""
        data, where = self._case_file(case_id, LOCATIONS_NAME)
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                return {int(key.removeprefix("class_")): npz[key] for key in npz.files}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise DataError(f"{where}: unreadable class locations ({exc})") from exc

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
        read, so the cost is a few chunks, not the volume.
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
