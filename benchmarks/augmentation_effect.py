"""Does on-device augmentation help? Two training runs on the same synthetic phantoms, augmentation on
(nnU-Net's defaults, on the device) and off, scored on held-out phantoms as drawn and on the same
phantoms rotated in-plane and rescaled (where augmentation should help most), each predicted with and
without mirroring test-time augmentation.

    python benchmarks/augmentation_effect.py --cases 12 --steps 600 --out /tmp/aug_effect

Prints a Markdown table (liver / tumour Dice, mean over held-out cases) and writes results.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
from scipy import ndimage


def transformed_copy(image: np.ndarray, label: np.ndarray, angle_degrees: float, zoom: float):
    """Rotate about the slice axis (the last) and zoom about the centre; images linear, labels nearest."""
    theta = np.deg2rad(angle_degrees)
    rotation = np.eye(3)
    rotation[:2, :2] = [[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]
    matrix = rotation / np.array([zoom, zoom, 1.0])[:, None]
    centre = (np.array(image.shape) - 1) / 2
    offset = centre - matrix @ centre
    air = float(image.min())
    moved_image = ndimage.affine_transform(image.astype(np.float32), matrix, offset, order=1, cval=air)
    moved_label = ndimage.affine_transform(label, matrix, offset, order=0, cval=0)
    return moved_image.astype(image.dtype), moved_label


def write_heldout(root: Path, cases: int, seed: int, shape) -> tuple[Path, Path]:
    """Held-out phantoms as drawn (``plain``) and rotated 15-40 degrees and zoomed 0.75-0.9 (``moved``)."""
    from medseg_jax.data.image_io import write_nifti
    from medseg_jax.data.synthetic import make_ct_phantom
    from medseg_jax.data.volume import Volume

    rng = np.random.default_rng(seed)
    for variant in ("plain", "moved"):
        for folder in ("images", "labels"):
            (root / variant / folder).mkdir(parents=True, exist_ok=True)
    for k in range(cases):
        image, label = make_ct_phantom(seed + k, shape=shape, orientation="RAS")
        name = f"held_{k:03d}"
        write_nifti(image, root / "plain" / "images" / f"{name}_0000.nii.gz")
        write_nifti(label, root / "plain" / "labels" / f"{name}.nii.gz")
        moved_image, moved_label = transformed_copy(
            image.array, label.array, rng.uniform(15, 40) * rng.choice([-1, 1]), rng.uniform(0.75, 0.9)
        )
        write_nifti(Volume(moved_image, image.affine), root / "moved" / "images" / f"{name}_0000.nii.gz")
        write_nifti(Volume(moved_label, image.affine), root / "moved" / "labels" / f"{name}.nii.gz")
    return root / "plain", root / "moved"


def main(argv=None) -> None:
    from medseg_jax.config import load_config
    from medseg_jax.data.dataset import load_dataset
    from medseg_jax.data.fingerprint import compute_fingerprint
    from medseg_jax.data.plan import make_plan
    from medseg_jax.data.preprocess import preprocess_dataset
    from medseg_jax.data.store import CaseStore
    from medseg_jax.data.synthetic import write_synthetic_dataset
    from medseg_jax.demo import DEFAULT_CONFIG
    from medseg_jax.evaluation import evaluate_folders
    from medseg_jax.inference.predict import predict_folder
    from medseg_jax.inference.run_folder import load_run
    from medseg_jax.train.loop import train

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=12, help="training phantoms")
    parser.add_argument("--heldout", type=int, default=6, help="held-out phantoms")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 64, 32])
    parser.add_argument("--out", type=Path, default=Path("augmentation_effect"))
    args = parser.parse_args(argv)

    shape = tuple(args.shape)
    dataset = load_dataset(write_synthetic_dataset(args.out / "raw", args.cases, seed=0, shape=shape))
    base = load_config(DEFAULT_CONFIG, [f"train.steps={args.steps}", "train.val_every=100000"])
    plan = make_plan(
        compute_fingerprint(dataset),
        dim=2,
        voxel_budget=base.data.batch_size * float(np.prod(base.data.patch_size)),
        hu_window=(-175.0, 250.0),
    )
    store = CaseStore(args.out / "store", chunk_shape=(64, 64, 1))
    preprocess_dataset(dataset, plan, store, progress=False)  # records the plan in the store
    plain, moved = write_heldout(args.out / "heldout", args.heldout, seed=10_000, shape=shape)

    results = {}
    for mode in ("none", "device"):
        config = dataclasses.replace(base, augment=dataclasses.replace(base.augment, mode=mode))
        started = time.perf_counter()
        train(config, args.out / "store", args.out / f"run_{mode}", fold=-1, progress=True)
        seconds = time.perf_counter() - started
        model, params, run_plan, run_config = load_run(args.out / f"run_{mode}")
        results[mode] = {"train_seconds": round(seconds, 1)}
        for tta, mirror_axes in (("mirror TTA", None), ("no TTA", ())):
            inference = dataclasses.replace(run_config.inference, mirror_axes=mirror_axes)
            for name, folder in (("as drawn", plain), ("rotated + scaled", moved)):
                predictions = args.out / f"pred_{mode}_{name.split()[0]}_{tta.split()[0]}"
                predict_folder(folder / "images", predictions, model, params, run_plan, inference, progress=False)
                _, summary = evaluate_folders(
                    predictions, folder / "labels", labels=dict(plan["labels"]), progress=False
                )
                results[mode][f"{name}, {tta}"] = {
                    c: summary["classes"][c]["dice"]["mean"] for c in ("liver", "tumour")
                }
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print("| augmentation | held-out set | liver Dice | tumour Dice | train s |\n| --- | --- | ---: | ---: | ---: |")
    for mode, result in results.items():
        for name, dice in result.items():
            if name != "train_seconds":
                print(f"| {mode} | {name} | {dice['liver']:.3f} | {dice['tumour']:.3f} | {result['train_seconds']} |")


if __name__ == "__main__":
    main()
