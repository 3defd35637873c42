"""The demo's folder rules (the end-to-end demo runs in tests/test_cli.py)."""

import json

import numpy as np
import pytest

from medseg_jax.demo import DEMO_OUTPUTS, claim_demo_folder, tumour_slice
from medseg_jax.errors import ConfigError

RECORD = {"cases": 5, "steps": 4, "seed": 0}


def test_a_new_folder_is_claimed_and_the_same_settings_reuse_it(tmp_path):
    out = tmp_path / "demo"
    claim_demo_folder(out, RECORD)
    assert json.loads((out / "demo.json").read_text()) == RECORD
    (out / "run").mkdir()
    claim_demo_folder(out, RECORD)  # same settings: kept, to resume
    assert (out / "run").is_dir()
    with pytest.raises(ConfigError, match="steps differ"):
        claim_demo_folder(out, {**RECORD, "steps": 5})
    assert json.loads((out / "demo.json").read_text()) == RECORD and (out / "run").is_dir()


def test_overwrite_removes_only_the_demo_outputs_even_with_a_damaged_record(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    for name in DEMO_OUTPUTS:
        if name.endswith(".json"):
            (out / name).write_text("{not json")
        else:
            (out / name).mkdir()
            (out / name / "file").write_text("x")
    (out / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match="demo.json: unreadable"):
        claim_demo_folder(out, RECORD)
    claim_demo_folder(out, RECORD, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["demo.json", "mine.txt"]
    assert json.loads((out / "demo.json").read_text()) == RECORD


def test_a_file_or_a_folder_without_a_demo_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        claim_demo_folder(tmp_path / "file", RECORD)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "data.nii.gz").write_bytes(b"")
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="no demo.json"):
            claim_demo_folder(tmp_path / "other", RECORD, overwrite=overwrite)
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["data.nii.gz"]


def test_the_overlay_slice_is_the_one_with_most_tumour_else_most_foreground():
    reference = np.zeros((8, 8, 8), np.uint8)
    reference[1:7, 1:7, 1] = 1  # most liver on slice 1
    reference[2:4, 2:4, 3] = 2  # the only tumour on slice 3
    reference[2, 2, 4] = 2
    assert tumour_slice(reference, 2) == 3
    assert tumour_slice(np.where(reference == 2, 1, reference), 2) == 1
    assert tumour_slice(np.zeros_like(reference), 2) == 4  # nothing: the middle slice
