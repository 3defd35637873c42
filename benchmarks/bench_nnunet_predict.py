"""``medseg-jax predict`` against ``nnUNetv2_predict`` on the same nnU-Net model and the same CT volume.

The model is a realistic nnU-Net v2 3D full-resolution network: nnU-Net's own default planner
(``ExperimentPlanner``, PlainConvUNet) plans it for a CT of the benchmark's size, and nnU-Net's trainer
class builds and initialises it (the weights are not trained; the time of a prediction does not depend
on them). medseg-jax imports that folder with ``import-nnunet``; both predictors then run on the same
NIfTI file with their defaults (sliding window with step 0.5, Gaussian blending, mirroring on all three
axes), each as one command from the shell, so the times include start-up, JIT compilation or model
loading, preprocessing and writing: what a user waits for.

Needs a second Python with ``nnunetv2`` and a CPU ``torch`` (see ``tests/nnunet/make_fixtures.py`` for
the side environment). From the repository root::

    python -m benchmarks.bench_nnunet_predict --nnunet-python /path/to/nnunet-venv/bin/python \\
        --work /tmp/nnunet-bench --runs 3 --out benchmarks/results

``--medseg-python`` runs medseg-jax from other Pythons too (one per jax line); every medseg-jax run is
made twice, with the implementations ``auto`` picks (the oneDNN convolution where it builds) and with
the oneDNN convolution off (``model.conv_implementation`` set to the next preference). Runs are
interleaved (nnU-Net, then each medseg-jax variant, repeated), and the machine's load is recorded
before and after.

The same file, run by the nnU-Net Python with ``make-model``, writes the nnU-Net model folder (it never
imports medseg-jax there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

DATASET_ID = 902
DATASET = f"Dataset{DATASET_ID:03d}_BenchCT"
TRAINER, PLANS, CONFIGURATION = "nnUNetTrainer", "nnUNetPlans", "3d_fullres"
MODEL_FOLDER = f"{TRAINER}__{PLANS}__{CONFIGURATION}"
LABELS = {"background": 0, "liver": 1, "tumour": 2}
FINGERPRINT_CASES = 20  # the planner only reads the fingerprint: a dataset of identical scans


# ----------------------------------------------------------------------------------- nnU-Net side ----
def write_fingerprint(image: Path, preprocessed: Path) -> None:
    """A dataset fingerprint of ``FINGERPRINT_CASES`` scans shaped like ``image`` (SimpleITK's z, y, x
    order, as nnU-Net's fingerprint extractor writes it) with CT-like foreground intensities."""
    import SimpleITK as sitk

    itk = sitk.ReadImage(str(image))
    shape_zyx = list(reversed(itk.GetSize()))
    spacing_zyx = list(reversed(itk.GetSpacing()))
    fingerprint = {
        "foreground_intensity_properties_per_channel": {
            "0": {
                "max": 1500.0,
                "mean": 90.0,
                "median": 80.0,
                "min": -1000.0,
                "percentile_00_5": -100.0,
                "percentile_99_5": 300.0,
                "std": 60.0,
            }
        },
        "median_relative_size_after_cropping": 1.0,
        "shapes_after_crop": [shape_zyx] * FINGERPRINT_CASES,
        "spacings": [spacing_zyx] * FINGERPRINT_CASES,
    }
    preprocessed.mkdir(parents=True, exist_ok=True)
    (preprocessed / "dataset_fingerprint.json").write_text(json.dumps(fingerprint, indent=2))


def make_model(image: Path, label: Path, work: Path) -> Path:
    """Plan with nnU-Net's default planner and save an initialised fold-0 checkpoint; returns the model
    folder (``nnUNet_results/DATASET/MODEL_FOLDER``)."""
    raw, preprocessed, results = work / "nnUNet_raw", work / "nnUNet_preprocessed", work / "nnUNet_results"
    os.environ.update(nnUNet_raw=str(raw), nnUNet_preprocessed=str(preprocessed), nnUNet_results=str(results))
    dataset = raw / DATASET
    for folder in ("imagesTr", "labelsTr"):
        (dataset / folder).mkdir(parents=True, exist_ok=True)
    shutil.copy(image, dataset / "imagesTr" / "bench_000_0000.nii.gz")
    shutil.copy(label, dataset / "labelsTr" / "bench_000.nii.gz")
    meta = {"channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": 1, "file_ending": ".nii.gz"}
    (dataset / "dataset.json").write_text(json.dumps(meta, indent=2))
    write_fingerprint(image, preprocessed / DATASET)
    subprocess.run([str(Path(sys.executable).parent / "nnUNetv2_plan_experiment"), "-d", str(DATASET_ID)], check=True)

    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = json.loads((preprocessed / DATASET / f"{PLANS}.json").read_text())
    plans_manager = PlansManager(plans)
    configuration = plans_manager.get_configuration(CONFIGURATION)
    torch.manual_seed(0)
    network = nnUNetTrainer.build_network_architecture(
        plans_manager, configuration, 1, len(LABELS), enable_deep_supervision=True
    )
    model = results / DATASET / MODEL_FOLDER
    (model / "fold_0").mkdir(parents=True, exist_ok=True)
    (model / "plans.json").write_text(json.dumps(plans, indent=2))
    (model / "dataset.json").write_text(json.dumps(meta, indent=2))
    shutil.copy(preprocessed / DATASET / "dataset_fingerprint.json", model / "dataset_fingerprint.json")
    checkpoint = {
        "network_weights": network.state_dict(),
        "trainer_name": TRAINER,
        "init_args": {"plans": plans, "configuration": CONFIGURATION, "fold": 0, "dataset_json": meta},
        "inference_allowed_mirroring_axes": (0, 1, 2),
        "current_epoch": 0,
    }
    torch.save(checkpoint, model / "fold_0" / "checkpoint_final.pth")
    patch, spacing = list(map(int, configuration.patch_size)), list(map(float, configuration.spacing))
    print(json.dumps({"model": str(model), "patch_size": patch, "spacing": spacing}))
    return model


# ---------------------------------------------------------------------------------- driver side ----
def load_average() -> float:
    return os.getloadavg()[0]


def timed(command: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}")
    return seconds


def python_facts(python: str, code: str) -> str:
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def without_onednn(run: Path, target: Path, python: str) -> Path:
    """A copy of the imported run whose conv implementation is the next CPU preference after onednn."""
    code = "from medseg_jax.kernels import select; print([p for p in select.preferences('conv') if p != 'onednn'][0])"
    fallback = python_facts(python, code)
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(run, target)
    config = target / "config.yaml"
    text = config.read_text()
    if "conv_implementation: auto" not in text:
        raise RuntimeError(f"{config} does not leave conv_implementation at auto")
    config.write_text(text.replace("conv_implementation: auto", f"conv_implementation: {fallback}"))
    return target


def label_agreement(prediction: Path, reference: Path) -> float:
    """Fraction of voxels whose labels are equal (both files on the input's grid)."""
    import nibabel as nib
    import numpy as np

    ours, theirs = (np.asarray(nib.load(path).dataobj) for path in (prediction, reference))
    if ours.shape != theirs.shape:
        raise RuntimeError(f"{prediction} has shape {ours.shape}, {reference} {theirs.shape}")
    return float(np.mean(ours == theirs))


def make_ct(work: Path, shape: tuple[int, int, int]) -> tuple[Path, Path]:
    synth = work / "synth"
    subprocess.run(
        ["medseg-jax", "synth", str(synth), "--cases", "1", "--seed", "3", "--shape", *map(str, shape)], check=True
    )
    dataset = synth / "Dataset001_SynthLiver"
    return dataset / "imagesTr" / "synth_000_0000.nii.gz", dataset / "labelsTr" / "synth_000.nii.gz"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nnunet-python", required=True, help="a Python with nnunetv2 and torch")
    parser.add_argument("--medseg-python", nargs="+", default=[sys.executable], help="Pythons with medseg-jax")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (model, scan, predictions)")
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 256, 100), help="CT grid x y z")
    parser.add_argument("--runs", type=int, default=3, help="runs of nnU-Net and of medseg-jax with its defaults")
    parser.add_argument(
        "--runs-without-onednn", type=int, default=None, help="runs of the variants without oneDNN (default: --runs)"
    )
    parser.add_argument("--out", type=Path, default=None, help="folder for the JSON record")
    args = parser.parse_args(argv)

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    image, label = make_ct(work, tuple(args.shape))
    made = subprocess.run(
        [args.nnunet_python, __file__, "make-model", str(image), str(label), str(work)],
        check=True,
        capture_output=True,
        text=True,
    )
    plan = json.loads(made.stdout.strip().splitlines()[-1])
    model = Path(plan["model"])
    plan["model"] = str(model.relative_to(work))  # the record names no folder of this machine
    cases = work / "input"
    cases.mkdir(exist_ok=True)
    shutil.copy(image, cases / "bench_000_0000.nii.gz")

    commands: dict[str, tuple[list[str], dict[str, str] | None]] = {}
    nnunet_bin = Path(args.nnunet_python).parent
    commands["nnUNetv2_predict"] = (
        [
            str(nnunet_bin / "nnUNetv2_predict_from_modelfolder"),
            "-i",
            str(cases),
            "-o",
            str(work / "out-nnunet"),
            "-m",
            str(model),
            "-f",
            "0",
            "-device",
            "cpu",
        ],
        None,
    )
    versions: dict[str, dict[str, str]] = {}
    for python in args.medseg_python:
        facts = python_facts(
            python, "import sys, jax, jaxlib; print(f'{sys.version.split()[0]} {jax.__version__} {jaxlib.__version__}')"
        )
        py, jax_version, jaxlib_version = facts.split()
        line = f"jax {jax_version}"
        versions[line] = {"python": py, "jax": jax_version, "jaxlib": jaxlib_version}
        tag = line.replace(" ", "-")
        run = work / f"imported-{tag}"
        if run.exists():
            shutil.rmtree(run)
        cli = [python, "-m", "medseg_jax.cli"]
        subprocess.run([*cli, "import-nnunet", str(model), "--out", str(run), "--folds", "0"], check=True)
        runs = {"onednn (auto)": run, "without onednn": without_onednn(run, work / f"imported-{tag}-no-onednn", python)}
        for name, folder in runs.items():
            key = f"medseg-jax predict, {line}, {name}"
            commands[key] = (
                [
                    *cli,
                    "predict",
                    "--model",
                    str(folder),
                    "-i",
                    str(cases),
                    "-o",
                    str(work / f"out-{tag}-{name.split()[0]}"),
                    "--quiet",
                ],
                None,
            )
    times: dict[str, list[float]] = {key: [] for key in commands}
    failures: dict[str, str] = {}
    fallback_runs = args.runs if args.runs_without_onednn is None else args.runs_without_onednn
    torch_version = python_facts(
        args.nnunet_python,
        "import torch, importlib.metadata as m; print(torch.__version__, m.version('nnunetv2'))",
    )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    load_before = load_average()

    def record(load_after: float | None) -> dict:
        return {
            "benchmark": "nnunet_predict",
            "ct_shape_xyz": list(args.shape),
            "plan": plan,
            "runs": args.runs,
            "runs_without_onednn": fallback_runs,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()},
            "load_average_1min": {"before": load_before, "after": load_after},
            "versions": {"medseg-jax": versions, "torch nnunetv2": torch_version},
            "results": result_rows(times, commands, work),
            "failures": failures,
            "complete": load_after is not None,
        }

    def save(load_after: float | None = None) -> dict:
        current = record(load_after)
        if args.out is not None:  # after every run: an interrupted benchmark keeps what it measured
            args.out.mkdir(parents=True, exist_ok=True)
            target = args.out / f"nnunet-predict-{stamp}.json"
            partial = target.with_suffix(".tmp")
            partial.write_text(json.dumps(current, indent=2))
            partial.replace(target)
        return current

    for repetition in range(max(args.runs, fallback_runs)):
        for key, (command, env) in commands.items():
            if key in failures or repetition >= (fallback_runs if key.endswith("without onednn") else args.runs):
                continue
            output = Path(command[command.index("-o") + 1])
            if output.exists():
                shutil.rmtree(output)
            try:
                times[key].append(timed(command, env))
            except RuntimeError as exc:  # recorded, and the other predictors still measured
                failures[key] = str(exc)[-1500:]
                print(f"run {repetition + 1} {key}: FAILED (recorded)", flush=True)
                continue
            print(f"run {repetition + 1} {key}: {times[key][-1]:.1f} s", flush=True)
            save()
    final = save(load_average())
    print(f"\nCT {tuple(args.shape)}, patch {plan['patch_size']}, load {load_before:.2f} -> {load_average():.2f}")
    for row in final["results"]:
        print(
            f"{row['predictor']:<55} median {row['median_s']:7.1f} s  {row['speedup_vs_nnunet']:.2f}x nnU-Net"
            f"  labels equal on {100 * row['labels_equal_to_nnunet']:.3f}% of voxels"
        )
    for key in failures:
        print(f"{key}: failed (see the record)")


def result_rows(times: dict[str, list[float]], commands: dict, work: Path) -> list[dict]:
    """Median, speed-up against nnU-Net's median and label agreement of every predictor measured so far."""
    reference = work / "out-nnunet" / "bench_000.nii.gz"
    if not times.get("nnUNetv2_predict"):
        return []
    nnunet_median = statistics.median(times["nnUNetv2_predict"])
    rows = []
    for key, values in times.items():
        if not values:
            continue
        median = statistics.median(values)
        output = Path(commands[key][0][commands[key][0].index("-o") + 1]) / "bench_000.nii.gz"
        rows.append(
            {
                "predictor": key,
                "seconds": values,
                "median_s": median,
                "speedup_vs_nnunet": nnunet_median / median,
                "labels_equal_to_nnunet": label_agreement(output, reference),
            }
        )
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "make-model":
        make_model(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        main()
