"""Markdown tables of a benchmark report (the dict :func:`medseg_jax.bench.suite.run_benchmarks` returns)."""

from __future__ import annotations


def seconds(value: float) -> str:
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"


def flops(value: float | None) -> str:
    return "" if value is None else f"{value / 1e9:.1f}"


def results_table(results: list[dict]) -> list[str]:
    lines = [
        "| dims | dtype | group | shape | implementation | median | spread | compile | GFLOP/s | of matmul "
        "| vs baseline |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        fraction = f"{r['fraction_of_matmul']:.0%}" if "fraction_of_matmul" in r else ""
        speedup = f"{r['speedup_vs_baseline']:.2f}x" if "speedup_vs_baseline" in r else ""
        lines.append(
            f"| {r['dims']}D | {r['dtype']} | {r['group']} | {r['shape']} | {r['implementation']} | "
            f"{seconds(r['median_s'])} | {r['spread']:.0%} | {seconds(r.get('compile_s', 0.0))} | "
            f"{flops(r.get('flop_per_s'))} | {fraction} | {speedup} |"
        )
    return lines


def profile_table(profile: list[dict]) -> list[str]:
    if not profile:
        return []
    lines = [
        "",
        "Layer profile of the default network's training step (forward + backward per layer shape):",
        "",
        "| dims | dtype | operation | implementation | shape | layers | each | total | GFLOP/s |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in sorted(profile, key=lambda r: (r["dims"], r["dtype"], -r["seconds_total"])):
        rate = r["flops_analytic"] / r["seconds_total"] if r["seconds_total"] > 0 else None
        lines.append(
            f"| {r['dims']}D | {r['dtype']} | {r['operation']} | {r['implementation']} | {r['shape']} | "
            f"{r['count']} | {seconds(r['seconds_each'])} | {seconds(r['seconds_total'])} | {flops(rate)} |"
        )
    return lines


def markdown_report(report: dict) -> str:
    meta = report["meta"]
    machine = meta["machine"]
    matmul = ", ".join(
        f"{dt}: {flops(m['flop_per_s'])} GFLOP/s ({m['size']}^3)" for dt, m in report["matmul_reference"].items()
    )
    lines = [
        f"Preset `{meta['preset']}`, {meta['runs']} timed runs per member (median), started {meta['started']}.",
        f"Machine: {machine['platform']}, {machine['cpu_count']} CPUs, backend {machine['backend']} "
        f"({machine['device_kind']}), jax {machine['jax']}, load average {machine.get('load_average')}.",
        f"Matmul reference: {matmul}.",
    ]
    if meta.get("torch_baseline"):
        lines.append(f"PyTorch baseline: {meta['torch_baseline']}.")
    lines += ["", *results_table(report["results"]), *profile_table(report.get("layer_profile", []))]
    return "\n".join(lines) + "\n"
