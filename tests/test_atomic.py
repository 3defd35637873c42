import os
import stat

import pytest

from medseg_jax.atomic import atomic_path, current_umask, write_json_atomic


def test_written_file_has_normal_permissions_and_no_temporary_left(tmp_path):
    path = write_json_atomic(tmp_path / "out.json", {"a": 1})
    mode = stat.S_IMODE(os.stat(path).st_mode)
    assert mode == 0o666 & ~current_umask()
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_failure_inside_the_block_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "x.nii.gz") as tmp:
            assert tmp.name.endswith(".nii.gz")
            tmp.write_bytes(b"partial")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
