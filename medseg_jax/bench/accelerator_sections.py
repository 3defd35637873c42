"""The sections of the accelerator campaign (:mod:`medseg_jax.bench.accelerator`): each function measures
or checks one thing and returns its record (a dict; ``status`` and ``error`` where something failed).
Failures inside a section (one shape, one implementation, one member) are recorded there and the rest
goes on; the campaign's runner catches whatever escapes a section."""

from __future__ import annotations

import collections
import dataclasses
import functools
import gc
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from medseg_jax.bench import cases, suite, torch_baseline
from medseg_jax.bench.model_tuning import layer_cases
from medseg_jax.bench.timing import Prepared, matmul_reference, prepare_jax, summarize
from medseg_jax.kernels.autotune import OpCase, case_arguments, default_candidates, time_case
from medseg_jax.kernels.select import backend_name, implementations, pallas_interpreted, resolve
from medseg_jax.kernels.timing import time_round_robin

DEFAULT_MEMBER = "medseg-jax default"
TORCH_MEMBER = "pytorch nnU-Net PlainConvUNet"
# Bound on max |pallas - exact| / max |exact| per output (exact: the matmul implementation in float32
# at highest precision on the same inputs). float32: on GPUs Pallas may multiply in TF32 (10-bit
# mantissa), ~1e-3 there and ~1e-6 elsewhere; a wrong block or index gives errors of order 1.
# bfloat16: the outputs themselves are rounded to 8 bits.
TOLERANCE = {"float32": 1e-2, "bfloat16": 3e-2}
OUTPUTS = ("output", "input_grad", "kernel_grad", "bias_grad")
CT_STEP, CT_WINDOW_BATCH = 0.5, 2  # nnU-Net's tile step; windows per network call (x 8 mirrorings)

Say = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Plan:
    """The sizes of one campaign (:data:`medseg_jax.bench.accelerator.FULL` or ``DRY``)."""

    topology: cases.Topology
    ct_shape: tuple[int, ...]
    matmul_size: int
    runs: int
    matmul_runs: int
    ct_runs: int
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    layer_dtypes: tuple[str, ...] = ("bfloat16", "float32")  # bfloat16 first: what one trains in there
    ct_dtype: str = "bfloat16"
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    layer_shapes: int | None = None  # at most this many distinct shapes per operation and dtype (None: all)


@dataclasses.dataclass
class Budget:
    """Wall-clock seconds in which the campaign may start new work."""

    seconds: float
    start: float = dataclasses.field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def spent(self) -> bool:
        return self.elapsed() >= self.seconds


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()[:2000]


def free_device_memory() -> None:
    """Drop what the last piece of work left (PyTorch's cached CUDA blocks included)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def shared_setup(topology: cases.Topology) -> Callable[[], tuple]:
    """``(optimizer, state, batch)`` of :func:`medseg_jax.bench.cases.train_setup`, built once on first
    use and shared by both dtypes and the CT: the parameters are float32 whatever the compute dtype, and
    compiling the network's initialisation costs tens of seconds."""
    return functools.cache(lambda: cases.train_setup(topology, "float32"))


# --- Pallas upsampling against matmul -----------------------------------------------------------------


def upsample_forward_backward(name: str, strides: tuple[int, ...]):
    """``f(x, kernel, bias, cotangent) -> (y, dx, dkernel, dbias)`` of one upsampling implementation."""
    fn = implementations("upsample")[name]

    def forward_backward(x, kernel, bias, cotangent):
        y, vjp = jax.vjp(lambda x, k, b: fn(x, k, b, strides), x, kernel, bias)
        return (y, *vjp(cotangent))

    return jax.jit(forward_backward)


@jax.jit
def max_errors(got, exact):
    """``(max |got - exact|, max |exact|)``, computed where the arrays are (a full-size output is half a
    gigabyte: not worth copying to the host)."""
    got, exact = got.astype(jnp.float32), exact.astype(jnp.float32)
    return jnp.max(jnp.abs(got - exact)), jnp.max(jnp.abs(exact))


def compare(got, exact) -> dict:
    """Max absolute error, and that error over the exact result's largest magnitude (scale-free: the
    bias gradient, a sum over every output voxel, is large)."""
    abs_error, scale = (float(v) for v in max_errors(got, exact))
    return {"max_abs_error": abs_error, "max_rel_error": abs_error / scale if scale > 0 else abs_error}


def equality_check(case: OpCase) -> dict:
    """Pallas and matmul in ``case.dtype`` against matmul in float32 at highest precision on the same
    inputs (values and the three gradients, non-zero bias). The matmul figures are context: in bfloat16
    its bias gradient is summed in bfloat16 (errors near 10% were seen at toy sizes); Pallas sums in float32."""
    x, kernel, _, cotangent = case_arguments(case)
    bias = jax.random.normal(jax.random.key(7), (case.kernel_shape[-1],), jnp.float32).astype(case.dtype)
    args = (x, kernel, bias, cotangent)
    with jax.default_matmul_precision("highest"):  # traced inside: the reference does not use TF32
        exact = upsample_forward_backward("matmul", case.strides)(*(a.astype(jnp.float32) for a in args))
    results = {name: upsample_forward_backward(name, case.strides)(*args) for name in ("pallas", "matmul")}
    errors = {
        output: {name: compare(results[name][i], exact[i]) for name in results} for i, output in enumerate(OUTPUTS)
    }
    worst = max(e["pallas"]["max_rel_error"] for e in errors.values())
    return {
        "max_abs_error": max(e["pallas"]["max_abs_error"] for e in errors.values()),
        "max_rel_error": worst,
        "matmul_max_rel_error": max(e["matmul"]["max_rel_error"] for e in errors.values()),
        "tolerance": TOLERANCE[case.dtype],
        "passed": bool(worst <= TOLERANCE[case.dtype]),  # False for NaN too
        "errors": errors,
    }


def pallas_section(plan: Plan, budget: Budget, say: Say) -> dict:
    """Every upsampling shape of the network, in every dtype of the plan."""
    interpreted = pallas_interpreted()
    if "pallas" not in implementations("upsample"):
        return {"status": "failed", "error": f"jax {jax.__version__} ships no jax.experimental.pallas"}
    checks = []
    for dtype in plan.dtypes:
        found = layer_cases(plan.topology.unet(dtype), plan.topology.input_shape(), dtype)
        for case in dict.fromkeys(c for c in found if c.operation == "upsample"):
            shape = cases.describe(case.input_shape, case.kernel_shape, case.strides)
            row: dict[str, Any] = {"shape": shape, "dtype": dtype, "interpreted": interpreted}
            if budget.spent():  # unverified is not passed
                checks.append({**row, "passed": False, "error": "not run: time budget spent"})
                continue
            say(f"pallas upsample {'(interpreted) ' if interpreted else ''}{dtype} {shape}")
            try:
                row.update(equality_check(case))
            except Exception as exc:  # a kernel that fails to compile at one shape is a finding, not a crash
                row.update(passed=False, error=error_text(exc))
            checks.append(row)
    failed = [c for c in checks if not c["passed"]]
    body: dict[str, Any] = {"interpreted": interpreted, "reference": "matmul, float32, highest precision"}
    body["checks"] = checks
    if failed:
        body.update(status="failed", error=f"{len(failed)} of {len(checks)} equality checks failed")
    return body


# --- the matmul peak ------------------------------------------------------------------------------------


def matmul_section(plan: Plan, say: Say) -> dict:
    results = {}
    for dtype in plan.dtypes:
        say(f"matmul peak {dtype} {plan.matmul_size}^3")
        results[dtype] = matmul_reference(plan.matmul_size, dtype, plan.matmul_runs)
    return {"results": results}


# --- the train step ---------------------------------------------------------------------------------------


def torch_device(enabled: bool) -> tuple[str | None, str]:
    """``(device for the PyTorch baseline or None, why not)``: the CPU on the CPU backend, CUDA on GPUs."""
    if not enabled:
        return None, "disabled (--no-torch)"
    if not torch_baseline.available():
        return None, "torch or dynamic_network_architectures is not installed"
    backend = backend_name()
    if backend == "cpu":
        return "cpu", ""
    if backend == "gpu":
        import torch

        return ("cuda", "") if torch.cuda.is_available() else (None, "the installed torch sees no GPU")
    return None, f"no PyTorch baseline on {backend}"


def train_members(plan: Plan, dtype: str, setup: Callable[[], tuple], device: str | None) -> dict:
    """The members of one dtype's group: medseg-jax default and plain Flax (the step of
    :func:`medseg_jax.bench.cases.train_step_group`, on the shared state), and PyTorch nnU-Net."""
    from medseg_jax.config import LossConfig
    from medseg_jax.train.step import make_train_step

    topology = plan.topology

    def jax_member(variant: tuple[str, str]) -> Callable[[], Prepared]:
        def prepare() -> Prepared:
            optimizer, state, batch = setup()
            step = make_train_step(topology.unet(dtype, *variant), optimizer, LossConfig())
            prepared = prepare_jax(step, state, batch)
            prepared.info["resolved"] = cases.resolved_variant(variant)
            return prepared

        return prepare

    members = {name: jax_member(cases.NETWORK_VARIANTS[name]) for name in (DEFAULT_MEMBER, cases.NETWORK_BASELINE)}
    if device is not None:
        members[TORCH_MEMBER] = lambda: torch_baseline.prepare_train_step(topology, dtype, device=device)
    return members


def already(member: Prepared) -> Callable[[], Prepared]:
    """A prepared member in the shape :class:`medseg_jax.bench.cases.Group` holds (a preparing call)."""
    return lambda: member


def train_step_section(plan: Plan, runs: int, peak, setup, device: str | None, budget: Budget, say: Say) -> dict:
    topology = plan.topology
    rows: list[dict] = []
    problems: list[dict] = []
    shape = cases.describe(topology.input_shape()) + f" stages={len(topology.features)}"
    for dtype in plan.dtypes:
        prepared = {}
        for name, prepare in train_members(plan, dtype, setup, device).items():
            if budget.spent():
                problems.append({"dtype": dtype, "implementation": name, "skipped": "time budget spent"})
                continue
            say(f"train step {dtype} {shape}: {name}")
            try:  # prepared and run once alone, so that one member's failure keeps the others' figures
                member = prepare()
                member.call()
                prepared[name] = member
            except Exception as exc:
                problems.append({"dtype": dtype, "implementation": name, "error": error_text(exc)})
        if prepared:
            say(f"train step {dtype}: timing {len(prepared)} members round-robin, {runs} runs")
            ready = {name: already(member) for name, member in prepared.items()}
            group = cases.Group(
                name="train step",
                operation="train_step",
                dims=3,
                dtype=dtype,
                shape=shape,
                baseline=cases.NETWORK_BASELINE,
                members=ready,
                flops_analytic=3 * cases.network_flops(topology),
            )
            try:
                rows.extend(suite.measure_group(group, runs, peak))
            except Exception as exc:
                problems.append({"dtype": dtype, "implementation": "timing", "error": error_text(exc)})
        del prepared
        free_device_memory()
    for row in rows:
        row["fraction_of_bf16_matmul_peak"] = row.pop("fraction_of_matmul", None)
    body: dict[str, Any] = {"rows": rows, "problems": problems, "topology": dataclasses.asdict(topology)}
    errors = [f"{p['implementation']} {p['dtype']}: {p['error']}" for p in problems if "error" in p]
    if errors:
        body.update(status="failed", error="; ".join(errors))
    return body


# --- a CT through sliding-window inference ---------------------------------------------------------------


def ct_section(plan: Plan, runs: int, peak, setup, say: Say) -> dict:
    from medseg_jax.inference.sliding_window import compute_window_starts, sliding_window

    topology, dtype, patch = plan.topology, plan.ct_dtype, plan.topology.patch
    model = topology.unet(dtype, deep_supervision=False)
    apply = model.apply  # one function object: sliding_window reuses its compiled program across calls
    params = setup()[1].params  # the heads exist with or without deep supervision: the same tree
    image = jax.random.normal(jax.random.key(1), (*plan.ct_shape, topology.in_channels), jnp.float32)
    last: list = []

    def predict() -> None:
        logits = sliding_window(
            apply,
            image,
            patch,
            step=CT_STEP,
            blend="gaussian",
            batch_size=CT_WINDOW_BATCH,
            mirror_axes=plan.mirror_axes,
            num_classes=topology.num_classes,
            params=params,
        )
        last[:] = [jax.block_until_ready(logits)]

    mirrorings = 2 ** len(plan.mirror_axes)
    say(f"CT {'x'.join(map(str, plan.ct_shape))} {dtype}, {mirrorings} mirrorings: first call (compiles)")
    start = time.perf_counter()
    predict()
    first_call = time.perf_counter() - start
    say(f"CT: timing {runs} runs")
    summary = summarize(time_round_robin({"ct": predict}, runs, warmup=0)["ct"])
    finite = bool(jnp.isfinite(last[0]).all())
    padded = [max(s, p) for s, p in zip(plan.ct_shape, patch)]
    windows = math.prod(len(s) for s in compute_window_starts(padded, patch, CT_STEP))
    flops = windows * mirrorings * cases.network_flops(dataclasses.replace(topology, batch=1))
    seconds = summary["median_s"]
    body: dict[str, Any] = {
        "volume": list(plan.ct_shape),
        "patch": list(patch),
        "dtype": dtype,
        "parameters": "random initialisation (the timing does not depend on the weights)",
        "step": CT_STEP,
        "blend": "gaussian",
        "mirror_axes": list(plan.mirror_axes),
        "mirrorings": mirrorings,
        "windows": windows,
        "window_batch": CT_WINDOW_BATCH,
        "network_passes": windows * mirrorings,
        "seconds_per_case": seconds,
        **summary,
        "compile_s": max(0.0, first_call - seconds),
        "windows_per_s": windows / seconds,
        "network_passes_per_s": windows * mirrorings / seconds,
        "flops_analytic": flops,
        "flop_per_s": flops / seconds,
        "fraction_of_bf16_matmul_peak": flops / seconds / peak if peak else None,
        "output_finite": finite,
    }
    if not finite:
        body.update(status="failed", error="the predicted logits hold NaN or infinity")
    return body


# --- conv and upsampling implementations per layer shape ---------------------------------------------------


def time_candidates(case: OpCase, names: Sequence[str], runs: int) -> tuple[dict[str, float], dict[str, str]]:
    """Median seconds per implementation (round-robin); where one fails, the others are timed alone."""
    try:
        return time_case(case, names, runs), {}
    except Exception:
        seconds: dict[str, float] = {}
        errors: dict[str, str] = {}
        for name in names:
            try:
                seconds.update(time_case(case, [name], runs))
            except Exception as exc:
                errors[name] = error_text(exc)
        return seconds, errors


def layer_row(case: OpCase, count: int, runs: int) -> dict:
    names = default_candidates(case.operation)
    seconds, errors = time_candidates(case, names, runs)
    flops = 3 * cases.conv_flops(case)  # forward + backward, one layer
    return {
        "dtype": case.dtype,
        "operation": case.operation,
        "shape": cases.describe(case.input_shape, case.kernel_shape, case.strides),
        "count": count,
        "seconds": seconds,
        "errors": errors,
        "flops_analytic": flops,
        "flop_per_s": {n: flops / s for n, s in seconds.items() if s > 0},
        "fastest": min(seconds, key=seconds.__getitem__) if seconds else None,
        "auto": resolve(case.operation, "auto"),
    }


def network_totals(rows: list[dict], complete: bool) -> list[dict]:
    """Per dtype and operation: seconds x layers summed over the shapes timed, per implementation (an
    implementation that failed at some shape gets no total); ``complete``: every shape was timed."""
    groups: dict[tuple[str, str], list[dict]] = collections.defaultdict(list)
    for row in rows:
        groups[(row["dtype"], row["operation"])].append(row)
    totals = []
    for (dtype, operation), members in groups.items():
        names = sorted({n for r in members for n in (*r["seconds"], *r["errors"])})
        everywhere = [n for n in names if all(n in r["seconds"] for r in members)]
        network = {n: sum(r["count"] * r["seconds"][n] for r in members) for n in everywhere}
        totals.append(
            {
                "dtype": dtype,
                "operation": operation,
                "network_seconds": network,
                "failed": [n for n in names if n not in everywhere],
                "complete": complete,
                "fastest": min(network, key=network.__getitem__) if network else None,
                "auto": resolve(operation, "auto"),
            }
        )
    return totals


def layers_section(plan: Plan, runs: int, budget: Budget, say: Say) -> dict:
    topology = plan.topology
    rows = []
    truncated = False
    for dtype in plan.layer_dtypes:
        counts = collections.Counter(layer_cases(topology.unet(dtype), topology.input_shape(), dtype))
        if plan.layer_shapes is not None:
            firsts = [[c for c in counts if c.operation == op][: plan.layer_shapes] for op in ("conv", "upsample")]
            counts = collections.Counter({c: counts[c] for c in counts if any(c in f for f in firsts)})
        for case, count in counts.items():
            if budget.spent():
                truncated = True
                break
            shape = cases.describe(case.input_shape, case.kernel_shape, case.strides)
            say(f"layer {dtype} {case.operation} {shape} x{count}")
            rows.append(layer_row(case, count, runs))
        if truncated:
            break
    body: dict[str, Any] = {
        "rows": rows,
        "totals": network_totals(rows, not truncated and plan.layer_shapes is None),
        "truncated": truncated,
    }
    if truncated:
        body["note"] = "Stopped at the time budget: the layer shapes after the last row were not timed."
    failing = [f"{r['operation']} {r['dtype']} {r['shape']}: {n}" for r in rows for n in r["errors"]]
    if failing:
        body.update(status="failed", error="implementations failed at " + "; ".join(failing))
    return body
