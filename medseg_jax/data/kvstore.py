"""Where a store's bytes live and how they are read and written: the key-value layer under the case store.

A store lives in a local folder (a path, or a ``file://`` URL), or in any key-value store tensorstore
opens from a URL: ``gs://bucket/path`` (Google Cloud Storage), ``s3://bucket/path`` (Amazon S3 and
compatible), ``memory://name`` (in the process's memory; for tests). Every read and write goes through
tensorstore's key-value layer (``ts.KvStore``), so the same code serves all of them.

:class:`KeyValueRoot` is the root of one such store: it reads keys (several in one round trip), writes
and deletes single keys (atomic on every store), creates a key only if it is absent (a conditional
write, for records several processes may race to make), deletes everything under a prefix, and lists.
Chunked arrays under its keys are zarr v2 or v3 (:func:`array_spec`), blosc-compressed, opened in the
process's one tensorstore context. What the keys mean (cases, markers, the plan, the index) is
:mod:`medseg_jax.data.store`'s.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence
from pathlib import Path, PurePath
from typing import Any

import tensorstore as ts

from medseg_jax.atomic import json_text, parse_json
from medseg_jax.errors import DataError

# lz4 with byte shuffle: fast to decompress (reads are on the training path) and shrinks labels and
# the zero background of images well.
_BLOSC = {"cname": "lz4", "clevel": 5, "shuffle": "shuffle"}
ZARR_DRIVERS = {2: "zarr", 3: "zarr3"}

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# pathlib folds the "//" of a URL into "/" (Path("gs://b/x") is "gs:/b/x"): a store location that went
# through an argparse ``type=Path`` is recognised and unfolded for the schemes a store can live at.
_FOLDED_URL = re.compile(r"(gs|s3|memory|file):/(?!/)")

# One tensorstore context per process: memory:// stores live in a context, so every store object of the
# process must share it to see each other's data; a forked or spawned worker makes its own.
_CONTEXT: tuple[int, ts.Context] | None = None


def _context() -> ts.Context:
    global _CONTEXT
    if _CONTEXT is None or _CONTEXT[0] != os.getpid():
        _CONTEXT = (os.getpid(), ts.Context())
    return _CONTEXT[1]


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


def zarr3_supported() -> bool:
    """Whether the installed tensorstore has the zarr v3 driver."""
    try:
        ts.Spec({"driver": "zarr3", "kvstore": "memory://"})
    except ValueError:
        return False
    return True


def array_spec(kvstore: dict, shape, dtype: str, chunks, zarr_format: int) -> dict:
    """The tensorstore spec that creates a blosc-compressed zarr array of ``dtype`` (float32 or uint8)."""
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


def open_array(spec: dict, failure: str) -> ts.TensorStore:
    """Open (or create, as ``spec`` says) an array in the process's context; ``failure`` starts the error."""
    try:
        return ts.open(spec, context=_context()).result()
    except ValueError as exc:
        raise DataError(f"{failure} ({exc})") from exc


class KeyValueRoot:
    """The root of a key-value store at a local folder or URL (see the module docstring).

    The store is opened lazily, once per process: handles do not survive a fork and are reopened in the
    new process. Messages name the store as ``"{KIND} {path}"``.
    """

    KIND = "store"

    def __init__(self, location: str | os.PathLike):
        self._folder, self._url = parse_location(location)
        self.path: Path | str = self._folder if self._folder is not None else str(self._url)
        if self._folder is not None and self._folder.exists() and not self._folder.is_dir():
            raise DataError(f"{self.KIND} {self.path}: exists and is not a folder")
        self._root_spec = self._kvstore_spec()  # refuses a URL tensorstore cannot open; nothing is read yet
        self._forget_handles()

    def _kvstore_spec(self) -> dict:
        """The tensorstore kvstore JSON spec of the store's root; its path ends with '/' (keys append to it)."""
        if self._folder is not None:
            return {"driver": "file", "path": os.path.abspath(self._folder) + "/"}
        try:
            spec = ts.KvStore.Spec(str(self._url)).to_json()
        except ValueError as exc:
            raise DataError(f"{self.KIND} {self.path}: not a store location tensorstore can open ({exc})") from None
        path = spec.get("path", "")
        spec["path"] = path if not path or path.endswith("/") else path + "/"
        return spec

    def _forget_handles(self) -> None:
        """Drop the open handles (subclasses drop theirs too); the next access reopens them."""
        self._pid = os.getpid()
        self._kv_handle: ts.KvStore | None = None

    def _reopen_after_fork(self) -> None:
        if self._pid != os.getpid():  # handles do not survive a fork: reopen in the new process
            self._forget_handles()

    def location(self, key: str = "") -> str:
        """Where ``key`` of the store lives, as a path or URL (for messages)."""
        if self._folder is not None:
            return str(self._folder / key) if key else str(self._folder)
        return f"{str(self._url).rstrip('/')}/{key}" if key else str(self._url)

    def _require_store(self) -> None:
        if self._folder is not None and not self._folder.is_dir():
            raise DataError(f"{self.KIND} {self.path}: folder does not exist")

    def _kv(self) -> ts.KvStore:
        self._reopen_after_fork()
        if self._kv_handle is None:
            try:
                self._kv_handle = ts.KvStore.open(self._root_spec, context=_context()).result()
            except ValueError as exc:
                raise DataError(f"{self.KIND} {self.path}: cannot be opened ({exc})") from exc
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

    def _folders_holding(self, name: str) -> list[str]:
        """Sorted names of the top-level folders that hold a key ``name`` (keys ``FOLDER/name``)."""
        if self._folder is not None:
            with os.scandir(self._folder) as entries:
                folders = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
            return sorted(e.name for e in folders if os.path.isfile(os.path.join(e.path, name)))
        # A bucket cannot list one level: every key of the store is listed.
        try:
            keys = [key.decode() for key in self._kv().list().result()]
        except ValueError as exc:
            raise DataError(f"{self.KIND} {self.path}: cannot be listed ({exc})") from exc
        suffix = "/" + name
        return sorted(key.removesuffix(suffix) for key in keys if key.endswith(suffix) and key.count("/") == 1)

    def read_json(self, name: str) -> Any:
        """A JSON document at the store's top level (e.g. training's ``splits.json``), or None if absent."""
        return self._read_json(name)

    def write_json(self, name: str, value: Any) -> str:
        """Write a JSON document at the store's top level (atomic on every store); returns its location."""
        if "/" in name or not name.endswith(".json"):
            raise DataError(f"{self.KIND} {self.path}: {name!r} is not a top-level .json name")
        self._write(name, json_text(value, source=self.location(name)).encode())
        return self.location(name)
