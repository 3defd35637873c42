"""The benchmark suite: :func:`run_benchmarks` measures the groups of :mod:`medseg_jax.bench.cases` and
writes one JSON file and one Markdown table per run.

Method (:mod:`medseg_jax.bench.timing`): ahead-of-time compile (reported separately), one warm-up call,
``runs`` timed calls with ``block_until_ready``, members of a group interleaved round-robin; median
and spread. FLOP convention: :mod:`medseg_jax.bench.cases`. ``fraction_of_matmul`` divides a member's
analytic FLOP/s by a large matmul's FLOP/s measured in the same run (the device's practical peak).
"""

from __future__ import annotations

import datetime
import functools
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np

from medseg_jax.atomic import write_json_atomic, write_text_atomic
from medseg_jax.bench import cases, torch_baseline
from medseg_jax.bench.command import OPERATIONS  # defined beside the flags: --help must not import JAX
from medseg_jax.bench.report import markdown_report
from medseg_jax.bench.timing import matmul_reference, peak_memory_bytes, summarize, time_members
from medseg_jax.errors import ConfigError

DEFAULT_RUNS = {"smoke": 2, "nnunet": 3}
MATMUL_SIZE = {"smoke": 256, "nnunet": 2048}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_info() -> dict:
    device = jax.devices()[0]
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "cpu": cpu_model(),
        "numpy": np.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    for name in ("flax", "scipy"):  # versions of what the figures depend on, where installed
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            pass
    return info


def check_arguments(
    preset: str, dims: Sequence[int], dtypes: Sequence[str], operations: Sequence[str], variants: str = "all"
) -> None:
    if variants not in cases.VARIANT_SETS:
        raise ConfigError(f"benchmark variants must be one of {list(cases.VARIANT_SETS)}, got {variants!r}")
    if preset not in cases.PRESETS:
        raise ConfigError(f"benchmark preset must be one of {sorted(cases.PRESETS)}, got {preset!r}")
    for d in dims:
        if d not in (2, 3):
            raise ConfigError(f"benchmark dims must be 2 and/or 3, got {d!r}")
    for dt in dtypes:
        if dt not in ("float32", "bfloat16"):
            raise ConfigError(f"benchmark dtypes must be float32 and/or bfloat16, got {dt!r}")
    for op in operations:
        if op not in OPERATIONS:
            raise ConfigError(f"unknown benchmark operation {op!r}; choose from {list(OPERATIONS)}")


def groups_for(topology, dtype: str, operations: Sequence[str], torch_enabled: bool, variants: str = "all"):
    """The comparison groups of one (topology, dtype), in reporting order."""
    ops = cases.representative_cases(topology, dtype)
    if "conv" in operations:
        for case in ops[:3]:
            yield cases.op_group(case, backward=False)
            yield cases.op_group(case, backward=True)
    if "upsample" in operations:
        yield cases.op_group(ops[3], backward=False)
        yield cases.op_group(ops[3], backward=True)
    if "conv_block" in operations:
        yield cases.conv_block_group(topology, dtype)
    if "unet_forward" in operations:
        yield cases.forward_group(topology, dtype, variants=variants)
    if "train_step" in operations:
        torch_member = None
        if torch_enabled:
            torch_member = lambda: torch_baseline.prepare_train_step(topology, dtype)  # noqa: E731
        yield cases.train_step_group(topology, dtype, torch_member, variants)
    if "sliding_window" in operations:
        group = cases.sliding_window_group(topology, dtype)
        if group is not None:
            yield group


def inference_groups(preset: str, dtype: str, torch_enabled: bool, variants: str):
    """The 3D network's forward pass on inference windows (:data:`cases.INFERENCE_PRESETS`), against
    PyTorch's where installed."""
    for topology in cases.INFERENCE_PRESETS[preset]:
        torch_member = None
        if torch_enabled:
            torch_member = functools.partial(torch_baseline.prepare_forward, topology, dtype)
        yield cases.forward_group(topology, dtype, torch_member, variants, name="inference forward")


def measure_group(group: cases.Group, runs: int, matmul_flop_per_s: float | None) -> list[dict]:
    """Prepare every member, time them round-robin, and return one result row per member."""
    prepared = {}
    first_call = {}
    for name, prepare in group.members.items():
        prepared[name] = prepare()
        start = time.perf_counter()
        prepared[name].call()  # the warm-up call, timed: for eagerly compiled members it holds compilation
        first_call[name] = time.perf_counter() - start
    samples = time_members(prepared, runs, warmup=0)
    rows = []
    for name, times in samples.items():
        summary = summarize(times)
        info = dict(prepared[name].info)
        info.setdefault("compile_s", max(0.0, first_call[name] - summary["median_s"]))
        row = {
            "group": group.name,
            "operation": group.operation,
            "dims": group.dims,
            "dtype": group.dtype,
            "shape": group.shape,
            "implementation": name,
            **summary,
            **info,
        }
        if group.flops_analytic:
            row["flops_analytic"] = group.flops_analytic
            row["flop_per_s"] = group.flops_analytic / summary["median_s"]
            if matmul_flop_per_s:
                row["fraction_of_matmul"] = row["flop_per_s"] / matmul_flop_per_s
        rows.append(row)
    baseline = next((r for r in rows if r["implementation"] == group.baseline), None)
    for row in rows:
        if baseline is not None:
            row["speedup_vs_baseline"] = baseline["median_s"] / row["median_s"]
            row["baseline"] = group.baseline
    peak = peak_memory_bytes()
    if peak is not None:
        for row in rows:
            row["device_peak_bytes_so_far"] = peak
    return rows


def run_benchmarks(
    preset: str = "smoke",
    *,
    dims: Sequence[int] = (2, 3),
    dtypes: Sequence[str] = ("float32",),
    operations: Sequence[str] = OPERATIONS,
    runs: int | None = None,
    out_dir: str | os.PathLike | None = None,
    torch: bool = True,
    variants: str = "all",
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Run the suite and return ``{"meta", "matmul_reference", "results", "layer_profile"}``.

    Args:
      preset: ``"smoke"`` (toy shapes, seconds; what CI runs) or ``"nnunet"`` (nnU-Net's default 2D
        256^2 x batch 2 and 3D 64^3 x batch 2 networks and their op shapes).
      dims / dtypes / operations: which subsets to run (see :data:`OPERATIONS`).
      runs: timed calls per member (default 2 for smoke, 3 for nnunet).
      out_dir: when given, ``benchmark-<preset>-<UTC time>.json`` and ``.md`` are written there.
      torch: include the PyTorch nnU-Net baseline in the train-step and inference groups when it is
        installed and the JAX backend is the CPU (the baseline runs on the CPU); the network groups'
        ratios are then against it.
      variants: ``"all"`` network formulations, or ``"fast"`` (the default and its XLA-only fallback).
      operations ``"inference"``: the 3D forward pass on 128^3 windows, batch 1 and 2 (``nnunet``).
      progress: called with a line of text before each group (the CLI prints it).
    """
    check_arguments(preset, dims, dtypes, operations, variants)
    runs = runs or DEFAULT_RUNS[preset]
    say = progress or (lambda text: None)
    torch_enabled = torch and torch_baseline.available() and jax.default_backend() == "cpu"
    meta = {
        "preset": preset,
        "dims": list(dims),
        "dtypes": list(dtypes),
        "operations": list(operations),
        "runs": runs,
        "variants": variants,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "torch_baseline": torch_baseline.versions() if torch_enabled else None,
        "flop_convention": cases.__doc__.split("\n\n")[1].replace("\n", " "),
    }
    matmul = {dt: matmul_reference(MATMUL_SIZE[preset], dt, runs) for dt in dtypes}
    results, profiles = [], []
    for d in dims:
        topology = cases.PRESETS[preset][d]
        for dtype in dtypes:
            groups = list(groups_for(topology, dtype, operations, torch_enabled, variants))
            if d == 3 and "inference" in operations:
                groups += inference_groups(preset, dtype, torch_enabled, variants)
            for group in groups:
                say(f"{d}D {dtype} {group.name} {group.shape}: {', '.join(group.members)}")
                results.extend(measure_group(group, runs, matmul[dtype]["flop_per_s"]))
            if "layers" in operations:
                say(f"{d}D {dtype} layer profile of the default network")
                variant = cases.NETWORK_VARIANTS["medseg-jax default"]
                for row in cases.layer_profile(topology, dtype, variant, runs):
                    profiles.append({"dims": d, "dtype": dtype, "variant": cases.resolved_variant(variant), **row})
    meta["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    meta["load_average_after"] = machine_info().get("load_average")
    report = {"meta": meta, "matmul_reference": matmul, "results": results, "layer_profile": profiles}
    if out_dir is not None:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        base = Path(out_dir) / f"benchmark-{preset}-{stamp}"
        write_json_atomic(base.with_suffix(".json"), report)
        write_text_atomic(base.with_suffix(".md"), markdown_report(report))
        report["files"] = [str(base.with_suffix(".json")), str(base.with_suffix(".md"))]
    return report
