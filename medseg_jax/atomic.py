"""Atomic file writes, and the JSON reader that goes with the JSON writer.

Writes go to a temporary name in the target's folder, then are renamed over the target: a reader (or a
run killed mid-write) sees either the old file or the complete new one, never a part.

JSON is written strictly (``allow_nan=False``): NaN and infinity are not JSON, and other tools reject
files holding them. Values that may legitimately be NaN or infinite (metrics of empty masks) go
through :func:`json_safe` first, which writes them as ``null`` and ``"inf"``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from medseg_jax.errors import DataError


def _create_temporary(folder: Path, suffix: str) -> Path:
    """Create a new empty file with a random hidden name in ``folder`` and return its path.

    Created with mode 0o666 filtered by the process umask, exactly as a plain ``open(path, "w")``
    would, so the final file gets the usual permissions without reading (and so briefly changing) the
    umask. ``tempfile.mkstemp`` would make it 0o600.
    """
    while True:
        path = folder / f".tmp-{secrets.token_hex(8)}{suffix}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on normal exit rename it to ``path``, on error delete it.

    ``suffix`` defaults to the target's (libraries such as nibabel pick the format from it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    tmp = _create_temporary(path.parent, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_new_folder(path: str | os.PathLike, what: str = "folder") -> Path:
    """``path`` as a Path when it does not exist or is an empty folder; DataError otherwise."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise DataError(f"--out {path} exists and is not an empty folder; choose a new {what}")
    return path


@contextlib.contextmanager
def staged_folder(path: str | os.PathLike, what: str = "folder") -> Iterator[Path]:
    """A temporary folder beside ``path`` to fill; renamed to ``path`` when the block ends without
    error, removed on any error -- a failed write leaves nothing. ``path`` must not exist or be an
    empty folder, before and after (:func:`check_new_folder`)."""
    path = check_new_folder(path, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".tmp-{path.name}-{secrets.token_hex(6)}"
    staging.mkdir()
    try:
        yield staging
        check_new_folder(path, what)  # nothing appeared there meanwhile
        if path.exists():
            path.rmdir()
        staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _json_default(value):
    """``json.dumps`` fallback for numpy scalars and arrays."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (numpy values converted) atomically.

    NaN or infinite numbers raise ``ValueError`` naming ``path`` and nothing is written; pass
    :func:`json_safe` ``(obj)`` where they are legitimate values.
    """
    return write_text_atomic(path, json_text(obj, source=str(path)))


def json_text(obj: Any, source: str = "JSON") -> str:
    """``obj`` as the indented, strict JSON text (numpy values converted, trailing newline) files get.

    NaN or infinite numbers raise ``ValueError`` naming ``source``.
    """
    try:
        text = json.dumps(obj, indent=2, default=_json_default, allow_nan=False)
    except ValueError as exc:
        raise ValueError(
            f"{source}: {exc} (NaN or infinity; write json_safe(value) where they are legitimate)"
        ) from exc
    return text + "\n"


def json_safe(value: Any) -> Any:
    """``value`` with NaN -> None and ±inf -> "inf" / "-inf", recursively through dicts, lists and tuples."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return float(value)
    return value


_JSON_NAMES = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}


def read_json(path: str | os.PathLike, expect: type | None = None) -> Any:
    """Parse a JSON file; ``DataError`` naming the file if it is missing, unreadable or not JSON.

    ``expect`` (e.g. ``dict``): the type the top-level value must have, also a ``DataError`` otherwise.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot be read ({exc})") from exc
    return parse_json(text, str(path), expect)


def parse_json(text: str, source: str, expect: type | None = None) -> Any:
    """Parse JSON ``text`` read from ``source`` (a file, or a key of a store); errors as :func:`read_json`'s."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{source}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if expect is not None and not isinstance(value, expect):
        raise DataError(
            f"{source}: expected a JSON {_JSON_NAMES.get(expect, expect.__name__)}, "
            f"found {_JSON_NAMES.get(type(value), type(value).__name__)}"
        )
    return value
