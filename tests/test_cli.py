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
    for command in ("demo", "synth", "plan", "preprocess", "config"):
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0
        assert "usage: medseg-jax " + command in capsys.readouterr().out


@pytest.mark.slow
def test_demo_reduced_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--cases", "5", "--steps", "4", "--quiet",
                 "--set", "data.batch_size=2"])
    assert code == 0
    report = out / "report"
    summary = json.loads((report / "summary.json").read_text())
    assert set(summary["metrics"]["mean_dice"]) == {"liver", "tumour"}
    assert (report / "training_curve.png").stat().st_size > 1000
    overlays = sorted(report.glob("overlay_*.png"))
    assert len(overlays) == len(summary["metrics"]["validation_cases"]) >= 1
    with open(report / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["class"] for r in rows} == {"liver", "tumour"}
    for row in rows:
        assert 0.0 <= float(row["dice"]) <= 1.0 or row["dice"] == "nan"
    assert (out / "plan.json").is_file() and (out / "config.yaml").is_file()
