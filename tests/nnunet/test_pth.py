"""The restricted ``.pth`` reader: tensors rebuilt exactly, anything that could run code refused."""

from __future__ import annotations

import collections
import os
import pickle
import zipfile

import numpy as np
import pytest

from medseg_jax.errors import DataError
from medseg_jax.nnunet.pth import TorchDevice, load_pth
from tests.nnunet.torch_format import Global, View, pickle_bytes, write_archive, write_pth


def test_round_trip_of_an_nnunet_like_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    weights = collections.OrderedDict(
        [
            ("encoder.stages.0.0.convs.0.conv.weight", rng.normal(size=(4, 1, 3, 3, 3)).astype(np.float32)),
            ("encoder.stages.0.0.convs.0.norm.bias", rng.normal(size=4).astype(np.float32)),
            ("half", rng.normal(size=(2, 3)).astype(np.float16)),
            ("counts", np.arange(6, dtype=np.int64).reshape(2, 3)),
            ("flags", np.array([True, False])),
        ]
    )
    base = np.arange(12, dtype=np.float32)
    checkpoint = {
        "network_weights": weights,
        # a transposed view into a shared storage, as torch saves views: offset 1, size (3, 2), stride (1, 4)
        "view": View(base, 1, (3, 2), (1, 4)),
        "same_storage": base,
        "optimizer_state": {"state": {0: {"momentum_buffer": np.ones(3, np.float32)}}, "param_groups": [{"lr": 0.01}]},
        "logging": {"train_losses": [np.float64(0.5), np.float32(0.25)], "names": ("a", "b")},
        "init_args": {"fold": 0, "device": _Device("cpu")},
        "inference_allowed_mirroring_axes": (0, 1, 2),
        "sizes": {1, 2},
    }
    path = tmp_path / "checkpoint_final.pth"
    write_pth(path, checkpoint)
    loaded = load_pth(path)
    for key, value in weights.items():
        np.testing.assert_array_equal(loaded["network_weights"][key], value)
        assert loaded["network_weights"][key].dtype == value.dtype
    assert isinstance(loaded["network_weights"], collections.OrderedDict)
    np.testing.assert_array_equal(loaded["view"], np.array([[1, 5], [2, 6], [3, 7]], np.float32))
    np.testing.assert_array_equal(loaded["same_storage"], base)
    assert loaded["logging"]["train_losses"] == [0.5, 0.25]
    assert isinstance(loaded["logging"]["train_losses"][0], np.float64)
    assert loaded["init_args"] == {"fold": 0, "device": TorchDevice("cpu")}
    assert loaded["inference_allowed_mirroring_axes"] == (0, 1, 2)
    assert loaded["sizes"] == {1, 2}
    np.testing.assert_array_equal(loaded["optimizer_state"]["state"][0]["momentum_buffer"], np.ones(3))


class _Device:
    """Pickles as torch pickles ``torch.device(spec)``: a call of the global ``torch.device``."""

    def __init__(self, spec):
        self.spec = spec

    def __reduce__(self):
        return (Global("torch", "device"), (self.spec,))


def test_big_endian_storages_are_read(tmp_path):
    weights = {"w": np.linspace(-1, 1, 10, dtype=np.float32).reshape(2, 5)}
    path = tmp_path / "big.pth"
    write_pth(path, weights, big_endian=True)
    loaded = load_pth(path)
    np.testing.assert_array_equal(loaded["w"], weights["w"])
    assert loaded["w"].dtype == np.float32 and loaded["w"].dtype.isnative


class _RunsCode:
    """A pickle payload that would run a shell command when unpickled freely."""

    def __init__(self, callable_, argument):
        self.callable, self.argument = callable_, argument

    def __reduce__(self):
        return (self.callable, (self.argument,))


@pytest.mark.parametrize("callable_", [os.system, eval, exec])
def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path, callable_):
    marker = tmp_path / "was_run"
    command = f"touch {marker}" if callable_ is os.system else f"open({str(marker)!r}, 'w').close()"
    payload = {"network_weights": {"w": np.zeros(2, np.float32)}, "evil": _RunsCode(callable_, command)}
    path = tmp_path / "evil.pth"
    storages: dict = {}
    write_archive(path, pickle_bytes(payload, storages), storages)
    with pytest.raises(DataError) as excinfo:
        load_pth(path)
    message = str(excinfo.value)
    assert str(path) in message and "refused" in message
    assert f".{callable_.__name__}" in message  # names the global, e.g. posix.system / builtins.eval
    assert not marker.exists()


def test_the_free_unpickler_would_have_run_the_payload(tmp_path):
    """Control for the test above: the same bytes do run code under plain pickle."""
    marker = tmp_path / "was_run"
    data = pickle.dumps(_RunsCode(exec, f"open({str(marker)!r}, 'w').close()"), protocol=2)
    pickle.loads(data)
    assert marker.exists()


def test_a_refused_global_inside_a_class_reference_is_refused(tmp_path):
    path = tmp_path / "object.pth"
    storages: dict = {}
    write_archive(path, pickle_bytes({"obj": collections.Counter("ab")}, storages), storages)
    with pytest.raises(DataError, match=r"collections\.Counter"):
        load_pth(path)


def test_truncated_file_is_a_clear_error(tmp_path):
    path = tmp_path / "checkpoint_final.pth"
    write_pth(path, {"w": np.ones((64, 64), np.float32)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated or damaged"):
        load_pth(path)


def test_storage_shorter_than_declared_is_a_clear_error(tmp_path):
    path = tmp_path / "short.pth"
    storages: dict = {}
    data = pickle_bytes({"w": np.ones(8, np.float32)}, storages)
    storages["0"] = storages["0"][:-4]
    write_archive(path, data, storages)
    with pytest.raises(DataError, match=r"data/0 holds 28 bytes, expected 8 x 4"):
        load_pth(path)


def test_tensor_beyond_its_storage_is_a_clear_error(tmp_path):
    path = tmp_path / "beyond.pth"
    write_pth(path, {"w": View(np.ones(4, np.float32), 2, (4,), (1,))})
    with pytest.raises(DataError, match="damaged checkpoint"):
        load_pth(path)


def test_not_a_zip_and_missing_pickle_are_clear_errors(tmp_path):
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(DataError, match="torch < 1.6"):
        load_pth(legacy)
    empty_zip = tmp_path / "empty.pth"
    with zipfile.ZipFile(empty_zip, "w") as zf:
        zf.writestr("something.txt", "hi")
    with pytest.raises(DataError, match="not a PyTorch checkpoint archive"):
        load_pth(empty_zip)
    with pytest.raises(DataError, match="file not found"):
        load_pth(tmp_path / "missing.pth")
