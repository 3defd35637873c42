import csv
import json
import os

import pytest

from medseg_jax.cli import main


def test_config_with_a_plan_prints_the_run_as_trained(tmp_path, capsys):
    import yaml

    assert main(["synth", str(tmp_path / "raw"), "--cases", "2", "--shape", "32", "32", "8"]) == 0
    dataset = tmp_path / "raw" / "Dataset001_SynthLiver"
    assert main(["plan", str(dataset), "--dim", "2"]) == 0
    plan = json.loads((dataset / "plan_2d.json").read_text())
    capsys.readouterr()
    assert (
        main(
            [
                "config",
                "--plan",
                str(dataset / "plan_2d.json"),
                "--set",
                "augment.mode=none",
                "--set",
                f"data.batch_size={4 * plan['batch_size']}",
                "--devices",
                "4",
            ]
        )
        == 0
    )
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["n_stages"] == plan["n_stages"] and printed["model"]["spatial_dims"] == 2
    assert printed["run"]["patch_size"] == plan["patch_size"] == printed["run"]["device_input_size"]
    assert printed["run"]["per_process_batch"] == 4 * plan["batch_size"]
    assert printed["run"]["mesh"] == {"data": 4, "spatial": 1}
    assert main(["config", "--plan", str(dataset / "plan_2d.json"), "--set", "model.num_classes=5"]) == 2
    assert "model.num_classes: the config says 5 but the plan says 3" in capsys.readouterr().err


def test_config_prints_resolved_values(capsys):
    assert main(["config", "--set", "train.learning_rate=3e-4", "--set", "model.spatial_dims=2"]) == 0
    out = capsys.readouterr().out
    assert "learning_rate: 0.0003" in out and "spatial_dims: 2" in out


def test_bad_override_exits_non_zero_naming_the_key(capsys):
    assert main(["config", "--set", "train.lr=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "train.lr" in err


def test_missing_config_file_is_reported(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:  # refused while parsing the arguments, as any bad flag value
        main(["config", "--config", str(tmp_path / "nope.yaml")])
    assert info.value.code == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_synth_then_bad_case_count_leaves_nothing(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "ds"), "--cases", "2", "--shape", "32", "32", "16"]) == 0
    written = next((tmp_path / "ds").iterdir())
    assert (written / "dataset.json").is_file()
    assert len(list((written / "imagesTr").iterdir())) == 2
    assert main(["synth", str(tmp_path / "other"), "--cases", "0"]) == 2
    assert "num_cases" in capsys.readouterr().err
    assert not (tmp_path / "other").exists() or not any((tmp_path / "other").iterdir())


def test_every_subcommand_has_help(capsys):
    for command in ("demo", "synth", "plan", "preprocess", "train", "predict", "evaluate", "config"):
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0
        assert "usage: medseg-jax " + command in capsys.readouterr().out


def test_demo_rejects_bad_settings_before_writing_anything(tmp_path, capsys):
    out = tmp_path / "demo"
    for flags, named in (
        (["--shape", "96", "96", "4"], "shape"),
        (["--cases", "3"], "--cases"),
        (["--steps", "0"], "--steps"),
        (["--steps", "20"], "--steps 20 is not above"),
        (["--set", "train.no_such_key=1"], "no_such_key"),
    ):
        assert main(["demo", "--out", str(out), "--quiet", *flags]) == 2
        assert named in capsys.readouterr().err
        assert not out.exists()


def test_demo_never_writes_into_a_folder_that_is_not_a_demo(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert (
        main(["demo", "--out", str(mine), "--cases", "5", "--steps", "1", "--quiet", "--set", "train.warmup_steps=0"])
        == 2
    )
    assert "no demo.json" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"


def run_reduced_demo(out):
    return main(
        [
            "demo",
            "--out",
            str(out),
            "--cases",
            "5",
            "--steps",
            "4",
            "--quiet",
            "--set",
            "data.batch_size=2",
            "--set",
            "train.warmup_steps=0",
        ]
    )


@pytest.mark.slow
def test_demo_reduced_end_to_end_and_repeatable(tmp_path, capsys):
    out = tmp_path / "demo"
    assert run_reduced_demo(out) == 0
    printed = capsys.readouterr().out
    assert "liver: dice" in printed and "report:" in printed
    report = out / "report"
    summary = json.loads((report / "summary.json").read_text())
    assert set(summary["metrics"]) == {"liver", "tumour"}
    assert set(summary["metrics"]["liver"]) == {"dice", "dice_global", "hd95", "nsd"}
    assert summary["tumour_detection"]["reference_lesions"] >= 1
    assert (report / "training_curve.png").stat().st_size > 1000
    overlays = sorted(report.glob("overlay_*.png"))
    assert len(overlays) == len(summary["heldout_cases"]) >= 1
    with open(report / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["class"] for r in rows} == {"liver", "tumour"}
    for row in rows:
        assert row["dice"] in ("", "nan") or 0.0 <= float(row["dice"]) <= 1.0
    readme = (report / "README.md").read_text()
    assert "medseg-jax predict --model" in readme and "overlay_" in readme
    assert (out / "plan.json").is_file() and (out / "run" / "config.yaml").is_file()
    assert any((out / "run" / "checkpoints").iterdir())
    assert sorted(p.name for p in (out / "predictions").glob("*.nii.gz")) == sorted(
        f"{case}.nii.gz" for case in summary["heldout_cases"]
    )
    # the same seed gives the same metrics
    assert run_reduced_demo(tmp_path / "again") == 0
    assert (tmp_path / "again" / "report" / "metrics.csv").read_text() == (report / "metrics.csv").read_text()

    # the same settings into the same folder resume the finished run: nothing retrained, same metrics
    assert run_reduced_demo(out) == 0
    assert json.loads((report / "summary.json").read_text())["final_loss"] == summary["final_loss"]
    assert (tmp_path / "again" / "report" / "metrics.csv").read_text() == (report / "metrics.csv").read_text()
    # other settings are refused before anything is touched, unless --overwrite
    dataset_files = sorted((p.name, p.stat().st_mtime_ns) for p in (out / "raw").rglob("*"))
    capsys.readouterr()
    assert (
        main(
            [
                "demo",
                "--out",
                str(out),
                "--cases",
                "6",
                "--steps",
                "4",
                "--quiet",
                "--set",
                "data.batch_size=2",
                "--set",
                "train.warmup_steps=0",
            ]
        )
        == 2
    )
    assert "cases differ" in capsys.readouterr().err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (out / "raw").rglob("*")) == dataset_files
    assert (
        main(
            [
                "demo",
                "--out",
                str(out),
                "--cases",
                "6",
                "--steps",
                "4",
                "--quiet",
                "--overwrite",
                "--set",
                "data.batch_size=2",
                "--set",
                "train.warmup_steps=0",
            ]
        )
        == 0
    )
    assert json.loads((report / "summary.json").read_text())["settings"]["cases"] == 6


def test_synth_plan_preprocess_from_the_command_line(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "raw"), "--cases", "3", "--shape", "32", "32", "12"]) == 0
    dataset = tmp_path / "raw" / "Dataset001_SynthLiver"
    assert (
        main(
            [
                "plan",
                str(dataset),
                "--dim",
                "3",
                "--hu-window",
                "-175",
                "250",
                "--denoise",
                "median",
                "--denoise-strength",
                "3",
            ]
        )
        == 0
    )
    plan = json.loads((dataset / "plan_3d.json").read_text())
    assert plan["preprocessing"]["hu_window"] == [-175.0, 250.0]
    assert plan["preprocessing"]["denoise"] == {"method": "median", "size": 3}
    preprocess = ["preprocess", str(dataset), "--plan", str(dataset / "plan_3d.json"), "--out", str(tmp_path / "store")]
    assert main([*preprocess, "--quiet"]) == 0
    assert "preprocessed 3 case(s)" in capsys.readouterr().out
    assert json.loads((tmp_path / "store" / "plan.json").read_text()) == plan
    # rerun: everything is skipped (resumable)
    assert main([*preprocess, "--quiet"]) == 0
    assert "skipped 3" in capsys.readouterr().out


def test_plan_on_a_broken_dataset_fails_naming_the_problem(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "raw"), "--cases", "2", "--shape", "16", "16", "8"]) == 0
    dataset = tmp_path / "raw" / "Dataset001_SynthLiver"
    next((dataset / "labelsTr").iterdir()).unlink()
    assert main(["plan", str(dataset)]) == 2
    err = capsys.readouterr().err
    assert "labelsTr" in err or "label" in err
    assert not (dataset / "plan_3d.json").exists()


def test_train_without_a_store_plan_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "store").mkdir()
    assert main(["train", "--data", str(tmp_path / "store"), "--out", str(tmp_path / "run")]) == 2
    assert "plan.json" in capsys.readouterr().err


def test_synth_help_names_the_folder_it_writes_and_plan_takes_a_voxel_budget(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    assert "OUT/Dataset001_SynthLiver" in capsys.readouterr().out
    assert main(["synth", str(tmp_path / "raw"), "--cases", "3", "--shape", "32", "32", "8"]) == 0
    assert [p.name for p in (tmp_path / "raw").iterdir()] == ["Dataset001_SynthLiver"]
    dataset = tmp_path / "raw" / "Dataset001_SynthLiver"
    for bad in ("0", "-5", "nan"):
        assert main(["plan", str(dataset), "--dim", "2", "--voxel-budget", bad]) == 2
        assert "--voxel-budget" in capsys.readouterr().err
    assert not (dataset / "plan_2d.json").exists()
    assert main(["plan", str(dataset), "--dim", "2", "--voxel-budget", "1024"]) == 0
    plan = json.loads((dataset / "plan_2d.json").read_text())
    assert plan["batch_size"] * plan["patch_size"][0] * plan["patch_size"][1] <= 1024
    assert main(["plan", str(dataset), "--dim", "2", "--out", str(tmp_path / "default.json")]) == 0
    assert json.loads((tmp_path / "default.json").read_text())["patch_size"] != plan["patch_size"]


def test_an_output_path_that_is_a_file_is_one_error_line_for_every_command(tmp_path, capsys):
    """plan, preprocess and evaluate (train: tests/train/test_loop.py) report an unusable output path
    with one line naming it, exit 2, and leave the file alone."""
    assert main(["synth", str(tmp_path / "raw"), "--cases", "2", "--shape", "16", "16", "8"]) == 0
    dataset = tmp_path / "raw" / "Dataset001_SynthLiver"
    assert main(["plan", str(dataset)]) == 0
    taken = tmp_path / "taken"
    taken.write_text("a file")
    commands = [
        ["plan", str(dataset), "--out", str(taken / "plan.json")],
        ["preprocess", str(dataset), "--plan", str(dataset / "plan_3d.json"), "--out", str(taken), "--quiet"],
        [
            "evaluate",
            "--pred",
            str(dataset / "labelsTr"),
            "--ref",
            str(dataset / "labelsTr"),
            "--out",
            str(taken),
            "--quiet",
        ],
    ]
    for command in commands:
        capsys.readouterr()
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "taken" in err and "Traceback" not in err, (command, err)
        assert taken.read_text() == "a file"


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="root writes into read-only folders, so there is nothing to refuse",
)
def test_a_read_only_output_folder_is_one_error_line(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "raw"), "--cases", "2", "--shape", "16", "16", "8"]) == 0
    dataset = tmp_path / "raw" / "Dataset001_SynthLiver"
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        capsys.readouterr()
        assert main(["plan", str(dataset), "--out", str(locked / "plan.json")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "locked" in err and "Traceback" not in err
    finally:
        locked.chmod(0o700)
