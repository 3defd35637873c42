"""The demo's folder rules; a tiny demo end to end: its report's commands and `predict`'s refusals on its run
(the default-size demo runs in tests/test_cli.py)."""

import csv
import dataclasses
import json
import shlex
from pathlib import Path

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


# --- a tiny demo, end to end: the report's commands and the CLI's refusals on a real run ---------------

TINY = {
    "cases": 5,
    "steps": 2,
    "shape": (32, 32, 8),
    "overrides": ["data.patch_size=[32,32]", "data.batch_size=2", "train.warmup_steps=0"],
}


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    from medseg_jax.demo import run_demo

    out = tmp_path_factory.mktemp("tiny") / "demo"
    summary = run_demo(out, progress=False, **TINY)
    return out, summary


def report_commands(readme: str) -> list[list[str]]:
    """The command lines of the report's "stage by stage" block, split as a shell would."""
    block = readme.split("## The same, stage by stage", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.splitlines() if line.strip()]


@pytest.mark.slow
def test_every_report_command_runs_as_printed_and_reproduces_the_demo(tiny_demo, capsys):
    from medseg_jax.cli import main

    out, _ = tiny_demo
    commands = report_commands((out / "report" / "README.md").read_text())
    assert [c[1] for c in commands] == ["synth", "plan", "preprocess", "train", "predict", "evaluate"]
    assert all(c[0] == "medseg-jax" for c in commands)
    demo_plan = json.loads((out / "plan.json").read_text())
    for command in commands:
        assert main(command[1:]) == 0, (command, capsys.readouterr().err)
        if command[1] == "plan":  # the plan the demo trained with, so the demo's store is accepted
            written = Path(command[command.index("plan") + 1]) / f"plan_{demo_plan['dim']}d.json"
            assert json.loads(written.read_text()) == demo_plan
    printed = capsys.readouterr().out
    assert "skipped 5 already in" in printed  # preprocess found the demo's store, made with that plan
    # evaluate with the printed flags gives the demo's table, lesion counts included
    again = (out / "predictions" / "evaluation" / "metrics.csv").read_text()
    assert again == (out / "report" / "metrics.csv").read_text()


@pytest.mark.slow
def test_tumour_detection_is_the_evaluations_lesion_count(tiny_demo):
    out, summary = tiny_demo
    stored = json.loads((out / "report" / "summary.json").read_text())
    lesions = stored["evaluation"]["classes"]["tumour"]["lesions"]
    assert stored["tumour_detection"] == lesions
    with open(out / "report" / "metrics.csv") as f:
        tumour_rows = [r for r in csv.DictReader(f) if r["class"] == "tumour"]
    assert len(tumour_rows) == len(summary["heldout_cases"])
    assert lesions["reference_lesions"] == sum(int(r["reference_lesions"]) for r in tumour_rows) >= 1
    assert lesions["detected"] == sum(int(r["detected_lesions"]) for r in tumour_rows)
    assert lesions["false_positives"] == sum(int(r["false_positive_lesions"]) for r in tumour_rows)


@pytest.mark.slow
def test_predict_refuses_nan_scans_and_outputs_over_inputs_with_exit_2(tiny_demo, tmp_path, capsys):
    from medseg_jax.cli import main
    from medseg_jax.data.image_io import read_nifti, write_nifti

    out, summary = tiny_demo
    case = summary["heldout_cases"][0]
    scan = read_nifti(out / "heldout" / "imagesTs" / f"{case}_0000.nii.gz")
    array = scan.array.astype(np.float32)
    array[1, 2, 3] = array[4, 5, 6] = np.nan
    nan_scan = write_nifti(dataclasses.replace(scan, array=array), tmp_path / "nan_scan.nii.gz")
    run = str(out / "run")
    assert main(["predict", "--model", run, "-i", str(nan_scan), "-o", str(tmp_path / "mask.nii.gz"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "nan_scan.nii.gz" in err and "2 NaN" in err
    assert not (tmp_path / "mask.nii.gz").exists()

    before = nan_scan.read_bytes()
    (tmp_path / "sub").mkdir()
    same = tmp_path / "sub" / ".." / "nan_scan.nii.gz"  # the input, spelled differently
    for output in (same, tmp_path):  # the file itself; its folder, where the mask would take its name
        assert main(["predict", "--model", run, "-i", str(nan_scan), "-o", str(output), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "would replace the input scan" in err and "nan_scan.nii.gz" in err
    assert nan_scan.read_bytes() == before
