"""Preprocessed cases in a key-value store: one chunked zarr array per image and label, read patch by patch.

Where a store lives: a local folder (a path, or a ``file://`` URL), or any key-value store tensorstore
opens from a URL: ``gs://bucket/path`` (Google Cloud Storage), ``s3://bucket/path`` (Amazon S3 and
compatible), ``memory://name`` (in the process's memory; for tests). Every read and write goes through
tensorstore's key-value layer (``ts.KvStore``), so the same code serves all of them.

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
import math
import os
import re
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import tensorstore as ts

from medseg_jax.atomic import json_text, parse_json
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
# nnU-Net's foreground sampling: up to 10000 voxels per class, at least 1% of the class, fixed seed.
MAX_LOCATIONS_PER_CLASS = 10000
MIN_LOCATION_COVERAGE = 0.01
LOCATIONS_SEED = 1234

# lz4 with byte shuffle: fast to decompress (reads are on the training path) and shrinks labels and
# the zero background of images well.
_BLOSC = {"cname": "lz4", "clevel": 5, "shuffle": "shuffle"}

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# pathlib folds the "//" of a URL into "/" (Path("gs://b/x") is "gs:/b/x"): a store location that went
# through an argparse ``type=Path`` is recognised and unfolded for the schemes a store can live at.
_FOLDED_URL = re.compile(r"(gs|s3|memory|file):/(?!/)")

# One tensorstore context per process: memory:// stores live in a context, so every CaseStore of the
# process must share it to see each other's data; a forked or spawned worker makes its own.
_CONTEXT: tuple[int, ts.Context] | None = None


def _context() -> ts.Context:
    global _CONTEXT
    if _CONTEXT is None or _CONTEXT[0] != os.getpid():
        _CONTEXT = (os.getpid(), ts.Context())
    return _CONTEXT[1]


def _check_case_id(case_id: str) -> None:
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


def parse_location(location: str | os.PathLike) -> tuple[Path | None, str | None]:
    """``(folder, None)`` for a local store, ``(None, url)`` for a store tensorstore opens from a URL."""
    text = str(os.fspath(location))
    if isinstance(location, PurePath) and _FOLDED_URL.match(text):
        text = text.replace(":/", "://", 1)
    if text.startswith("file://"):
        return Path(text.removeprefix("file://")), None
    if _URL.match(text):
        return None, text
    return Path(text), None


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


def _array_spec(kvstore: dict, shape, dtype: str, chunks, zarr_format: int) -> dict:
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


def _check_marker(value: Any, where: str) -> dict:
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


def _plan_hash(plan: dict) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class CaseStore:
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

    def __init__(
        self,
        path: str | os.PathLike,
        chunk_shape: Sequence[int] | None = None,
        zarr_format: int | None = None,
    ):
        self._location = path
        self._folder, self._url = parse_location(path)
        self.path: Path | str = self._folder if self._folder is not None else str(self._url)
        if self._folder is not None and self._folder.exists() and not self._folder.is_dir():
            raise DataError(f"case store {self.path}: exists and is not a folder")
        if zarr_format is None:
            zarr_format = 3 if zarr3_supported() else 2
        if zarr_format not in (2, 3):
            raise DataError(f"case store {self.path}: zarr_format must be 2 or 3, got {zarr_format!r}")
        if chunk_shape is not None and (len(chunk_shape) not in (2, 3) or min(chunk_shape) < 1):
            raise DataError(f"case store {self.path}: chunk_shape must be 2 or 3 positive ints, got {chunk_shape!r}")
        self.chunk_shape = None if chunk_shape is None else tuple(int(c) for c in chunk_shape)
        self.zarr_format = zarr_format
        self._root_spec = self._kvstore_spec()
        self._forget_handles()

    def _kvstore_spec(self) -> dict:
        """The tensorstore kvstore JSON spec of the store's root; its path ends with '/' (keys append to it)."""
        if self._folder is not None:
            return {"driver": "file", "path": os.path.abspath(self._folder) + "/"}
        try:
            spec = ts.KvStore.Spec(str(self._url)).to_json()
        except ValueError as exc:
            raise DataError(f"case store {self.path}: not a store location tensorstore can open ({exc})") from None
        path = spec.get("path", "")
        spec["path"] = path if not path or path.endswith("/") else path + "/"
        return spec

    def _forget_handles(self) -> None:
        self._pid = os.getpid()
        self._kv_handle: ts.KvStore | None = None
        self._arrays: dict[tuple[str, str], ts.TensorStore] = {}
        self._markers: dict[str, dict] = {}

    def __getstate__(self):
        return {"path": self._location, "chunk_shape": self.chunk_shape, "zarr_format": self.zarr_format}

    def __setstate__(self, state):
        self.__init__(**state)

    def __repr__(self):
        return f"CaseStore({str(self.path)!r})"

    def location(self, key: str = "") -> str:
        """Where ``key`` of the store lives, as a path or URL (for messages)."""
        if self._folder is not None:
            return str(self._folder / key) if key else str(self._folder)
        return f"{str(self._url).rstrip('/')}/{key}" if key else str(self._url)

    # ------------------------------------------------------------------------------- key-value access

    def _kv(self) -> ts.KvStore:
        if self._pid != os.getpid():  # handles do not survive a fork: reopen in the new process
            self._forget_handles()
        if self._kv_handle is None:
            try:
                self._kv_handle = ts.KvStore.open(self._root_spec, context=_context()).result()
            except ValueError as exc:
                raise DataError(f"case store {self.path}: cannot be opened ({exc})") from exc
        return self._kv_handle

    def _kvstore_at(self, prefix: str) -> dict:
        return {**self._root_spec, "path": self._root_spec["path"] + prefix}

    def _read_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """The values of ``keys`` (None where absent), read concurrently (one round trip on a bucket)."""
        kv = self._kv()
        futures = [kv.read(key) for key in keys]
        values: list[bytes | None] = []
        for key, future in zip(keys, futures):
            try:
                result = future.result()
            except ValueError as exc:
                raise DataError(f"{self.location(key)}: cannot be read ({exc})") from exc
            values.append(result.value if result.state == "value" else None)
        return values

    def _read(self, key: str) -> bytes | None:
        return self._read_many([key])[0]

    def _read_json(self, key: str, expect: type | None = None) -> Any:
        """The parsed JSON value of ``key``, or None when the key is absent."""
        data = self._read(key)
        if data is None:
            return None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{self.location(key)}: cannot be read ({exc})") from exc
        return parse_json(text, self.location(key), expect)

    def _write(self, key: str, data: bytes | None) -> None:
        """Write (or with None delete) one key; a single key's write is atomic on every store."""
        try:
            self._kv().write(key, data).result()
        except ValueError as exc:
            action = "deleted" if data is None else "written"
            raise DataError(f"{self.location(key)}: cannot be {action} ({exc})") from exc

    def _create(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if it does not exist yet (conditional write); False when it already did."""
        kv = self._kv()
        try:
            current = kv.read(key).result()
            if current.state == "value":
                return False
            stamp = kv.write(key, data, if_equal=current.stamp.generation).result()
        except ValueError as exc:
            raise DataError(f"{self.location(key)}: cannot be written ({exc})") from exc
        return bool(stamp.generation)  # an empty generation: another writer created it first

    def _delete_tree(self, prefix: str) -> None:
        """Delete every key under ``prefix`` (which ends with '/')."""
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        try:
            self._kv().delete_range(ts.KvStore.KeyRange(inclusive_min=prefix, exclusive_max=end)).result()
        except ValueError as exc:
            raise DataError(f"{self.location(prefix)}: cannot be deleted ({exc})") from exc
        if self._folder is not None:  # the file driver leaves the emptied top folder behind
            with contextlib.suppress(OSError):
                (self._folder / prefix).rmdir()

    def read_json(self, name: str) -> Any:
        """A JSON document at the store's top level (e.g. training's ``splits.json``), or None if absent."""
        return self._read_json(name)

    def write_json(self, name: str, value: Any) -> str:
        """Write a JSON document at the store's top level (atomic on every store); returns its location."""
        if "/" in name or not name.endswith(".json"):
            raise DataError(f"case store {self.path}: {name!r} is not a top-level .json name")
        self._write(name, json_text(value, source=self.location(name)).encode())
        return self.location(name)

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
        _check_case_id(case_id)
        image, label = self._check_arrays(case_id, image, label)
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

    def _create_array(self, case_id: str, name: str, shape, dtype: str, chunks) -> ts.TensorStore:
        spec = _array_spec(self._kvstore_at(f"{case_id}/{name}/"), shape, dtype, chunks, self.zarr_format)
        try:
            return ts.open(spec, context=_context()).result()
        except ValueError as exc:
            raise DataError(f"case {case_id!r} in case store {self.path}: cannot create {name} ({exc})") from exc

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
            _check_case_id(case_id)
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
            cases[case_id] = _check_marker(parse_json(value.decode("utf-8", "replace"), where, dict), where)
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
        index["cases"] = {case_id: _check_marker(entry, where) for case_id, entry in index["cases"].items()}
        return index

    # ----------------------------------------------------------------------------------- reading

    def _require_store(self) -> None:
        if self._folder is not None and not self._folder.is_dir():
            raise DataError(f"case store {self.path}: folder does not exist")

    def _marker(self, case_id: str) -> dict:
        """The case's ``complete.json``; a :class:`DataError` when the case is not (completely) stored."""
        _check_case_id(case_id)
        if self._pid != os.getpid():
            self._forget_handles()
        if case_id not in self._markers:
            self._require_store()
            key = f"{case_id}/{MARKER_NAME}"
            value = self._read_json(key)
            if value is None:
                raise DataError(f"case {case_id!r} not found in case store {self.path}")
            self._markers[case_id] = _check_marker(value, self.location(key))
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
            driver = "zarr3" if marker["zarr_format"] == 3 else "zarr"
            spec = {"driver": driver, "kvstore": self._kvstore_at(f"{case_id}/{name}/"), "open": True}
            try:
                self._arrays[key] = ts.open(spec, context=_context()).result()
            except ValueError as exc:
                raise DataError(f"case {case_id!r} in case store {self.path}: cannot open {name} ({exc})") from exc
        return self._arrays[key]

    def has_case(self, case_id: str) -> bool:
        """Whether a complete case of that id is stored (its ``complete.json`` exists)."""
        return not self.missing_cases([case_id])

    def missing_cases(self, case_ids: Iterable[str]) -> list[str]:
        """The ids among ``case_ids`` that are not completely stored, in order (markers read concurrently)."""
        if self._pid != os.getpid():
            self._forget_handles()
        ids = list(case_ids)
        for case_id in ids:
            _check_case_id(case_id)
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
        if self._folder is not None:
            with os.scandir(self._folder) as entries:
                folders = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
            return sorted(e.name for e in folders if os.path.isfile(os.path.join(e.path, MARKER_NAME)))
        # A bucket cannot list one level: every key of the store is listed (finalize to avoid this).
        try:
            keys = [key.decode() for key in self._kv().list().result()]
        except ValueError as exc:
            raise DataError(f"case store {self.path}: cannot be listed ({exc})") from exc
        suffix = "/" + MARKER_NAME
        return sorted(key.removesuffix(suffix) for key in keys if key.endswith(suffix) and key.count("/") == 1)

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
