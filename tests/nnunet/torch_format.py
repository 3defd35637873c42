"""Write ``.pth`` files in torch's zip format from numpy arrays, without torch (test helper).

The pickle is what ``torch.save`` writes (protocol 2): each array becomes
``torch._utils._rebuild_tensor_v2(<persistent storage>, offset, size, stride, False, OrderedDict())`` with
the storage ``('storage', torch.<Type>Storage, key, 'cpu', numel)`` and its bytes in ``archive/data/<key>``.
The globals are written as raw ``GLOBAL`` opcodes because torch's classes are not importable here.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile

import numpy as np

STORAGE_NAMES = {
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage",
    np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
}


class Global:
    """A ``module.name`` global, written as a raw GLOBAL opcode."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle only accepts callables as reduce functions; never called here
        raise NotImplementedError


class Storage:
    """A storage reference (pickled as a persistent id)."""

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class View:
    """A tensor that views ``base`` with ``offset`` / ``shape`` / ``stride`` in elements (shared storage)."""

    def __init__(self, base: np.ndarray, offset: int, shape, stride):
        self.base, self.offset, self.shape, self.stride = base, offset, tuple(shape), tuple(stride)


class _TorchPickler(pickle._Pickler):  # the pure-Python pickler: its save() can be extended
    def __init__(self, file, storages: dict, big_endian: bool):
        super().__init__(file, protocol=2)
        self.storages, self.big_endian, self.keys = storages, big_endian, {}

    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", Global("torch", STORAGE_NAMES[obj.dtype]), obj.key, "cpu", obj.numel)
        return None

    def _storage(self, base: np.ndarray) -> Storage:
        if id(base) not in self.keys:
            key = str(len(self.storages))
            data = np.ascontiguousarray(base).ravel()
            self.storages[key] = data.astype(data.dtype.newbyteorder(">" if self.big_endian else "<")).tobytes()
            self.keys[id(base)] = (key, base)  # keep base alive so its id stays unique
        return Storage(self.keys[id(base)][0], base.dtype, base.size)

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
            return
        if isinstance(obj, np.ndarray):
            obj = View(obj, 0, obj.shape, [s // obj.itemsize for s in np.ascontiguousarray(obj).strides])
        if isinstance(obj, View):
            self.save(Global("torch._utils", "_rebuild_tensor_v2"))
            args = (self._storage(obj.base), obj.offset, obj.shape, obj.stride, False, collections.OrderedDict())
            self.save(args)
            self.write(pickle.REDUCE)
            return
        super().save(obj, save_persistent_id)


def pickle_bytes(obj, storages: dict, big_endian: bool = False) -> bytes:
    buffer = io.BytesIO()
    _TorchPickler(buffer, storages, big_endian).dump(obj)
    return buffer.getvalue()


def write_pth(path, obj, big_endian: bool = False, archive: str = "checkpoint") -> None:
    """Save ``obj`` (containers of numpy arrays / :class:`View` s, plain values) as torch would."""
    storages: dict[str, bytes] = {}
    data = pickle_bytes(obj, storages, big_endian)
    write_archive(path, data, storages, big_endian, archive)


def write_archive(path, data: bytes, storages: dict, big_endian: bool = False, archive: str = "checkpoint") -> None:
    """The zip layout of ``torch.save`` around a pickle ``data`` and its storages."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{archive}/data.pkl", data)
        zf.writestr(f"{archive}/byteorder", "big" if big_endian else "little")
        for key, raw in storages.items():
            zf.writestr(f"{archive}/data/{key}", raw)
        zf.writestr(f"{archive}/version", "3\n")
