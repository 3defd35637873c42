"""nnU-Net's whole recipe on synthetic CT, measured: 5-fold cross-validation of the 2D and 3D configurations,
find-best (configurations and their ensemble, postprocessing), then the held-out Dice of the chosen model
against the single best fold.

Every step is the ``medseg-jax`` command a user runs (printed as it runs):

    synth (training and held-out phantoms, different seeds) -> plan --dim 2 / --dim 3 -> preprocess ->
    cv (5 folds each) -> find-best CV_2D CV_3D -> predict the held-out scans with
    (a) the find-best model folder (the chosen configuration(s), every fold, the chosen postprocessing),
    (b) the single best fold (the fold with the highest validation Dice of all folds of both configurations),
    (c) for context: each configuration's 5-fold ensemble, and the 2D+3D ensemble -> evaluate.

    python benchmarks/cv_workflow.py --out /tmp/cv_workflow     # about 30 min on 2 CPU cores

The cascade against 3d_fullres, on phantoms planned for a small budget (so that nnU-Net's rule plans 3d_lowres):

    python benchmarks/cv_workflow.py --out /tmp/cv_cascade --voxel-budget 8192 \
        --configurations 3d_fullres 3d_lowres 3d_cascade_fullres

Writes ``OUT/results.json`` and prints a Markdown table (liver / tumour / mean foreground Dice over the
held-out cases). A finished step is not redone when the command is run again with the same ``--out``
(the ``cv`` folds resume; ``find-best`` and the predictions are skipped when their outputs exist).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

DATASET = "Dataset001_SynthLiver"
HU_WINDOW = ("-175", "250")
SHORT_NAMES = {"2d": "2d", "3d_fullres": "3d", "3d_lowres": "3d_lowres", "3d_cascade_fullres": "3d_cascade_fullres"}
CASCADE = "3d_cascade_fullres"


def medseg(*args: str) -> None:
    command = [sys.executable, "-m", "medseg_jax.cli", *args]
    print("$ medseg-jax " + shlex.join(args), flush=True)
    subprocess.run(command, check=True)


def training_settings(dim: int, steps: int) -> list[str]:
    """The demo's quick-training config (AdamW, batch Dice) at a small size, the patch from the plan."""
    shared = [
        f"train.steps={steps}",
        f"train.checkpoint_every={steps}",
        f"train.val_every={steps}",
        f"train.warmup_steps={min(20, steps // 10)}",
        "model.base_features=8",
        "data.num_workers=0",
    ]
    return shared + ["data.patch_size=null", f"data.batch_size={4 if dim == 2 else 2}"]


def foreground_dice(summary_file: Path) -> dict:
    summary = json.loads(summary_file.read_text())
    per_class = {name: values["dice"]["mean"] for name, values in summary["classes"].items()}
    return {**per_class, "foreground": summary["foreground_mean"]["dice"]}


def predict_and_evaluate(models: list[str], name: str, images: Path, labels: Path, dataset_json: Path, out: Path):
    target = out / "heldout_predictions" / name
    if not (target / "evaluation" / "summary.json").is_file():
        medseg("predict", "--model", *models, "-i", str(images), "-o", str(target), "--quiet")
        medseg("evaluate", "--pred", str(target), "--ref", str(labels), "--labels", str(dataset_json), "--quiet")
    return foreground_dice(target / "evaluation" / "summary.json")


def lesion_sizes(label_dir: Path, tumour: int) -> dict:
    """How many tumour lesions (connected components) the label maps hold, and their median size in voxels."""
    import nibabel as nib
    import numpy as np
    from scipy import ndimage

    sizes: list[int] = []
    for path in sorted(label_dir.glob("*.nii.gz")):
        components, count = ndimage.label(np.asarray(nib.load(str(path)).dataobj) == tumour)
        sizes += np.bincount(components.ravel())[1:].tolist()
    return {"lesions": len(sizes), "median_voxels": float(np.median(sizes)) if sizes else None}


def best_single_fold(cv_dirs: dict[str, Path], folds: int) -> tuple[str, int, float]:
    """(configuration, fold, validation Dice) of the fold with the highest mean foreground validation Dice."""
    candidates = []
    for name, cv in cv_dirs.items():
        for fold in range(folds):
            summary = json.loads((cv / f"fold_{fold}" / "validation" / "summary.json").read_text())
            candidates.append((summary["foreground_mean"]["dice"], name, fold))
    dice, name, fold = max(candidates)
    return name, fold, dice


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", type=int, default=30, help="training cases (5-fold cross-validation)")
    parser.add_argument("--heldout", type=int, default=20, help="held-out cases (another seed)")
    parser.add_argument("--shape", type=int, nargs=3, default=(64, 64, 24))
    parser.add_argument("--steps-2d", type=int, default=1000)
    parser.add_argument("--steps-3d", type=int, default=600)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument(
        "--configurations",
        nargs="+",
        choices=tuple(SHORT_NAMES),
        default=["2d", "3d_fullres"],
        help="configurations to cross-validate, in order (3d_cascade_fullres needs 3d_lowres before it)",
    )
    parser.add_argument("--voxel-budget", type=int, default=None, help="plan every configuration for this budget")
    args = parser.parse_args(argv)
    if CASCADE in args.configurations and "3d_lowres" not in args.configurations[: args.configurations.index(CASCADE)]:
        parser.error(f"{CASCADE} reads the 3d_lowres cross-validation: list 3d_lowres before it")
    out = args.out.resolve()
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    shape = [str(s) for s in args.shape]

    raw, heldout_raw = out / "raw", out / "heldout_raw"
    if not (raw / DATASET).is_dir():
        medseg("synth", str(raw), "--cases", str(args.cases), "--seed", "0", "--shape", *shape)
    if not (heldout_raw / DATASET).is_dir():
        medseg("synth", str(heldout_raw), "--cases", str(args.heldout), "--seed", "1", "--shape", *shape)
    dataset = raw / DATASET
    images, labels = heldout_raw / DATASET / "imagesTr", heldout_raw / DATASET / "labelsTr"

    cv_dirs: dict[str, Path] = {}
    for configuration in args.configurations:
        name = SHORT_NAMES[configuration]
        plan, store, cv = out / f"plan_{name}.json", out / f"store_{name}", out / f"cv_{name}"
        if not store.is_dir():
            options = ["--configuration", configuration, "--hu-window", *HU_WINDOW, "--out", str(plan)]
            if args.voxel_budget is not None:
                options += ["--voxel-budget", str(args.voxel_budget)]
            medseg("plan", str(dataset), *options)
            first_stage = ["--previous-stage", str(cv_dirs["3d_lowres"])] if configuration == CASCADE else []
            medseg("preprocess", str(dataset), "--plan", str(plan), "--out", str(store), *first_stage, "--quiet")
        dim = 2 if configuration == "2d" else 3
        steps = args.steps_2d if dim == 2 else args.steps_3d
        settings = [item for setting in training_settings(dim, steps) for item in ("--set", setting)]
        folds = [str(f) for f in range(args.folds)]
        medseg("cv", "--config", "demo", *settings, "--data", str(store), "--out", str(cv), "--folds", *folds)
        cv_dirs[name] = cv

    best_dir = out / "find_best"
    if not (best_dir / "find_best.json").is_file():
        medseg("find-best", *map(str, cv_dirs.values()), "--out", str(best_dir))
    choice = json.loads((best_dir / "find_best.json").read_text())

    dataset_json = dataset / "dataset.json"
    best_name, fold, fold_dice = best_single_fold(cv_dirs, args.folds)

    def heldout(models: list[str], folder: str) -> dict:
        return predict_and_evaluate(models, folder, images, labels, dataset_json, out)

    def all_folds(cv: Path) -> list[str]:
        return [str(cv / f"fold_{f}") for f in range(args.folds)]

    rows = {
        "find-best choice": heldout([str(best_dir / "model")], "find_best"),
        f"single best fold ({best_name} fold {fold})": heldout([str(cv_dirs[best_name] / f"fold_{fold}")], "best_fold"),
    }
    for name, cv in cv_dirs.items():
        rows[f"{name}, {args.folds} folds"] = heldout(all_folds(cv), f"{name}_folds")
    if len(cv_dirs) == 2:  # the pair ensemble find-best compared
        (a, cv_a), (b, cv_b) = cv_dirs.items()
        rows[f"{a} + {b}, {2 * args.folds} folds"] = heldout(all_folds(cv_a) + all_folds(cv_b), f"{a}_{b}_folds")
    load_after = os.getloadavg()[0]
    record = {
        "benchmark": "cv_workflow",
        "settings": vars(args) | {"out": None, "shape": list(args.shape)},
        "cross_validation_dice": choice["options"],
        "choice": {
            "name": choice["best"]["name"],
            "dice": choice["best"]["dice"],
            "configurations": [Path(folder).name for folder in choice["best"]["configurations"]],
            "postprocessing": choice["postprocessing"]["steps"],
        },
        "postprocessing_cv": {key: choice["postprocessing"][key] for key in ("before", "after")},
        "single_best_fold": {"configuration": best_name, "fold": fold, "validation_dice": fold_dice},
        "heldout_dice": rows,
        "tumour_lesions": {
            "training": lesion_sizes(dataset / "labelsTr", tumour=2),
            "heldout": lesion_sizes(labels, tumour=2),
        },
        "seconds": round(time.perf_counter() - started, 1),
        "load_average_1min": {"before": load_before, "after": load_after},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    (out / "results.json").write_text(json.dumps(record, indent=2, default=str))
    print("\ncross-validation (mean foreground Dice):", json.dumps(choice["options"], indent=1))
    print(f"chosen: {choice['best']['name']}, postprocessing {choice['postprocessing']['steps']}")
    print("\n| model | liver | tumour | mean foreground |\n|---|---|---|---|")
    for label, dice in rows.items():
        print(f"| {label} | {dice['liver']:.3f} | {dice['tumour']:.3f} | {dice['foreground']:.3f} |")


if __name__ == "__main__":
    main()
