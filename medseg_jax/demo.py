"""``medseg-jax demo``: the whole library on synthetic CT, end to end, in minutes on a CPU.

Stages (each is what a user runs by hand; ``report/README.md`` lists the commands):

1. synthesise an nnU-Net-layout liver / tumour CT dataset (``raw/``);
2. fingerprint, plan and preprocess it into a zarr store (``store/``);
3. train a U-Net on fold 0's training cases with the sharded loop and Orbax checkpoints (``run/``);
4. copy fold 0's held-out cases to ``heldout/imagesTs`` and ``heldout/labelsTs`` and predict the images
   from the NIfTI files with sliding-window inference and mirroring (``predictions/``), exactly as
   ``medseg-jax predict`` does;
5. evaluate against the labels exactly as ``medseg-jax evaluate`` does (Dice, IoU, HD95, ASSD, NSD,
   volumes, lesion-level detection; the tumour detection figures are the evaluation's);
6. write ``report/``: overlay PNGs, the training curve, ``metrics.csv``, ``summary.json``, ``README.md``.

The report's commands (:func:`stage_commands`) are built from the same values the stages use, so each
runs as printed and reproduces its stage (tested).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"
# What the demo writes into its folder; ``--overwrite`` removes exactly these, nothing else.
DEMO_OUTPUTS = ("raw", "store", "run", "heldout", "predictions", "report", "plan.json", "demo.json")


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo; the defaults are chosen to finish in minutes on 2 CPU cores (README)."""

    cases: int = 40
    steps: int = 1500
    dim: int = 2
    shape: tuple[int, ...] = (96, 96, 32)


def copy_heldout(dataset, case_ids, target: Path) -> tuple[Path, Path]:
    """Hard-link (or copy) the held-out cases into an nnU-Net test layout: ``imagesTs``, ``labelsTs``."""
    images, labels = target / "imagesTs", target / "labelsTs"
    for folder in (images, labels):
        folder.mkdir(parents=True, exist_ok=True)
    for case in (c for c in dataset.cases if c.case_id in case_ids):
        for source, destination in [
            *((p, images / p.name) for p in case.image_paths),
            (case.label_path, labels / case.label_path.name),
        ]:
            if destination.exists():
                destination.unlink()
            try:
                os.link(source, destination)
            except OSError:  # another file system: copy
                shutil.copy2(source, destination)
    return images, labels


def tumour_slice(reference_ras: np.ndarray, tumour: int) -> int:
    """The axial slice with the most tumour (or the most foreground, or the middle one)."""
    from medseg_jax.report import largest_extent_index

    mask = reference_ras == tumour
    return largest_extent_index(mask if mask.any() else reference_ras > 0, axis=2)


def claim_demo_folder(out: Path, record: dict, overwrite: bool = False) -> None:
    """Make ``out`` the folder of the demo described by ``record`` (its settings), before anything is written.

    A new or empty folder is taken. A folder of an earlier demo with the same settings is reused: the
    dataset is rewritten identically and training resumes from its last checkpoint (a killed demo goes
    on where it stopped). A demo folder of other settings is refused unless ``overwrite``, which first
    removes the demo's own outputs (:data:`DEMO_OUTPUTS`); a non-empty folder that is not a demo folder
    is always refused, so a mistyped ``--out`` never touches a user's files.
    """
    from medseg_jax.atomic import write_json_atomic
    from medseg_jax.errors import ConfigError

    marker = out / "demo.json"
    if out.is_dir() and any(out.iterdir()):
        if not marker.is_file():
            raise ConfigError(f"{out}: the folder is not empty and holds no demo (no demo.json); choose another --out")
        if overwrite:
            for name in DEMO_OUTPUTS:
                path = out / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                elif path.exists() or path.is_symlink():
                    path.unlink()
        else:
            try:
                previous = json.loads(marker.read_text())
            except (OSError, ValueError) as exc:
                raise ConfigError(
                    f"{marker}: unreadable demo record ({exc}); use --overwrite to start afresh"
                ) from None
            if previous != record:
                changed = sorted(k for k in record.keys() | previous.keys() if record.get(k) != previous.get(k))
                raise ConfigError(
                    f"{out}: holds a demo with other settings ({', '.join(changed)} differ); "
                    "use another --out, or --overwrite to replace it"
                )
    elif out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker, record)


def run_demo(
    out_dir,
    cases=None,
    steps=None,
    dim=None,
    seed=0,
    shape=None,
    config_path=None,
    overrides=(),
    progress=True,
    overwrite=False,
    log=lambda message: None,
) -> dict:
    """Run every stage into ``out_dir`` and return the summary (also written to ``report/summary.json``).

    ``out_dir`` must be new, empty, or the folder of a demo with the same settings (see
    :func:`claim_demo_folder`; ``overwrite`` replaces a demo of other settings).
    """
    import jax

    from medseg_jax.atomic import json_safe, write_json_atomic
    from medseg_jax.config import load_config
    from medseg_jax.data.dataset import load_dataset, validate_dataset
    from medseg_jax.data.fingerprint import compute_fingerprint
    from medseg_jax.data.plan import make_plan, write_plan
    from medseg_jax.data.preprocess import preprocess_dataset
    from medseg_jax.data.store import CaseStore
    from medseg_jax.data.synthetic import check_phantom_shape, write_synthetic_dataset
    from medseg_jax.errors import ConfigError
    from medseg_jax.evaluation import evaluate_folders, format_table, write_evaluation
    from medseg_jax.inference.predict import predict_input
    from medseg_jax.inference.run_folder import load_run
    from medseg_jax.train.loop import train

    settings = DemoSettings()
    settings = dataclasses.replace(
        settings, **{k: v for k, v in dict(cases=cases, steps=steps, dim=dim, shape=shape).items() if v is not None}
    )
    if settings.cases < 5 or settings.steps < 1:  # 5 folds, each with a held-out case
        raise ConfigError(
            f"the demo needs --cases >= 5 (fold 0 of 5 is held out) and --steps >= 1, "
            f"got {settings.cases} and {settings.steps}"
        )
    config = load_config(
        config_path or DEFAULT_CONFIG,
        [f"train.steps={settings.steps}", f"train.seed={seed}", f"data.seed={seed}", *overrides],
    )
    if config.train.warmup_steps >= settings.steps:
        raise ConfigError(
            f"--steps {settings.steps} is not above the config's train.warmup_steps="
            f"{config.train.warmup_steps}: train longer, or add --set train.warmup_steps=N with a "
            "smaller N"
        )
    settings = dataclasses.replace(settings, shape=check_phantom_shape(settings.shape))
    out = Path(out_dir)
    record = {**dataclasses.asdict(settings), "seed": seed, "config": dataclasses.asdict(config)}
    claim_demo_folder(out, json.loads(json.dumps(record, default=str)), overwrite)
    report_dir = out / "report"
    timings, started = {}, time.perf_counter()

    def stage(name, t0):
        timings[name] = round(time.perf_counter() - t0, 2)
        log(f"[{name}] done in {timings[name]:.1f} s")

    t0 = time.perf_counter()
    dataset_dir = write_synthetic_dataset(out / "raw", settings.cases, seed=seed, shape=settings.shape)
    dataset = load_dataset(dataset_dir)
    validate_dataset(dataset)
    stage("synthesise", t0)

    t0 = time.perf_counter()
    if config.data.patch_size and len(config.data.patch_size) != settings.dim:
        # the demo config's patch is 2D: for --dim 3 the plan sizes a 3D patch for a similar budget
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, patch_size=None, batch_size=2))
    patch = config.data.patch_size
    budget = (config.data.batch_size or 2) * int(np.prod(patch)) if patch else 2 * int(np.prod(settings.shape))
    plan_options: dict[str, Any] = {"dim": settings.dim, "voxel_budget": budget, "hu_window": (-175.0, 250.0)}
    plan = make_plan(compute_fingerprint(dataset), **plan_options)
    write_plan(plan, out / "plan.json")
    store = CaseStore(out / "store", chunk_shape=(*settings.shape[:2], 1) if settings.dim == 2 else None)
    preprocess_dataset(dataset, plan, store, progress=progress)  # records the plan in the store first
    stage("plan+preprocess", t0)

    t0 = time.perf_counter()
    # the demo predicts the fold's validation cases itself below, from their files, as a user would
    result = train(config, out / "store", out / "run", fold=0, progress=progress, log=log, final_validation=False)
    stage("train", t0)

    t0 = time.perf_counter()
    heldout = result.split["val"]
    images_dir, labels_dir = copy_heldout(dataset, heldout, out / "heldout")
    model, params, plan, run_config = load_run(out / "run")
    predictions = predict_input(
        images_dir, out / "predictions", model, params, plan, run_config.inference, progress=progress
    )
    stage("predict", t0)

    t0 = time.perf_counter()
    report_dir.mkdir(exist_ok=True)
    nsd_tolerance_mm = 2.0 * max(plan["target_spacing"][:2])
    rows, evaluation = evaluate_folders(
        out / "predictions", labels_dir, labels=dict(plan["labels"]), nsd_tolerance_mm=nsd_tolerance_mm, progress=False
    )
    write_evaluation(report_dir, rows, evaluation)
    tumour = tumour_class(plan["labels"])
    write_pictures(out, report_dir, plan, heldout, rows, tumour)
    stage("evaluate+report", t0)

    classes = evaluation["classes"]
    summary = {
        "metrics": {
            name: {metric: classes[name][metric]["mean"] for metric in ("dice", "hd95", "nsd")}
            | {"dice_global": classes[name]["dice_global"]}
            for name in classes
        },
        "tumour_detection": evaluation["classes"][tumour]["lesions"],
        "heldout_cases": heldout,
        "settings": dataclasses.asdict(settings) | {"seed": seed, "train_steps_run": result.step},
        "final_loss": result.final_loss,
        "seconds": timings | {"total": round(time.perf_counter() - started, 2)},
        "devices": [str(d) for d in jax.devices()],
        "predict_seconds_per_case": [p.get("seconds") for p in predictions],
        "report_dir": str(report_dir),
    }
    write_json_atomic(report_dir / "summary.json", json_safe(summary | {"evaluation": evaluation}))
    commands = stage_commands(out, dataset_dir, settings, seed, plan_options, nsd_tolerance_mm)
    write_report_readme(report_dir, summary, format_table(evaluation), commands)
    return summary


def tumour_class(labels: dict[str, int]) -> str:
    """The name of the class whose lesions the demo counts: "tumour", else the highest label."""
    return "tumour" if "tumour" in labels else max(labels, key=lambda name: labels[name])


def stage_commands(
    out: Path, dataset: Path, settings: DemoSettings, seed: int, plan_options: dict, nsd_tolerance_mm: float
) -> list[list[str]]:
    """The ``medseg-jax`` command lines that redo each stage of a demo into its own folders.

    Built from the values the stages used (the plan's options, the NSD tolerance), with absolute paths,
    so that each runs as printed from any folder: ``plan`` writes the demo's plan, ``preprocess`` then
    finds the demo's store made with it, ``train`` resumes the finished run, ``evaluate`` writes the
    same ``metrics.csv`` to ``predictions/evaluation``.
    """
    out, dataset = Path(out).resolve(), Path(dataset).resolve()
    plan_file = dataset / f"plan_{plan_options['dim']}d.json"
    low, high = plan_options["hu_window"]
    return [
        [
            "medseg-jax",
            "synth",
            str(out / "raw"),
            "--cases",
            str(settings.cases),
            "--seed",
            str(seed),
            "--shape",
            *map(str, settings.shape),
        ],
        [
            "medseg-jax",
            "plan",
            str(dataset),
            "--dim",
            str(plan_options["dim"]),
            "--hu-window",
            f"{low:g}",
            f"{high:g}",
            "--voxel-budget",
            str(plan_options["voxel_budget"]),
        ],
        ["medseg-jax", "preprocess", str(dataset), "--plan", str(plan_file), "--out", str(out / "store")],
        [
            "medseg-jax",
            "train",
            "--config",
            str(out / "run" / "config.yaml"),
            "--data",
            str(out / "store"),
            "--fold",
            "0",
            "--out",
            str(out / "run"),
        ],
        [
            "medseg-jax",
            "predict",
            "--model",
            str(out / "run"),
            "-i",
            str(out / "heldout" / "imagesTs"),
            "-o",
            str(out / "predictions"),
        ],
        [
            "medseg-jax",
            "evaluate",
            "--pred",
            str(out / "predictions"),
            "--ref",
            str(out / "heldout" / "labelsTs"),
            "--labels",
            str(dataset / "dataset.json"),
            "--nsd-tolerance",
            repr(float(nsd_tolerance_mm)),
        ],
    ]


def write_pictures(out: Path, report_dir: Path, plan: dict, heldout: list[str], rows: list[dict], tumour: str) -> None:
    """Overlays of every held-out case (titled with the evaluation's tumour counts) and the training curve."""
    from medseg_jax.data.image_io import read_nifti
    from medseg_jax.data.volume import to_ras
    from medseg_jax.report import plot_overlay

    labels = {int(v): k for k, v in plan["labels"].items()}
    counts = {row["case"]: row for row in rows if row["class"] == tumour}
    for case in heldout:
        image = to_ras(read_nifti(out / "heldout" / "imagesTs" / f"{case}_0000.nii.gz")).array
        reference = to_ras(read_nifti(out / "heldout" / "labelsTs" / f"{case}.nii.gz")).array
        prediction = to_ras(read_nifti(out / "predictions" / f"{case}.nii.gz")).array
        z = tumour_slice(reference, plan["labels"][tumour])
        found = counts[case]
        plot_overlay(
            image[..., z],
            reference[..., z],
            prediction[..., z],
            report_dir / f"overlay_{case}.png",
            title=f"{case}, axial slice {z}: {found['detected_lesions']}/{found['reference_lesions']} tumours found",
            class_names=labels,
        )
    shutil.copy2(out / "run" / "training_curve.png", report_dir / "training_curve.png")


def write_report_readme(report_dir: Path, summary: dict, table: str, commands: list[list[str]]) -> None:
    from medseg_jax.atomic import write_text_atomic

    s = summary["settings"]
    overlays = "\n".join(f"![{case}](overlay_{case}.png)" for case in summary["heldout_cases"])
    det = summary["tumour_detection"]
    text = f"""# medseg-jax demo report

{s["cases"]} synthetic CT cases ({"x".join(map(str, s["shape"]))} voxels), {s["dim"]}D U-Net,
{s["train_steps_run"]} training steps, seed {s["seed"]}; {summary["seconds"]["total"]:.0f} s in total on
{", ".join(summary["devices"])}.

## Held-out cases (fold 0 validation)

```
{table}
```

Tumour detection (`lesions` of the evaluation in `summary.json`; a reference tumour counts as found when
the prediction overlaps it): {det["detected"]} of {det["reference_lesions"]} found,
{det["false_positives"]} false-positive component(s).

Overlays: CT (window -175..250 HU) with the reference drawn solid and the prediction dashed.

{overlays}

![training curve](training_curve.png)

Files: `metrics.csv` (one row per case and class), `summary.json` (everything above).

## The same, stage by stage

Each command runs as printed and redoes its stage into this demo's folders (`evaluate` writes its
tables to `predictions/evaluation/`):

```bash
{chr(10).join(shlex.join(command) for command in commands)}
```
"""
    write_text_atomic(report_dir / "README.md", text)
