import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medseg_jax.bench import cases, command, suite, torch_baseline
from medseg_jax.bench.suite import run_benchmarks
from medseg_jax.cli import main as cli_main
from medseg_jax.errors import ConfigError
from medseg_jax.kernels.autotune import OpCase

REPO = Path(__file__).resolve().parents[1]


def test_analytic_flop_convention_by_hand():
    # 3x3 conv, 2 samples of 4x4, 3 -> 5 channels, stride 1: 2 * 2*16 outputs * 9 taps * 3 * 5
    assert cases.conv_flops(OpCase("conv", (2, 4, 4, 3), (3, 3, 3, 5), (1, 1))) == 2 * 2 * 16 * 9 * 3 * 5
    # stride 2 on 5x5 with padding 1: 3x3 outputs
    assert cases.conv_flops(OpCase("conv", (1, 5, 5, 2), (3, 3, 2, 4), (2, 2))) == 2 * 9 * 9 * 2 * 4
    # upsampling (1, 2, 2) of 1x2x3x3 voxels, 8 -> 4 channels: every input voxel makes 4 outputs
    assert cases.conv_flops(OpCase("upsample", (1, 2, 3, 3, 8), (1, 2, 2, 8, 4), (1, 2, 2))) == 2 * 18 * 4 * 8 * 4


def test_bad_arguments_name_the_choices():
    with pytest.raises(ConfigError, match="smoke"):
        run_benchmarks("huge")
    with pytest.raises(ConfigError, match="train_step"):
        run_benchmarks("smoke", operations=("everything",))
    with pytest.raises(ConfigError, match="'all', 'fast'"):
        run_benchmarks("smoke", variants="some")


def test_command_line_vocabulary_is_the_suites():
    assert set(command.PRESETS) == set(cases.PRESETS) == set(suite.DEFAULT_RUNS)
    assert suite.OPERATIONS is command.OPERATIONS
    assert command.VARIANTS == cases.VARIANT_SETS


def test_inference_windows_against_pytorch_where_installed(tmp_path):
    """The 3D inference group: the default network and its XLA-only fallback, and PyTorch's forward
    pass (the ratios' baseline) where it is installed."""
    report = run_benchmarks("smoke", dims=(3,), operations=("inference",), runs=1, variants="fast", out_dir=None)
    rows = {r["implementation"]: r for r in report["results"] if r["group"] == "inference forward"}
    expected = {"medseg-jax default", "xla-only default (depth_stack conv + matmul upsample)"}
    if torch_baseline.available():
        expected.add(cases.TORCH_MEMBER)
    assert set(rows) == expected
    baseline = cases.TORCH_MEMBER if torch_baseline.available() else "medseg-jax default"
    for row in rows.values():
        assert row["median_s"] > 0 and row["baseline"] == baseline
        assert row["speedup_vs_baseline"] == pytest.approx(rows[baseline]["median_s"] / row["median_s"])


def test_benchmark_subcommand_rejects_bad_flags_before_running(capsys):
    for argv in (
        ["benchmark", "--preset", "huge"],
        ["benchmark", "--runs", "0"],
        ["benchmark", "--ops", "x"],
        ["benchmark", "--no-such-flag"],
    ):
        with pytest.raises(SystemExit) as exc:
            cli_main(argv)
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'huge'" in err and "must be at least 1" in err and "unrecognized arguments" in err


def test_smoke_run_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "results"
    assert (
        cli_main(
            [
                "benchmark",
                "--preset",
                "smoke",
                "--dims",
                "2",
                "--ops",
                "conv",
                "--runs",
                "1",
                "--no-torch",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "| 2D | float32 | conv fwd |" in table and "| 2D | float32 | conv fwd+bwd |" in table
    assert list(out.glob("*.md"))  # the Markdown table is written beside the JSON
    saved = json.loads(next(out.glob("*.json")).read_text())
    assert saved["meta"]["operations"] == ["conv"] and saved["meta"]["runs"] == 1
    assert {r["group"] for r in saved["results"]} == {"conv fwd", "conv fwd+bwd"}


def run_from(cwd, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def test_clone_shim_and_scripts_parse_the_same_flags(tmp_path):
    shim = run_from(REPO, "-m", "benchmarks", "--help")
    assert shim.returncode == 0, shim.stderr
    assert shim.stdout.startswith("usage: python -m benchmarks") and "--no-torch" in shim.stdout
    for script in (
        "bench_augment.py",
        "bench_sliding_window.py",
        "augmentation_effect.py",
        "bench_loader.py",
        "bench_loop.py",
        "cv_workflow.py",
    ):
        result = run_from(tmp_path, str(REPO / "benchmarks" / script), "--help")  # run as a file, anywhere
        assert result.returncode == 0, (script, result.stderr)
        assert "--out" in result.stdout


def test_benchmarks_folder_is_not_an_installed_package(tmp_path):
    # Outside the clone, `benchmarks` must not import: the wheel (and the editable install) ship only
    # medseg_jax, the suite as medseg_jax.bench.
    result = run_from(tmp_path, "-c", "import importlib.util; print(importlib.util.find_spec('benchmarks'))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "None"


def test_smoke_run_writes_json_and_markdown(tmp_path):
    report = run_benchmarks("smoke", dims=(2,), operations=("upsample", "train_step"), runs=1, out_dir=tmp_path)
    json_file, md_file = sorted(tmp_path.iterdir(), key=lambda p: p.suffix)
    assert json_file.suffix == ".json" and md_file.suffix == ".md"
    saved = json.loads(json_file.read_text())
    assert saved["meta"]["preset"] == "smoke" and saved["matmul_reference"]["float32"]["flop_per_s"] > 0

    rows = {(r["group"], r["implementation"]): r for r in saved["results"]}
    upsample = [r for r in saved["results"] if r["group"] == "upsample fwd+bwd"]
    assert {r["implementation"] for r in upsample} >= {"conv_transpose", "matmul"}
    for r in upsample:
        assert r["median_s"] > 0 and r["compile_s"] > 0 and r["runs"] == 1
        assert r["flops_analytic"] == 3 * 2 * 2 * 8 * 8 * 4 * 8 * 4  # fwd + 2x bwd, (2, 8, 8, 8) -> 4 channels
        assert r["baseline"] == "conv_transpose"
    assert rows[("upsample fwd+bwd", "conv_transpose")]["speedup_vs_baseline"] == 1.0

    steps = {r["implementation"]: r for r in saved["results"] if r["group"] == "train step"}
    assert set(cases.NETWORK_VARIANTS) <= set(steps)
    assert ("pytorch nnU-Net PlainConvUNet" in steps) == torch_baseline.available()
    if torch_baseline.available():  # same topology on both sides: same parameter count
        model = cases.PRESETS["smoke"][2].unet("float32")
        import jax

        from medseg_jax.models import count_parameters

        shapes = jax.eval_shape(model.init, jax.random.key(0), jax.numpy.zeros((1, 16, 16, 1)))
        assert steps["pytorch nnU-Net PlainConvUNet"]["parameters"] == count_parameters(shapes)
    text = md_file.read_text()
    assert "| 2D | float32 | train step |" in text and "medseg-jax default" in text
    assert report["results"] == saved["results"]


def test_the_loop_benchmark_measures_both_sides(tmp_path):
    """A tiny run of benchmarks/bench_loop.py: both rates are measured and the ratio is theirs."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_loop.py"
    out = tmp_path / "loop.json"
    args = ["--steps", "12", "--skip", "4", "--log-every", "2", "--repeats", "1", "--size", "32", "--out", str(out)]
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["loop_median"] > 0 and result["bare_median"] > 0
    assert result["ratio"] == result["loop_steps_per_s"][0] / result["bare_steps_per_s"][0]  # one repeat
