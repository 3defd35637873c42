"""Reading PyTorch ``.pth`` checkpoints without torch, and without letting them run code.

A ``.pth`` written by ``torch.save`` (zip format, torch >= 1.6) is a zip archive holding
``{archive}/data.pkl`` (a pickle of the saved object) and ``{archive}/data/{key}`` (the raw bytes of each
tensor storage, in the byte order named by ``{archive}/byteorder``). Unpickling calls whatever global the
pickle names, so an untrusted checkpoint could run any code when loaded with plain ``pickle`` or
``torch.load(weights_only=False)``. :func:`load_pth` unpickles with an allowlist instead
(:data:`ALLOWED_GLOBALS`): only what an nnU-Net checkpoint holds -- tensors (rebuilt here as numpy arrays
from the storage bytes), ordered dicts, plain containers, numpy scalars and dtypes, ``torch.device``
(kept as its string). Every other global is refused *before* it is looked up, with a
:class:`~medseg_jax.errors.DataError` naming the file and the global, so no code of the file runs.

Every allowed callable is harmless whatever its arguments: the tensor and storage rebuilders are this
module's own functions, ``_codecs.encode`` (how pickle protocol 2 writes ``bytes``) is replaced by one
that only decodes latin-1 text, and the numpy functions only build arrays, scalars and dtypes.
"""

from __future__ import annotations

import _compat_pickle
import collections
import dataclasses
import functools
import io
import pickle
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medseg_jax.errors import DataError


@dataclasses.dataclass(frozen=True)
class StorageType:
    """Stands in for a torch storage class (``torch.FloatStorage`` ...): the element dtype of a storage."""

    name: str
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class TorchDevice:
    """Stands in for ``torch.device`` (nnU-Net stores the training device in ``init_args``)."""

    spec: str


def _bfloat16() -> np.dtype:
    import ml_dtypes  # a dependency of jax, so always present where medseg-jax runs

    return np.dtype(ml_dtypes.bfloat16)


# torch's typed storage classes as pickled by torch.save, and the numpy dtype of their elements.
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": None,  # ml_dtypes.bfloat16, resolved on use
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "UntypedStorage": np.uint8,
}


def _storage_type(name: str) -> StorageType:
    dtype = _STORAGE_DTYPES[name]
    return StorageType(name, _bfloat16() if dtype is None else np.dtype(dtype))


def rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """``torch._utils._rebuild_tensor_v2`` for numpy: the strided view of ``storage`` (a 1-D array of the
    storage's elements) that the tensor was, copied into a new contiguous array. A view reaching beyond
    its storage (a damaged file) raises ``ValueError``."""
    del requires_grad, backward_hooks, metadata  # autograd bookkeeping; meaningless for numpy arrays
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise ValueError(f"a tensor must be rebuilt from a storage, got {type(storage).__name__}")
    size, stride = tuple(int(n) for n in size), tuple(int(s) for s in stride)
    offset = int(storage_offset)
    if len(size) != len(stride) or offset < 0 or any(n < 0 for n in size) or any(s < 0 for s in stride):
        raise ValueError(f"invalid tensor layout: offset {offset}, size {size}, stride {stride}")
    if 0 in size:
        return np.zeros(size, dtype=storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
        raise ValueError(
            f"tensor of size {size} (stride {stride}, offset {offset}) reaches element {last} of a storage "
            f"of {storage.size}"
        )
    strides = tuple(s * storage.itemsize for s in stride)
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size, strides=strides, writeable=False)
    return np.array(view, copy=True)


def rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    """``torch._utils._rebuild_parameter`` (``nn.Parameter``): the data alone."""
    del requires_grad, backward_hooks, state
    return data


def latin1_encode(text, encoding="latin1"):
    """``_codecs.encode`` as pickle protocol 2 uses it to write ``bytes``: latin-1 text to bytes only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise ValueError(f"_codecs.encode is only allowed for latin-1 text, got encoding {encoding!r}")
    return text.encode("latin1")


def torch_device(*args):
    """``torch.device('cuda', 0)`` -> ``TorchDevice('cuda:0')``."""
    return TorchDevice(":".join(str(a) for a in args if a is not None))


def _numpy_core_function(name: str):
    """A function of numpy's ``multiarray`` module (``numpy._core`` in numpy 2, ``numpy.core`` in 1)."""
    core = getattr(np, "_core", None)
    module = getattr(core, "multiarray", None) if core is not None else None
    if module is None:
        module = np.core.multiarray  # type: ignore[attr-defined]  # numpy 1.x
    return getattr(module, name)


def _allowed_globals() -> dict[tuple[str, str], Callable[[], Any]]:
    """``(module, name)`` -> a function returning what the unpickler gets for that global (resolved on
    use: numpy's module moved between versions, and bfloat16 storages need ml_dtypes)."""
    table: dict[tuple[str, str], Callable[[], Any]] = {
        ("collections", "OrderedDict"): lambda: collections.OrderedDict,
        ("builtins", "set"): lambda: set,
        ("builtins", "frozenset"): lambda: frozenset,
        ("_codecs", "encode"): lambda: latin1_encode,
        ("torch._utils", "_rebuild_tensor_v2"): lambda: rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): lambda: rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): lambda: rebuild_parameter,
        ("torch", "device"): lambda: torch_device,
        ("torch", "Size"): lambda: tuple,
        ("numpy", "dtype"): lambda: np.dtype,
        ("numpy", "ndarray"): lambda: np.ndarray,
    }
    for name in _STORAGE_DTYPES:
        table[("torch", name)] = functools.partial(_storage_type, name)
    table[("torch.storage", "UntypedStorage")] = functools.partial(_storage_type, "UntypedStorage")
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        for name in ("scalar", "_reconstruct"):
            table[(module, name)] = functools.partial(_numpy_core_function, name)
    return table


ALLOWED_GLOBALS = _allowed_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only :data:`ALLOWED_GLOBALS` and reads storages from the zip archive."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, byteorder: str, source: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.byteorder, self.source = archive, prefix, byteorder, source
        self.storages: dict[str, np.ndarray] = {}

    def find_class(self, module, name):
        # pickle protocol 2 (torch.save's) writes Python 2 names (__builtin__.set); map them back as
        # pickle's own find_class does, before the allowlist is consulted
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        resolve = ALLOWED_GLOBALS.get((module, name))
        if resolve is None:
            raise DataError(
                f"{self.source}: refused to load: the pickle asks for the global {module}.{name}, which a "
                "checkpoint of network weights does not need (allowed: tensors, containers, numpy scalars); "
                "loading it could run code from the file"
            )
        return resolve()

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise DataError(f"{self.source}: unknown persistent reference {pid!r} in the pickle")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, StorageType):
            raise DataError(f"{self.source}: storage {key!r} has no storage type ({storage_type!r})")
        key = str(key)
        if key not in self.storages:
            self.storages[key] = self._read_storage(key, storage_type.dtype, int(numel))
        return self.storages[key]

    def _read_storage(self, key: str, dtype: np.dtype, numel: int) -> np.ndarray:
        entry = f"{self.prefix}/data/{key}"
        try:
            raw = self.archive.read(entry)
        except KeyError:
            raise DataError(
                f"{self.source}: the archive lacks {entry}, a tensor storage the pickle refers to"
            ) from None
        if len(raw) != numel * dtype.itemsize:
            raise DataError(
                f"{self.source}: {entry} holds {len(raw)} bytes, expected {numel} x {dtype.itemsize} "
                f"({dtype.name}); the file is damaged"
            )
        if self.byteorder == sys.byteorder:
            return np.frombuffer(raw, dtype=dtype).copy()
        return np.frombuffer(raw, dtype=dtype.newbyteorder("<" if self.byteorder == "little" else ">")).astype(dtype)


def _archive_prefix(archive: zipfile.ZipFile, source: str) -> str:
    """The top folder holding ``data.pkl`` (torch names it after the file; there is exactly one)."""
    prefixes = [name[: -len("/data.pkl")] for name in archive.namelist() if name.endswith("/data.pkl")]
    prefixes = [p for p in prefixes if "/" not in p]
    if len(prefixes) != 1:
        raise DataError(
            f"{source}: not a PyTorch checkpoint archive (expected one '<name>/data.pkl' in the zip, found "
            f"{len(prefixes)})"
        )
    return prefixes[0]


def load_pth(path) -> Any:
    """The object saved in a ``.pth`` file, tensors as numpy arrays, loaded with the restricted unpickler.

    Raises :class:`DataError` naming ``path`` when the file is missing, truncated or damaged, is not a
    zip-format checkpoint (torch < 1.6 or ``_use_new_zipfile_serialization=False``: load and save it
    again with a current torch), or asks for any global outside :data:`ALLOWED_GLOBALS`.
    """
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise DataError(f"{source}: file not found")
    try:
        with zipfile.ZipFile(path) as archive:
            prefix = _archive_prefix(archive, source)
            names = set(archive.namelist())
            byteorder = "little"
            if f"{prefix}/byteorder" in names:
                byteorder = archive.read(f"{prefix}/byteorder").decode("ascii", "replace").strip()
                if byteorder not in ("little", "big"):
                    raise DataError(f"{source}: unknown byte order {byteorder!r} in {prefix}/byteorder")
            data = archive.read(f"{prefix}/data.pkl")
            return _RestrictedUnpickler(data, archive, prefix, byteorder, source).load()
    except DataError:
        raise
    except zipfile.BadZipFile as exc:
        raise DataError(
            f"{source}: not a readable zip-format PyTorch checkpoint ({exc}); the file is truncated or damaged, "
            "or was saved by torch < 1.6 / with _use_new_zipfile_serialization=False (load and save it again "
            "with a current torch)"
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise DataError(
            f"{source}: damaged checkpoint, its pickle cannot be read ({type(exc).__name__}: {exc})"
        ) from None
    except OSError as exc:
        raise DataError(f"{source}: cannot be read ({exc})") from exc
