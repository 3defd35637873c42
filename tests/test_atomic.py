"""Atomic writes (permissions, nothing half-written), strict JSON and the JSON reader."""

import importlib
import json
import math
import os
import stat

import numpy as np
import pytest

import medseg_jax.atomic
from medseg_jax.atomic import atomic_path, json_safe, read_json, write_json_atomic, write_text_atomic
from medseg_jax.errors import DataError


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_file_has_the_permissions_of_a_plain_open_and_no_temporary_left(tmp_path, umask_027):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    path = write_json_atomic(tmp_path / "out.json", {"a": 1})
    assert _mode(path) == _mode(plain) == 0o640
    replaced = write_text_atomic(tmp_path / "plain.txt", "y")  # replacing a file gives the same mode too
    assert _mode(replaced) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "plain.txt"]


def test_importing_the_module_does_not_touch_the_umask(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(os, "umask", lambda *args: calls.append(args) or 0o022)
    module = importlib.reload(medseg_jax.atomic)
    module.write_text_atomic(tmp_path / "x.txt", "x")  # nor does writing
    assert calls == []


def test_failure_inside_the_block_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "x.nii.gz") as tmp:
            assert tmp.name.endswith(".nii.gz")
            tmp.write_bytes(b"partial")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_json_failure_keeps_the_old_file(tmp_path):
    write_json_atomic(tmp_path / "keep.json", {"a": np.float32(1.5), "b": np.arange(2)})
    assert read_json(tmp_path / "keep.json") == {"a": 1.5, "b": [0, 1]}
    with pytest.raises(TypeError, match="object is not JSON serialisable"):
        write_json_atomic(tmp_path / "keep.json", {"a": object()})
    with pytest.raises(ValueError, match=r"keep\.json: Out of range float values are not JSON compliant"):
        write_json_atomic(tmp_path / "keep.json", {"a": [1.0, float("nan")]})
    with pytest.raises(ValueError, match="not JSON compliant"):
        write_json_atomic(tmp_path / "keep.json", {"a": np.float64("inf")})
    assert json.loads((tmp_path / "keep.json").read_text()) == {"a": 1.5, "b": [0, 1]}
    assert [p.name for p in tmp_path.iterdir()] == ["keep.json"]


def test_json_safe_writes_nan_as_null_and_infinity_as_a_string(tmp_path):
    value = {"dice": float("nan"), "hd95": [np.float32("inf"), -math.inf, 2.5], "n": 3, "name": "liver"}
    path = write_json_atomic(tmp_path / "s.json", json_safe(value))
    assert read_json(path) == {"dice": None, "hd95": ["inf", "-inf", 2.5], "n": 3, "name": "liver"}
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()


def test_read_json_names_the_file_and_the_problem(tmp_path):
    with pytest.raises(DataError, match=r"missing\.json: file not found"):
        read_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"a": 1,}')
    with pytest.raises(DataError, match=r"bad\.json: not valid JSON \(line 1, column 9"):
        read_json(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1]")
    assert read_json(tmp_path / "list.json") == [1]
    with pytest.raises(DataError, match=r"list\.json: expected a JSON object, found array"):
        read_json(tmp_path / "list.json", expect=dict)
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DataError, match=r"binary\.json: cannot be read"):
        read_json(tmp_path / "binary.json")


def test_staged_folder_appears_whole_or_not_at_all(tmp_path):
    from medseg_jax.atomic import staged_folder

    with staged_folder(tmp_path / "out") as staging:
        (staging / "a.txt").write_text("a")
        assert not (tmp_path / "out").exists()  # nothing visible until the block ends
    assert (tmp_path / "out" / "a.txt").read_text() == "a"
    with pytest.raises(RuntimeError, match="half way"):
        with staged_folder(tmp_path / "failed") as staging:
            (staging / "b.txt").write_text("b")
            raise RuntimeError("half way")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder, no "failed"
    with pytest.raises(DataError, match="not an empty folder"):
        with staged_folder(tmp_path / "out"):
            pass
