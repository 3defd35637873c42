"""The accelerator campaign's Markdown file and closing summary, from the report
:func:`medseg_jax.bench.accelerator.run_campaign` returns (kept apart from the measuring code: a report
of a run cut short, or of sections that failed, must still render)."""

from __future__ import annotations

from medseg_jax.bench.report import seconds

SECTION_TITLES = {
    "pallas_upsample": "Pallas upsampling against matmul (values and gradients)",
    "matmul_peak": "Matmul peak (same run)",
    "train_step": "Train step: nnU-Net 3D full resolution",
    "ct_inference": "CT through sliding-window inference",
    "layers": "Conv and upsampling implementations per layer shape (forward + backward)",
}


def tflops(value) -> str:
    return "" if value is None else f"{value / 1e12:.3g}"


def percent(value) -> str:
    return "" if value is None else f"{value:.1%}"


def shape_text(values) -> str:
    return "x".join(map(str, values))


def pallas_lines(section: dict) -> list[str]:
    if not section.get("checks"):
        return []
    mode = "interpreted (no Pallas compiler on this backend)" if section.get("interpreted") else "compiled"
    lines = [
        f"Mode: {mode}. Reference: {section.get('reference')} on the same inputs; error = max |a - b| / "
        "max |reference| over the output and the input, kernel and bias gradients (worst of the four); "
        "the matmul implementation's own error in the checked dtype is shown beside it.",
        "",
        "| dtype | shape | max abs error | max rel error | matmul's rel error | tolerance | result |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    number = lambda c, key: f"{c[key]:.2e}" if c.get(key) is not None else ""
    for c in section.get("checks", []):
        result = "pass" if c["passed"] else f"FAIL {c.get('error', '')}".strip().replace("|", "/")
        tolerance = f"{c['tolerance']:.0e}" if "tolerance" in c else ""
        lines.append(
            f"| {c['dtype']} | {c['shape']} | {number(c, 'max_abs_error')} | {number(c, 'max_rel_error')} | "
            f"{number(c, 'matmul_max_rel_error')} | {tolerance} | {result[:300]} |"
        )
    return lines


def matmul_lines(section: dict) -> list[str]:
    if not section.get("results"):
        return []
    lines = ["| dtype | size | median | TFLOP/s |", "| --- | ---: | ---: | ---: |"]
    for dtype, m in section.get("results", {}).items():
        lines.append(f"| {dtype} | {m['size']}^3 | {seconds(m['median_s'])} | {tflops(m['flop_per_s'])} |")
    return lines


def train_step_lines(section: dict) -> list[str]:
    if not section.get("rows") and not section.get("problems"):
        return []
    topology = section.get("topology") or {}
    lines = []
    if topology:
        lines += [
            f"Patch {shape_text(topology['patch'])}, batch {topology['batch']}, {len(topology['features'])} stages, "
            f"features {', '.join(map(str, topology['features']))}, deep supervision, SGD Nesterov + clip 12.",
            "",
        ]
    lines += [
        "| dtype | implementation | runs as | step (median) | spread | compile | TFLOP/s | of bf16 matmul peak "
        "| vs plain flax |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in section.get("rows", []):
        runs_as = r.get("resolved") or (f"torch {r['torch']}, autocast {r['autocast']}" if "torch" in r else "")
        speedup = f"{r['speedup_vs_baseline']:.2f}x" if "speedup_vs_baseline" in r else ""
        lines.append(
            f"| {r['dtype']} | {r['implementation']} | {runs_as} | {seconds(r['median_s'])} | {r['spread']:.0%} | "
            f"{seconds(r.get('compile_s', 0.0))} | {tflops(r.get('flop_per_s'))} | "
            f"{percent(r.get('fraction_of_bf16_matmul_peak'))} | {speedup} |"
        )
    for p in section.get("problems", []):
        lines.append(f"\n{p['implementation']} ({p['dtype']}): {p.get('error') or 'skipped: ' + p['skipped']}")
    return lines


def ct_lines(section: dict) -> list[str]:
    if "seconds_per_case" not in section:
        return []
    s = section
    return [
        f"Step {s['step']}, {s['blend']} blending, mirroring over axes {s['mirror_axes']} ({s['mirrorings']} "
        f"predictions per window), {s['window_batch']} windows per network call, parameters: {s['parameters']}.",
        "",
        "| volume | patch | dtype | windows | seconds per case | windows/s | network passes/s | TFLOP/s "
        "| of bf16 matmul peak | compile |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {shape_text(s['volume'])} | {shape_text(s['patch'])} | {s['dtype']} | {s['windows']} | "
        f"{seconds(s['seconds_per_case'])} | {s['windows_per_s']:.2f} | {s['network_passes_per_s']:.2f} | "
        f"{tflops(s['flop_per_s'])} | {percent(s.get('fraction_of_bf16_matmul_peak'))} | {seconds(s['compile_s'])} |",
    ]


def layer_lines(section: dict) -> list[str]:
    if not section.get("rows"):
        return []
    lines = [
        "| dtype | operation | shape | layers | seconds each (per implementation) | fastest | auto |",
        "| --- | --- | --- | ---: | --- | --- | --- |",
    ]
    for r in section.get("rows", []):
        cells = [f"{n} {seconds(s)}" for n, s in sorted(r["seconds"].items(), key=lambda item: item[1])]
        cells += [f"{n} FAILED" for n in r["errors"]]
        lines.append(
            f"| {r['dtype']} | {r['operation']} | {r['shape']} | {r['count']} | {', '.join(cells)} | "
            f"{r['fastest'] or ''} | {r['auto']} |"
        )
    totals = section.get("totals", [])
    if totals:
        lines += [
            "",
            "Whole network (seconds x layers, summed):",
            "",
            "| dtype | operation | per implementation | fastest | auto | complete |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for t in totals:
            fastest_first = sorted(t["network_seconds"].items(), key=lambda item: item[1])
            network = [f"{n} {seconds(s)}" for n, s in fastest_first] + [f"{n} FAILED" for n in t["failed"]]
            lines.append(
                f"| {t['dtype']} | {t['operation']} | {', '.join(network)} | {t['fastest'] or ''} | {t['auto']} | "
                f"{'yes' if t['complete'] else 'no'} |"
            )
    if section.get("note"):
        lines += ["", section["note"]]
    return lines


RENDERERS = {
    "pallas_upsample": pallas_lines,
    "matmul_peak": matmul_lines,
    "train_step": train_step_lines,
    "ct_inference": ct_lines,
    "layers": layer_lines,
}


def markdown_report(report: dict) -> str:
    meta, sections = report["meta"], report["sections"]
    machine = meta.get("machine", {})
    title = f"# Accelerator campaign: {meta['backend']} ({meta['device_kind']})"
    lines = [
        title + (" -- DRY RUN at toy sizes, not a measurement" if meta["dry_run"] else ""),
        "",
        f"Started {meta['started']}, finished {meta.get('finished', '(not finished)')}; "
        f"{meta['device_count']} device(s); {machine.get('cpu_count')} CPUs ({machine.get('cpu')}); "
        f"Python {machine.get('python')}; "
        + ", ".join(f"{name} {version}" for name, version in meta["versions"].items())
        + ".",
        f"Command: `{meta['command']}`. PyTorch baseline: {meta['torch_baseline']}.",
        meta["flop_convention"],
        "",
        "| section | status | wall | error |",
        "| --- | --- | ---: | --- |",
    ]
    for name, s in sections.items():
        error = (s.get("error") or "").replace("|", "/").replace("\n", " ")
        lines.append(f"| {name} | {s['status']} | {seconds(s.get('wall_s', 0.0))} | {error[:300]} |")
    for name, s in sections.items():
        lines += ["", f"## {SECTION_TITLES[name]}", ""]
        lines += RENDERERS[name](s) or [f"No figures ({s['status']})."]
    return "\n".join(lines) + "\n"


def summary_text(report: dict) -> str:
    """The few lines printed at the end of a campaign."""
    meta, sections, summary = report["meta"], report["sections"], report["summary"]
    verdict = "PASSED" if summary["passed"] else "FAILED"
    lines = [
        f"accelerator campaign{' (dry run)' if meta['dry_run'] else ''} on {meta['backend']} "
        f"({meta['device_kind']}): {verdict}"
    ]
    if summary["failed_sections"] or summary["skipped_sections"]:
        lines.append(
            f"  failed: {summary['failed_sections'] or 'none'}; skipped: {summary['skipped_sections'] or 'none'}"
        )
    pallas = sections.get("pallas_upsample", {})
    if "checks" in pallas:
        worst = max((c.get("max_rel_error") or 0.0 for c in pallas["checks"]), default=0.0)
        mode = "interpreted" if pallas["interpreted"] else "compiled"
        passed = summary["checks"] - summary["checks_failed"]
        lines.append(
            f"  pallas upsample ({mode}): {passed}/{summary['checks']} equality checks passed, "
            f"worst relative error {worst:.1e}"
        )
    for dtype, m in sections.get("matmul_peak", {}).get("results", {}).items():
        lines.append(f"  matmul peak {dtype}: {tflops(m['flop_per_s'])} TFLOP/s")
    for r in sections.get("train_step", {}).get("rows", []):
        speedup = f", {r['speedup_vs_baseline']:.2f}x plain flax" if "speedup_vs_baseline" in r else ""
        lines.append(
            f"  train step {r['dtype']} {r['implementation']}: {seconds(r['median_s'])}, "
            f"{tflops(r.get('flop_per_s'))} TFLOP/s, {percent(r.get('fraction_of_bf16_matmul_peak'))} of bf16 peak"
            + speedup
        )
    ct = sections.get("ct_inference", {})
    if "seconds_per_case" in ct:
        lines.append(
            f"  CT {shape_text(ct['volume'])} {ct['dtype']}, {ct['mirrorings']} mirrorings: "
            f"{seconds(ct['seconds_per_case'])} per case, {ct['windows_per_s']:.2f} windows/s"
        )
    layers = sections.get("layers", {})
    if "rows" in layers:
        lines.append(
            f"  layers: {len(layers['rows'])} shape x dtype rows{' (truncated)' if layers['truncated'] else ''}"
        )
    lines.append("  wrote " + ", ".join(report.get("files", [])))
    return "\n".join(lines)
