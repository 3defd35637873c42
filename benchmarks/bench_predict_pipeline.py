"""A folder of cases as a pipeline: total time of ``predict_folder`` against the sum of its device times.

Ten synthetic CT cases on one grid (so one compiled program serves them all) are predicted twice with the
same predictor: with the stages one after another (``pipeline=False``: read and preprocess, sliding
window, map back and write) and as a pipeline (``pipeline=True``: a reader thread prepares the next case
and a writer thread writes the previous one while the device works on the current one). The network is a
3D U-Net of nnU-Net's shape at a small size with random parameters, its plan one that resamples (the
scans' spacing is not the plan's), so that reading, preprocessing and writing cost what they do on real
data. A warm-up case is predicted first and not counted (compilation).

    python -m benchmarks.bench_predict_pipeline --runs 3 --out benchmarks/results

Reported per mode (medians over ``--runs``): the wall time for the folder, the sum of the cases' device
times, and their ratio: 1.0 would be a device never waiting for the host.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from medseg_jax.config import InferenceConfig
from medseg_jax.data.image_io import write_nifti
from medseg_jax.data.plan import make_plan
from medseg_jax.data.synthetic import make_ct_phantom
from medseg_jax.inference.predict import predict_folder
from medseg_jax.models.unet import UNet

LABELS = {"background": 0, "liver": 1, "tumour": 2}


def write_cases(folder: Path, count: int, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> None:
    for seed in range(count):
        image, _ = make_ct_phantom(seed, shape, spacing, orientation="RAS")
        write_nifti(image, folder / f"case_{seed:03d}_0000.nii.gz")


def bench_plan(patch: tuple[int, int, int], target_spacing: tuple[float, float, float]) -> dict:
    """A CT plan (HU clipping and z-score from a CT-like fingerprint) at ``target_spacing``, 4 stages."""
    fingerprint = {
        "channel_names": ["CT"],
        "labels": LABELS,
        "spacings": [list(target_spacing)] * 2,
        "shapes_after_crop": [[128, 128, 64]] * 2,
        "foreground_intensity_properties_per_channel": {
            "0": {"mean": 90.0, "std": 60.0, "percentile_00_5": -100.0, "percentile_99_5": 300.0}
        },
    }
    plan = make_plan(fingerprint, dim=3)
    plan.update(
        patch_size=list(patch),
        n_stages=4,
        strides=[[1, 1, 1]] + [[2, 2, 2]] * 3,
        kernel_sizes=[[3, 3, 3]] * 4,
        features_per_stage=[16, 32, 64, 128],
    )
    return plan


def random_params(model, patch, seed=0):
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, *patch, 1), jnp.float32))
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.1, s.shape), s.dtype), shapes)


def run_folder(inputs: Path, out: Path, model, params, plan, pipeline: bool) -> dict:
    started = time.perf_counter()
    summaries = predict_folder(
        inputs, out, model, params, plan, InferenceConfig(mirror_axes=()), progress=False, pipeline=pipeline
    )
    wall = time.perf_counter() - started
    sums = {key: sum(s[key] for s in summaries) for key in ("read_seconds", "device_seconds", "write_seconds")}
    return {"wall_s": wall, **sums, "wall_over_device": wall / sums["device_seconds"], "cases": len(summaries)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--shape", type=int, nargs=3, default=(160, 160, 80), help="scan grid x y z")
    parser.add_argument("--patch", type=int, nargs=3, default=(64, 64, 64))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    spacing, target = (0.9, 0.9, 2.5), (1.2, 1.2, 1.5)  # resampled on the way in and on the way back
    plan = bench_plan(tuple(args.patch), target)
    model = UNet(num_classes=3, spatial_dims=3, n_stages=4, features=(16, 32, 64, 128), deep_supervision=False)
    params = random_params(model, tuple(args.patch))
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as scratch:
        scratch_path = Path(scratch)
        write_cases(scratch_path / "warmup", 1, tuple(args.shape), spacing)
        write_cases(scratch_path / "cases", args.cases, tuple(args.shape), spacing)
        run_folder(scratch_path / "warmup", scratch_path / "warm-out", model, params, plan, pipeline=True)
        results: dict[str, list[dict]] = {"sequential": [], "pipelined": []}
        for repetition in range(args.runs):
            for mode in results:
                out = scratch_path / f"out-{mode}-{repetition}"
                results[mode].append(run_folder(scratch_path / "cases", out, model, params, plan, mode == "pipelined"))
                row = results[mode][-1]
                print(
                    f"run {repetition + 1} {mode}: {row['wall_s']:.1f} s for {row['cases']} cases, "
                    f"device {row['device_seconds']:.1f} s, read {row['read_seconds']:.1f} s, "
                    f"write {row['write_seconds']:.1f} s",
                    flush=True,
                )
    load_after = os.getloadavg()[0]
    medians = {
        mode: {key: statistics.median(r[key] for r in rows) for key in rows[0] if key != "cases"}
        for mode, rows in results.items()
    }
    load = f"load {load_before:.2f} -> {load_after:.2f}"
    print(f"\n{args.cases} cases {tuple(args.shape)}, patch {tuple(args.patch)}, {load}")
    for mode, row in medians.items():
        print(
            f"{mode:<11} wall {row['wall_s']:6.1f} s  device sum {row['device_seconds']:6.1f} s  "
            f"wall / device {row['wall_over_device']:.2f}"
        )
    speedup = medians["sequential"]["wall_s"] / medians["pipelined"]["wall_s"]
    print(f"pipelined folder {speedup:.2f}x faster than the stages one after another")
    if args.out is not None:
        record = {
            "benchmark": "predict_pipeline",
            "cases": args.cases,
            "shape_xyz": list(args.shape),
            "patch": list(args.patch),
            "runs": args.runs,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "versions": {"jax": jax.__version__},
            "load_average_1min": {"before": load_before, "after": load_after},
            "runs_per_mode": results,
            "medians": medians,
            "pipelined_speedup": speedup,
        }
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        (args.out / f"predict-pipeline-{stamp}.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
