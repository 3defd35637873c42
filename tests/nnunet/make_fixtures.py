"""Make the nnU-Net v2 parity fixtures in ``tests/nnunet/fixtures`` with nnU-Net itself.

The tests never need torch or nnU-Net: they read what this script leaves behind. It needs a Python with
``nnunetv2`` and a CPU ``torch`` (kept apart from medseg-jax's environment), and a synthetic dataset from
medseg-jax. From the repository root (about 15 minutes on two CPU cores):

    medseg-jax synth /tmp/nnunet-synth --cases 10 --seed 7 --shape 40 40 24
    python3.11 -m venv /tmp/nnunet-venv
    /tmp/nnunet-venv/bin/pip install torch==2.13.0 nnunetv2
    # with a CPU-only torch, PyPI's torchvision (built for CUDA) fails to import ("operator torchvision::nms
    # does not exist"); nnU-Net's U-Nets never use it, so empty its operator registrations:
    echo > /tmp/nnunet-venv/lib/python3.11/site-packages/torchvision/_meta_registrations.py
    /tmp/nnunet-venv/bin/python tests/nnunet/make_fixtures.py /tmp/nnunet-synth/Dataset001_SynthLiver \\
        tests/nnunet/fixtures

What it does, with nnU-Net's own commands and classes:

1. the first 8 cases become ``Dataset901_SynthLiver`` (training), the last 2 the held-out test images
   (their orientations and spacings differ, so nnU-Net resamples them and ignores their orientation);
2. ``nnUNetv2_plan_experiment`` with the default planner (2D, PlainConvUNet) and ``nnUNetPlannerResEncM``
   (3D full resolution, ResidualEncoderUNet); the plans are then shrunk (features ``min(4 * 2^i, 16)``,
   fewer residual blocks, batch 2) so the weights stay far below 1 MB;
3. ``nnUNetv2_preprocess``, then training through nnU-Net's trainer classes for two epochs:
   ``nnUNetTrainerNoMirroring`` for the 2D model (its checkpoint allows no mirroring), ``nnUNetTrainer``
   folds 0 and 1 for the 3D model;
4. ``nnUNetv2_predict --save_probabilities`` on the two test images: 2D fold 0, 3D fold 0, and the 3D
   ensemble of folds 0 and 1;
5. each fold's PyTorch network (as ``nnUNetPredictor`` builds it) applied to a fixed random input.

Written into the fixtures folder: the model folders (``plans.json``, ``dataset.json``,
``dataset_fingerprint.json``, ``fold_X/checkpoint_final.pth``), ``images/`` (the test images),
``predictions/{2d_f0,3d_f0,3d_f01}/`` (nnU-Net's label maps, and its probabilities as ``{case}.npz`` with
``probabilities_uint8`` = round(255 p) in nnU-Net's ``(K, z, y, x)`` order), ``logits/{name}.npz``
(``input`` and ``logits``, PyTorch's ``(N, C, *spatial)`` layout, float32) and ``manifest.json``
(versions).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DATASET = "Dataset901_SynthLiver"
TEST_CASES = 2
MODELS = {
    # name: (configuration, plans, trainer, folds)
    "2d": ("2d", "nnUNetPlans", "nnUNetTrainerNoMirroring", (0,)),
    "3d": ("3d_fullres", "nnUNetResEncUNetMPlans", "nnUNetTrainer", (0, 1)),
}
PREDICTIONS = {"2d_f0": ("2d", (0,)), "3d_f0": ("3d", (0,)), "3d_f01": ("3d", (0, 1))}
EPOCHS, ITERATIONS = 2, 250  # two of nnU-Net's epochs: the networks segment the liver, not only background


def run(command: list[str]) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def tool(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def split_dataset(source: Path, raw: Path) -> list[Path]:
    """Copy ``source`` into ``raw/DATASET``, holding out the last cases; returns the test images."""
    meta = json.loads((source / "dataset.json").read_text())
    images = sorted((source / "imagesTr").glob("*_0000.nii.gz"))
    train, test = images[:-TEST_CASES], images[-TEST_CASES:]
    target = raw / DATASET
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (target / folder).mkdir(parents=True)
    for image in train:
        case = image.name[: -len("_0000.nii.gz")]
        shutil.copy(image, target / "imagesTr" / image.name)
        shutil.copy(source / "labelsTr" / f"{case}.nii.gz", target / "labelsTr" / f"{case}.nii.gz")
    for image in test:
        shutil.copy(image, target / "imagesTs" / image.name)
    meta = {k: v for k, v in meta.items() if k != "synthetic"} | {"name": DATASET, "numTraining": len(train)}
    (target / "dataset.json").write_text(json.dumps(meta, indent=2))
    return sorted((target / "imagesTs").iterdir())


def shrink_plans(path: Path, configuration: str) -> None:
    """Small features, few residual blocks, batch 2: tiny weights, quick CPU training."""
    plans = json.loads(path.read_text())
    config = plans["configurations"][configuration]
    kwargs = config["architecture"]["arch_kwargs"]
    n = kwargs["n_stages"]
    kwargs["features_per_stage"] = [min(4 * 2**i, 16) for i in range(n)]
    if "n_blocks_per_stage" in kwargs:
        kwargs["n_blocks_per_stage"] = [1] + [2] * (n - 1)
    config["batch_size"] = 2
    path.write_text(json.dumps(plans, indent=2))


def train(configuration: str, plans: str, trainer_name: str, fold: int) -> None:
    """A short training with nnU-Net's trainer class (named as usual, so nnUNetv2_predict finds it)."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    trainer = get_trainer_from_args(DATASET, configuration, fold, trainer_name, plans, device=torch.device("cpu"))
    trainer.num_epochs = EPOCHS
    trainer.num_iterations_per_epoch = ITERATIONS
    trainer.num_val_iterations_per_epoch = 5
    trainer.run_training()


def stored_logits(model_folder: Path, fold: int, seed: int):
    """``(input, logits)`` of the fold's PyTorch network on a fixed random input: twice the network's total
    stride per axis (at most the patch), small enough to keep the file small."""
    import numpy as np
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False)
    predictor.initialize_from_trained_model_folder(str(model_folder), (fold,), "checkpoint_final.pth")
    network = predictor.network
    network.load_state_dict(predictor.list_of_parameters[0])
    network.eval()
    channels = len(predictor.dataset_json["channel_names"])
    patch = predictor.configuration_manager.patch_size
    total = np.prod(np.asarray(predictor.configuration_manager.pool_op_kernel_sizes), axis=0)
    shape = (1, channels, *(int(min(p, 2 * t)) for p, t in zip(patch, total)))
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    with torch.no_grad():
        logits = network(torch.from_numpy(x)).numpy()
    return x, logits


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dataset", type=Path, help="a dataset written by `medseg-jax synth` (10 cases)")
    parser.add_argument("out", type=Path, help="fixtures folder (replaced)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nnunet-fixtures-"))
    os.environ.update(
        nnUNet_raw=str(work / "raw"),
        nnUNet_preprocessed=str(work / "preprocessed"),
        nnUNet_results=str(work / "results"),
        nnUNet_n_proc_DA="1",
        nnUNet_compile="false",
        nnUNet_def_n_proc="1",
    )
    import numpy as np

    test_images = split_dataset(args.dataset, work / "raw")
    run([tool("nnUNetv2_extract_fingerprint"), "-d", "901", "-np", "1"])
    run([tool("nnUNetv2_plan_experiment"), "-d", "901"])
    run([tool("nnUNetv2_plan_experiment"), "-d", "901", "-pl", "nnUNetPlannerResEncM"])
    for configuration, plans, _, _ in MODELS.values():
        shrink_plans(work / "preprocessed" / DATASET / f"{plans}.json", configuration)
        run([tool("nnUNetv2_preprocess"), "-d", "901", "-plans_name", plans, "-c", configuration, "-np", "1"])
    for configuration, plans, trainer, folds in MODELS.values():
        for fold in folds:
            train(configuration, plans, trainer, fold)

    out = args.out
    if out.exists():
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True)
    for image in test_images:
        shutil.copy(image, out / "images" / image.name)
    model_folders = {}
    for name, (configuration, plans, trainer, folds) in MODELS.items():
        source = work / "results" / DATASET / f"{trainer}__{plans}__{configuration}"
        target = out / DATASET / source.name
        target.mkdir(parents=True)
        for file in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
            shutil.copy(source / file, target / file)
        for fold in folds:
            (target / f"fold_{fold}").mkdir()
            shutil.copy(
                source / f"fold_{fold}" / "checkpoint_final.pth", target / f"fold_{fold}" / "checkpoint_final.pth"
            )
        model_folders[name] = source
    for prediction, (name, folds) in PREDICTIONS.items():
        configuration, plans, trainer, _ = MODELS[name]
        raw_out = work / "predictions" / prediction
        run(
            [tool("nnUNetv2_predict"), "-i", str(work / "raw" / DATASET / "imagesTs"), "-o", str(raw_out)]
            + ["-d", "901", "-c", configuration, "-p", plans, "-tr", trainer, "-f", *[str(f) for f in folds]]
            + ["--save_probabilities", "-device", "cpu", "-npp", "1", "-nps", "1"]
        )
        target = out / "predictions" / prediction
        target.mkdir(parents=True)
        for label in sorted(raw_out.glob("*.nii.gz")):
            case = label.name[: -len(".nii.gz")]
            shutil.copy(label, target / label.name)
            probabilities = np.load(raw_out / f"{case}.npz")["probabilities"]
            # quantised to 1/255 (the parity test allows for it): compresses to a fraction of float32
            quantised = np.round(probabilities * 255).astype(np.uint8)
            np.savez_compressed(target / f"{case}.npz", probabilities_uint8=quantised)
    (out / "logits").mkdir()
    for seed, (name, (_, _, _, folds)) in enumerate(MODELS.items()):
        for fold in folds:
            x, logits = stored_logits(model_folders[name], fold, seed=100 + 10 * seed + fold)
            np.savez_compressed(out / "logits" / f"{name}_f{fold}.npz", input=x, logits=logits)
    from importlib.metadata import version

    import nnunetv2  # noqa: F401
    import torch

    manifest = {
        "made_by": "tests/nnunet/make_fixtures.py",
        "torch": torch.__version__,
        "nnunetv2": version("nnunetv2"),
        "dynamic_network_architectures": version("dynamic_network_architectures"),
        "numpy": np.__version__,
        "models": {name: f"{DATASET}/{folder.name}" for name, folder in model_folders.items()},
        "predictions": {name: {"model": model, "folds": list(folds)} for name, (model, folds) in PREDICTIONS.items()},
        "training": {"epochs": EPOCHS, "iterations_per_epoch": ITERATIONS},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(f"fixtures written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
