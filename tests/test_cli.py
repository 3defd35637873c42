import csv
import json

import pytest

from medseg_jax.cli import main


def test_config_prints_resolved_values(capsys):
    assert main(["config", "--set", "train.learning_rate=3e-4", "--set", "model.spatial_dims=2"]) == 0
    out = capsys.readouterr().out
    assert "learning_rate: 0.0003" in out and "spatial_dims: 2" in out


def test_bad_override_exits_non_zero_naming_the_key(capsys):
    assert main(["config", "--set", "train.lr=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "train.lr" in err


def test_missing_config_file_is_reported(tmp_path, capsys):
    assert main(["config", "--config", str(tmp_path / "nope.yaml")]) == 2
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
    for flags, named in ((["--shape", "96", "96", "4"], "shape"), (["--cases", "3"], "--cases"),
                         (["--steps", "0"], "--steps"), (["--set", "train.no_such_key=1"], "no_such_key")):
        assert main(["demo", "--out", str(out), "--quiet", *flags]) == 2
        assert named in capsys.readouterr().err
        assert not out.exists()


def test_demo_never_writes_into_a_folder_that_is_not_a_demo(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["demo", "--out", str(mine), "--cases", "5", "--steps", "1", "--quiet"]) == 2
    assert "no demo.json" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"


def run_reduced_demo(out):
    return main(["demo", "--out", str(out), "--cases", "5", "--steps", "4", "--quiet", "--set", "data.batch_size=2"])


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
        f"{case}.nii.gz" for case in summary["heldout_cases"])
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
    assert main(["demo", "--out", str(out), "--cases", "6", "--steps", "4", "--quiet",
                 "--set", "data.batch_size=2"]) == 2
    assert "cases differ" in capsys.readouterr().err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (out / "raw").rglob("*")) == dataset_files
    assert main(["demo", "--out", str(out), "--cases", "6", "--steps", "4", "--quiet", "--overwrite",
                 "--set", "data.batch_size=2"]) == 0
    assert json.loads((report / "summary.json").read_text())["settings"]["cases"] == 6


def test_synth_plan_preprocess_from_the_command_line(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "raw"), "--cases", "3", "--shape", "32", "32", "12"]) == 0
    dataset = tmp_path / "raw" / "Dataset001_SynthLiver"
    assert main(["plan", str(dataset), "--dim", "3", "--hu-window", "-175", "250", "--denoise", "median",
                 "--denoise-strength", "3"]) == 0
    plan = json.loads((dataset / "plan_3d.json").read_text())
    assert plan["preprocessing"]["hu_window"] == [-175.0, 250.0]
    assert plan["preprocessing"]["denoise"] == {"method": "median", "size": 3}
    assert main(["preprocess", str(dataset), "--plan", str(dataset / "plan_3d.json"), "--out",
                 str(tmp_path / "store"), "--quiet"]) == 0
    assert "preprocessed 3 case(s)" in capsys.readouterr().out
    assert json.loads((tmp_path / "store" / "plan.json").read_text()) == plan
    # rerun: everything is skipped (resumable)
    assert main(["preprocess", str(dataset), "--plan", str(dataset / "plan_3d.json"), "--out",
                 str(tmp_path / "store"), "--quiet"]) == 0
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


def test_benchmark_command_runs_the_suite_in_smoke_mode(tmp_path, capsys):
    assert main(["benchmark", "--preset", "smoke", "--dims", "2", "--ops", "upsample", "--runs", "1", "--no-torch",
                 "--out", str(tmp_path)]) == 0
    assert "upsample" in capsys.readouterr().out
    assert list(tmp_path.glob("*.json")) and list(tmp_path.glob("*.md"))
