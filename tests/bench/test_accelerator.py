"""The accelerator campaign (benchmarks/accelerator.sh): its dry run, end to end through the shell script
on whatever backend CI has, and the bookkeeping that decides its exit status."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medseg_jax.bench import accelerator, torch_baseline
from medseg_jax.bench.accelerator_report import markdown_report
from medseg_jax.bench.accelerator_sections import TOLERANCE, Budget
from medseg_jax.errors import ConfigError
from medseg_jax.inference.sliding_window import compute_window_starts
from medseg_jax.kernels.autotune import default_candidates
from medseg_jax.kernels.select import pallas_interpreted

REPO = Path(__file__).resolve().parents[2]


def positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


def test_dry_run_through_the_shell_script(tmp_path):
    out = tmp_path / "results"
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "accelerator.sh"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PASSED" in done.stdout and "== train_step" in done.stderr  # summary on stdout, progress on stderr
    [json_file] = out.glob("accelerator-*-dry-run-*.json")
    [md_file] = out.glob("accelerator-*-dry-run-*.md")
    report = json.loads(json_file.read_text())
    meta, sections = report["meta"], report["sections"]
    assert meta["dry_run"] is True and "--dry-run" in meta["command"]
    assert {"jax", "jaxlib"} <= set(meta["versions"]) and meta["device_kind"] and meta["machine"]["cpu_count"]
    assert list(sections) == list(accelerator.SECTIONS)
    assert all(s["status"] == "ok" and positive(s["wall_s"]) for s in sections.values()), sections
    assert report["summary"]["passed"] and not report["summary"]["failed_sections"]

    pallas = sections["pallas_upsample"]
    assert pallas["interpreted"] is pallas_interpreted()  # on CPU only interpret mode exists, and it says so
    assert {c["dtype"] for c in pallas["checks"]} == {"float32", "bfloat16"}
    for check in pallas["checks"]:
        assert check["passed"] and check["max_rel_error"] <= TOLERANCE[check["dtype"]]
        assert set(check["errors"]) == {"output", "input_grad", "kernel_grad", "bias_grad"}
        if check["dtype"] == "float32":  # interpreted or compiled, float32 agrees far below the bound
            assert check["max_rel_error"] < 1e-4

    peak = sections["matmul_peak"]["results"]
    assert set(peak) == {"float32", "bfloat16"} and all(positive(m["flop_per_s"]) for m in peak.values())

    rows = sections["train_step"]["rows"]
    expected = {"medseg-jax default", "plain flax (xla conv + conv_transpose)"}
    if torch_baseline.available():
        expected.add("pytorch nnU-Net PlainConvUNet")
    for dtype in ("float32", "bfloat16"):
        assert {r["implementation"] for r in rows if r["dtype"] == dtype} == expected
    for row in rows:
        assert positive(row["median_s"]) and positive(row["flop_per_s"])
        assert positive(row["fraction_of_bf16_matmul_peak"]) and positive(row["speedup_vs_baseline"])

    ct = sections["ct_inference"]
    patch = meta["plan"]["topology"]["patch"]
    starts = compute_window_starts([max(s, p) for s, p in zip(ct["volume"], patch)], patch)
    assert ct["volume"] == [24, 24, 20] and ct["mirrorings"] == 8 and ct["output_finite"]
    assert ct["windows"] == len(starts[0]) * len(starts[1]) * len(starts[2])
    assert positive(ct["seconds_per_case"]) and positive(ct["windows_per_s"])

    layers = sections["layers"]
    assert {r["operation"] for r in layers["rows"]} == {"conv", "upsample"} and not layers["truncated"]
    for row in layers["rows"]:
        assert set(row["seconds"]) == set(default_candidates(row["operation"])) and not row["errors"]
        assert all(positive(s) for s in row["seconds"].values())
    assert all(t["fastest"] in t["network_seconds"] for t in layers["totals"])

    markdown = md_file.read_text()
    assert "DRY RUN" in markdown
    headings = [line for line in markdown.splitlines() if line.startswith("## ")]
    for title in ("Pallas upsampling", "Matmul peak", "Train step", "CT through", "per layer shape"):
        assert any(title in heading for heading in headings), headings
    assert "| float32 | medseg-jax default |" in markdown and "| bfloat16 | plain flax" in markdown
    assert "| pallas_upsample | ok |" in markdown and "| 24x24x20 | 16x16x16 | bfloat16 | 8 |" in markdown


def test_a_failing_section_is_recorded_and_fails_the_campaign():
    def broken():
        raise RuntimeError("kernel did not compile")

    record = accelerator.run_section(broken, Budget(60.0))
    assert record["status"] == "failed" and "RuntimeError: kernel did not compile" in record["error"]
    assert accelerator.run_section(broken, Budget(0.0))["status"] == "skipped"  # nothing starts past the budget
    fine = accelerator.run_section(lambda: {"results": {}}, Budget(60.0))
    report = {
        "sections": {
            "matmul_peak": fine,
            "pallas_upsample": {"status": "ok", "checks": [{"passed": True}, {"passed": False}]},
            "layers": record,
        }
    }
    summary = accelerator.summarize_campaign(report)
    assert not summary["passed"] and summary["failed_sections"] == ["layers"] and summary["checks_failed"] == 1
    report["sections"] = {"matmul_peak": fine}
    assert accelerator.summarize_campaign(report)["passed"]


def test_the_markdown_renders_failed_and_skipped_sections():
    report = {
        "meta": {
            "backend": "gpu",
            "device_kind": "NVIDIA H200",
            "dry_run": False,
            "started": "2026-01-01T00:00:00+00:00",
            "device_count": 1,
            "versions": {"jax": "0.12.0"},
            "command": "python -m medseg_jax.bench.accelerator",
            "torch_baseline": "not run: disabled (--no-torch)",
            "flop_convention": "2 FLOPs per multiply-add",
        },
        "sections": {
            "train_step": {"status": "failed", "wall_s": 1.0, "error": "OOM | out of memory"},
            "ct_inference": {"status": "skipped", "error": "the time budget of 360 s was spent before it"},
        },
    }
    text = markdown_report(report)
    assert "| train_step | failed | 1.00 s | OOM / out of memory |" in text
    assert "| ct_inference | skipped |" in text and "No figures (skipped)." in text


def test_bad_flags_exit_2(capsys):
    for argv in (["--runs", "0"], ["--sections", "everything"]):
        with pytest.raises(SystemExit) as exc:
            accelerator.main(argv)
        assert exc.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown accelerator sections"):
        accelerator.run_campaign(dry_run=True, sections=["pallas"])
