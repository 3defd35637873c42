"""The accelerator campaign: ``bash benchmarks/accelerator.sh`` (``python -m medseg_jax.bench.accelerator``).

One command, one process, written to run correctly on a GPU or TPU it has never met. Sections, in the
order they run (every figure of one run shares the machine's state):

1. ``pallas_upsample``: the Pallas upsampling compiled for the backend (interpreted only where Pallas
   cannot compile, i.e. on CPU, and the report says so) checked against ``matmul`` -- values and the
   gradients of input, kernel and bias -- for every upsampling shape of the network, float32 and
   bfloat16. The reference is ``matmul`` in float32 at highest precision on the same inputs (in
   bfloat16, ``matmul``'s own bias gradient is summed in bfloat16 and is not a fair yardstick; its error
   is recorded beside). Error: ``max |a - b| / max |reference|`` per output; bounds in
   :data:`~medseg_jax.bench.accelerator_sections.TOLERANCE`.
2. ``matmul_peak``: a large float32 and bfloat16 matmul (:func:`medseg_jax.bench.timing.matmul_reference`),
   the practical peak the other rates are divided by (``fraction_of_bf16_matmul_peak``).
3. ``train_step``: nnU-Net's 3D full-resolution train step (128^3, batch 2, deep supervision, 6 stages,
   32-320 features) in float32 and bfloat16: medseg-jax with ``"auto"`` implementations, plain Flax
   (``xla`` convs + ``conv_transpose`` upsampling) and, where ``torch`` and
   ``dynamic_network_architectures`` import, PyTorch nnU-Net (:mod:`medseg_jax.bench.torch_baseline`;
   on CUDA in the bfloat16 group with nnU-Net's AMP, float16 autocast + ``GradScaler``), timed
   round-robin by :func:`medseg_jax.bench.suite.measure_group`.
4. ``ct_inference``: a synthetic 512x512x300 float32 CT through :func:`~medseg_jax.inference.sliding_window`
   (patch 128^3, step 0.5, Gaussian blending, mirroring over axes 0, 1, 2 = 8 predictions per window) with
   the 3D full-resolution U-Net in bfloat16 and random parameters (the seconds do not depend on them).
5. ``layers``: every distinct conv / upsampling layer shape of that network, forward + backward, every
   implementation that can run here (:func:`medseg_jax.kernels.autotune.time_case` and
   ``default_candidates``), per dtype, with the network total per implementation and what ``"auto"``
   picks: the figures that ``AUTO_PREFERENCES`` (:mod:`medseg_jax.kernels.select`) wants for the backend.

The sections themselves: :mod:`medseg_jax.bench.accelerator_sections`; the Markdown:
:mod:`medseg_jax.bench.accelerator_report`.

FLOPs follow :mod:`medseg_jax.bench.cases`. Timing: :mod:`medseg_jax.bench.timing` (compile apart,
warm-up excluded, ``block_until_ready``, medians). Each section records its error instead of stopping
the campaign. ``--budget-s`` bounds the run: a section (or a member, or a layer shape) due after it is
skipped, which is why the per-layer section, the one most worth cutting, runs last. The JSON and
Markdown files are rewritten after every section, so a run cut short keeps what it measured.
``--dry-run`` runs every section at toy sizes on whatever backend is present (what CI tests).

Exit status: 0 when every section ran and every equality check passed, 1 otherwise (the files are
written either way), 2 for bad flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import os
import shlex
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

from medseg_jax.atomic import json_safe, write_json_atomic, write_text_atomic
from medseg_jax.bench import cases, suite, torch_baseline
from medseg_jax.bench.accelerator_report import markdown_report, summary_text
from medseg_jax.bench.accelerator_sections import (
    TOLERANCE,
    Budget,
    Plan,
    ct_section,
    error_text,
    free_device_memory,
    layers_section,
    matmul_section,
    pallas_section,
    shared_setup,
    torch_device,
    train_step_section,
)
from medseg_jax.bench.command import positive_int
from medseg_jax.errors import ConfigError, MedsegError
from medseg_jax.kernels.select import backend_name

SECTIONS = ("pallas_upsample", "matmul_peak", "train_step", "ct_inference", "layers")
# New work starts only within this many seconds. The piece running when it passes still finishes (the
# longest, the CT's predictions or one train-step member's compile and runs, takes a minute or two on
# an H200 by estimate), and Python and JAX start before it: 6 minutes keeps the run under 8.
DEFAULT_BUDGET_S = 360.0
# Settings that change the figures, recorded with them.
ENVIRONMENT = ("XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE", "JAX_PLATFORMS")

DESCRIPTION = (
    "The accelerator campaign: Pallas upsampling compiled and checked for equality, nnU-Net's 3D "
    "full-resolution train step (float32, bfloat16) against plain Flax and PyTorch nnU-Net, the fraction "
    "of the bf16 matmul peak, a 512x512x300 CT with 8 mirrorings, and every implementation per layer "
    "shape; JSON and Markdown under --out. Exit status 1 when a section failed or a check did not pass."
)
# nnU-Net's 3d_fullres plan for a CT dataset: 128^3 patch, batch 2, 6 stages, features min(32 * 2^i, 320).
FULL = Plan(
    cases.Topology((128, 128, 128), 2, (32, 64, 128, 256, 320, 320), cases.nnunet_strides(3, 6)),
    ct_shape=(512, 512, 300),
    matmul_size=16384,
    runs=5,
    matmul_runs=10,
    ct_runs=2,
)
# Every section's code path at toy sizes (2 stages, a 24x24x20 "CT"): seconds on a CPU.
DRY = Plan(
    cases.Topology((16, 16, 16), 2, (4, 8), cases.nnunet_strides(3, 2)),
    ct_shape=(24, 24, 20),
    matmul_size=128,
    runs=1,
    matmul_runs=2,
    ct_runs=1,
    layer_dtypes=("bfloat16",),
    layer_shapes=1,
)


# --- the campaign ----------------------------------------------------------------------------------


def run_section(fn: Callable[[], dict], budget: Budget) -> dict:
    """``fn()``'s record with its status (``ok``, ``failed``, ``skipped``) and wall seconds; an exception
    becomes a failed record, so that one section cannot cost the others' figures."""
    if budget.spent():
        return {"status": "skipped", "error": f"the time budget of {budget.seconds:.0f} s was spent before it"}
    start = time.perf_counter()
    try:
        body = fn()
    except Exception as exc:
        body = {"status": "failed", "error": error_text(exc), "traceback": traceback.format_exc(limit=6)}
    free_device_memory()
    return {"status": body.pop("status", "ok"), "wall_s": time.perf_counter() - start, **body}


def bf16_peak(report: dict) -> float | None:
    """The bfloat16 matmul's FLOP/s measured earlier in this run (None when that section did not run)."""
    section = report["sections"].get("matmul_peak", {})
    return section.get("results", {}).get("bfloat16", {}).get("flop_per_s")


def versions() -> dict:
    """jax, jaxlib and the backend plugins (``jax-cuda*``, ``libtpu``) installed, by distribution."""
    found = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name in ("jax", "jaxlib", "flax", "libtpu") or name.startswith(("jax-cuda", "jax-rocm", "libtpu")):
            found[name] = dist.version
    return dict(sorted(found.items()))


def campaign_meta(dry_run: bool, command: str, budget_s: float, torch_note: str) -> dict:
    device = jax.devices()[0]
    meta = {
        "dry_run": dry_run,
        "command": command,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "backend": backend_name(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "versions": versions(),
        "machine": suite.machine_info(),
        "budget_s": budget_s,
        "torch_baseline": torch_baseline.versions() if not torch_note else f"not run: {torch_note}",
        "flop_convention": cases.__doc__.split("\n\n")[1].replace("\n", " ") if cases.__doc__ else "",
        "tolerance": TOLERANCE,
    }
    meta["environment"] = {name: os.environ[name] for name in ENVIRONMENT if name in os.environ}
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        meta["device_memory_bytes"] = int(stats["bytes_limit"])
    return meta


def summarize_campaign(report: dict) -> dict:
    sections = report["sections"]
    checks = sections.get("pallas_upsample", {}).get("checks", [])
    return {
        "failed_sections": [n for n, s in sections.items() if s["status"] == "failed"],
        "skipped_sections": [n for n, s in sections.items() if s["status"] == "skipped"],
        "checks": len(checks),
        "checks_failed": sum(not c["passed"] for c in checks),
        "passed": all(s["status"] == "ok" for s in sections.values()) and all(c["passed"] for c in checks),
    }


def run_campaign(
    *,
    dry_run: bool = False,
    out_dir: str | Path = "benchmarks/results",
    runs: int | None = None,
    ct_runs: int | None = None,
    budget_s: float = DEFAULT_BUDGET_S,
    sections: Sequence[str] = SECTIONS,
    torch: bool = True,
    command: str = "",
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Run the campaign's ``sections`` and return the report (``meta``, ``sections``, ``summary``,
    ``files``); the JSON and Markdown files under ``out_dir`` are rewritten after every section."""
    unknown = [name for name in sections if name not in SECTIONS]
    if unknown:
        raise ConfigError(f"unknown accelerator sections {unknown}; choose from {list(SECTIONS)}")
    if (runs is not None and runs < 1) or (ct_runs is not None and ct_runs < 1):
        raise ConfigError(f"runs and ct_runs must be at least 1, got runs={runs}, ct_runs={ct_runs}")
    plan = DRY if dry_run else FULL
    runs, ct_runs = runs or plan.runs, ct_runs or plan.ct_runs
    budget = Budget(budget_s)
    say = progress or (lambda text: None)
    device, torch_note = torch_device(torch)
    setup = shared_setup(plan.topology)
    report: dict[str, Any] = {"meta": campaign_meta(dry_run, command, budget_s, torch_note), "sections": {}}
    report["meta"]["plan"] = json_safe(dataclasses.asdict(plan)) | {"runs": runs, "ct_runs": ct_runs}
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    base = Path(out_dir) / f"accelerator-{backend_name()}{'-dry-run' if dry_run else ''}-{stamp}"
    report["files"] = [str(base.with_suffix(".json")), str(base.with_suffix(".md"))]
    work: dict[str, Callable[[], dict]] = {
        "pallas_upsample": lambda: pallas_section(plan, budget, say),
        "matmul_peak": lambda: matmul_section(plan, say),
        "train_step": lambda: train_step_section(plan, runs, bf16_peak(report), setup, device, budget, say),
        "ct_inference": lambda: ct_section(plan, ct_runs, bf16_peak(report), setup, say),
        "layers": lambda: layers_section(plan, runs, budget, say),
    }
    for name in SECTIONS:
        if name not in sections:
            continue
        say(f"== {name}")
        report["sections"][name] = run_section(work[name], budget)
        report["summary"] = summarize_campaign(report)
        report["meta"]["elapsed_s"] = budget.elapsed()
        write_json_atomic(base.with_suffix(".json"), json_safe(report))
        write_text_atomic(base.with_suffix(".md"), markdown_report(report))
    report["meta"]["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    report["summary"] = summarize_campaign(report)
    write_json_atomic(base.with_suffix(".json"), json_safe(report))
    write_text_atomic(base.with_suffix(".md"), markdown_report(report))
    return report


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bash benchmarks/accelerator.sh", description=DESCRIPTION)
    p.add_argument("--dry-run", action="store_true", help="every section at toy sizes (seconds on a CPU)")
    p.add_argument(
        "--out",
        default="benchmarks/results",
        help="folder for the JSON and Markdown files (default: benchmarks/results)",
    )
    p.add_argument("--runs", type=positive_int, default=None, help="timed runs per member (default: 5; dry run 1)")
    p.add_argument("--ct-runs", type=positive_int, default=None, help="timed CT predictions (default: 2; dry run 1)")
    p.add_argument(
        "--budget-s",
        type=float,
        default=DEFAULT_BUDGET_S,
        help=f"start no new work after this many seconds (default: {DEFAULT_BUDGET_S:.0f})",
    )
    p.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=list(SECTIONS),
        metavar="SECTION",
        help=f"which sections to run, of {', '.join(SECTIONS)} (default: all)",
    )
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch nnU-Net baseline")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    start = time.monotonic()
    progress = lambda line: print(f"[{time.monotonic() - start:6.1f} s] {line}", file=sys.stderr, flush=True)
    try:
        report = run_campaign(
            dry_run=args.dry_run,
            out_dir=args.out,
            runs=args.runs,
            ct_runs=args.ct_runs,
            budget_s=args.budget_s,
            sections=args.sections,
            torch=not args.no_torch,
            command=shlex.join(["python", "-m", "medseg_jax.bench.accelerator", *argv]),
            progress=progress,
        )
    except MedsegError as exc:  # as the medseg-jax command line: one line, exit status 2
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary_text(report))
    return 0 if report["summary"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
