"""Training-loader throughput for the 3D full-resolution plan: can one host keep an accelerator fed?

Builds a case store from ``--cases`` synthetic CT phantoms of ``--shape`` (written as an nnU-Net raw
dataset, fingerprinted, planned for 3D and preprocessed, as ``medseg-jax preprocess`` does), then reads
training batches with :func:`medseg_jax.data.loader.make_train_loader` at nnU-Net's 3d_fullres shape:
patch ``--patch`` (128^3), batch ``--batch`` (2), foreground oversampling 0.33. With augmentation on the
device (the default, ``augment.mode: device``) the loader delivers crops of
``loader_crop_size(AugmentConfig(), patch)`` (the rotation / scaling margin), so that is the measured
case (``crop``); the same loader cutting patch-sized boxes (``patch``: ``augment.mode: none``, or what
the loader's reads cost without the margin) is measured beside it. For each ``--workers`` count: the
first batch (start-up, worker processes included) is timed apart, ``--warmup`` batches are read, then
``--windows`` timed windows of ``--window-batches`` batches each; batches/s is the median over windows.

Also measured, to say what limits the loader: the store read of one crop alone (zarr chunk reads and
decompression, ``store.read_patch`` on a box of the crop size at random positions; the files are in
the page cache after the first pass, so this is decompression and copying, not disk), and the
loader's in-memory work for one batch without reads (padding buffers, int32 labels, stacking).

The reference rate: nnU-Net reports about 6 it/s on an A100 for 3d_fullres, i.e. the step consumes
about 6 batches/s; the loader keeps such an accelerator fed when it delivers at least that.

    python benchmarks/bench_loader.py --out loader.json
    python benchmarks/bench_loader.py --cases 2 --shape 160 160 144 --windows 3   # quicker
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

A100_BATCHES_PER_S = 6.0  # nnU-Net reports about 6 it/s on an A100 (3d_fullres)


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (the machine may be shared)."""
    return [round(x, 2) for x in os.getloadavg()]


def build_store(directory: Path, cases: int, shape: tuple[int, ...], workers: int):
    """A case store preprocessed with a 3D plan from ``cases`` synthetic phantoms; ``(store, seconds)``."""
    from medseg_jax.data.dataset import load_dataset
    from medseg_jax.data.fingerprint import compute_fingerprint
    from medseg_jax.data.plan import make_plan
    from medseg_jax.data.preprocess import preprocess_dataset
    from medseg_jax.data.store import CaseStore
    from medseg_jax.data.synthetic import write_synthetic_dataset

    start = time.perf_counter()
    dataset = load_dataset(write_synthetic_dataset(directory / "raw", cases, seed=0, shape=shape))
    plan = make_plan(compute_fingerprint(dataset, num_workers=workers), dim=3)
    store = CaseStore(directory / "store")
    preprocess_dataset(dataset, plan, store, num_workers=workers, progress=False)
    return store, time.perf_counter() - start


def measure_loader(store, patch, batch, crop, workers: int, warmup: int, windows: int, window_batches: int) -> dict:
    """Batches/s of one loader configuration: median over timed windows after start-up and warm-up."""
    from medseg_jax.data.loader import make_train_loader

    loader = make_train_loader(store, store.case_ids(), patch, batch, 0.33, seed=0, num_workers=workers, crop_size=crop)
    iterator = iter(loader)
    try:
        start = time.perf_counter()
        first = next(iterator)
        first_s = time.perf_counter() - start
        for _ in range(warmup):
            next(iterator)
        rates = []
        for _ in range(windows):
            start = time.perf_counter()
            for _ in range(window_batches):
                next(iterator)
            rates.append(window_batches / (time.perf_counter() - start))
    finally:
        iterator.close()
    return {
        "workers": workers,
        "crop": list(crop),
        "megabytes_per_batch": round((first["image"].nbytes + first["label"].nbytes) / 1e6, 1),
        "first_batch_s": round(first_s, 2),
        "batches_per_s": round(statistics.median(rates), 3),
        "window_rates": [round(r, 3) for r in rates],
    }


def measure_reads(store, crop, samples: int) -> dict:
    """Median seconds of ``store.read_patch`` of a crop-sized box at random positions (one thread)."""
    rng = np.random.default_rng(0)
    ids = store.case_ids()
    times = []
    for i in range(samples + 1):
        case_id = ids[i % len(ids)]
        shape = np.asarray(store.case_shape(case_id))
        start_voxel = rng.integers(-(np.asarray(crop) // 2), np.maximum(shape - np.asarray(crop) // 2, 1))
        start = time.perf_counter()
        store.read_patch(case_id, start_voxel, crop)
        if i:  # the first read opens the arrays
            times.append(time.perf_counter() - start)
    return {"crop": list(crop), "median_s": round(statistics.median(times), 4), "samples": samples}


def measure_assembly(crop, case_shape, batch: int, repeats: int) -> dict:
    """Median seconds of the loader's in-memory work for one batch without any read: per sample a
    zero-filled crop buffer with the case copied in (the padding ``read_patch`` does), the label made
    int32, then the samples stacked into the batch (what ``batch`` does). Isolates memory traffic."""
    inside = tuple(slice(0, min(c, s)) for c, s in zip(crop, case_shape))
    image_source = np.ones([1, *(x.stop for x in inside)], np.float32)
    label_source = np.ones([x.stop for x in inside], np.uint8)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        samples = []
        for _ in range(batch):
            image, label = np.zeros((1, *crop), np.float32), np.zeros(crop, np.uint8)
            image[(slice(None), *inside)], label[inside] = image_source, label_source
            samples.append((np.ascontiguousarray(np.moveaxis(image, 0, -1)), label.astype(np.int32)))
        np.stack([s[0] for s in samples]), np.stack([s[1] for s in samples])
        times.append(time.perf_counter() - start)
    return {"crop": list(crop), "median_s": round(statistics.median(times), 4), "times_s": [round(t, 3) for t in times]}


def markdown_table(results: list[dict]) -> list[str]:
    rows = [
        "| loader output | workers | MB/batch | first batch s | batches/s (median) | window rates | vs 6 it/s |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in results:
        rates = ", ".join(f"{x:.2f}" for x in r["window_rates"])
        rows.append(
            f"| {r['mode']} {'x'.join(map(str, r['crop']))} | {r['workers']} | {r['megabytes_per_batch']} | "
            f"{r['first_batch_s']} | {r['batches_per_s']:.2f} | {rates} | "
            f"{r['batches_per_s'] / A100_BATCHES_PER_S:.2f}x |"
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=3, help="synthetic cases in the store")
    parser.add_argument("--shape", type=int, nargs=3, default=[256, 256, 192], help="phantom grid (x y z)")
    parser.add_argument("--patch", type=int, nargs=3, default=[128, 128, 128])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader worker counts")
    parser.add_argument("--modes", nargs="+", choices=["crop", "patch"], default=["crop", "patch"])
    parser.add_argument("--warmup", type=int, default=2, help="batches read after the first, untimed")
    parser.add_argument("--windows", type=int, default=5, help="timed windows per configuration")
    parser.add_argument("--window-batches", type=int, default=4, help="batches per timed window")
    parser.add_argument("--read-samples", type=int, default=8, help="crop reads (and batch assemblies) timed alone")
    parser.add_argument("--store", type=Path, help="reuse (or keep) the generated data in this folder")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)

    from medseg_jax.augment import AugmentConfig, loader_crop_size
    from medseg_jax.bench.suite import machine_info
    from medseg_jax.data.store import CaseStore

    load_before = load_average()
    patch = tuple(args.patch)
    crops = {"crop": loader_crop_size(AugmentConfig(), patch), "patch": patch}
    with tempfile.TemporaryDirectory() as scratch:
        directory = args.store or Path(scratch)
        if (directory / "store" / "plan.json").exists():
            store, setup_s = CaseStore(directory / "store"), 0.0
        else:
            store, setup_s = build_store(directory, args.cases, tuple(args.shape), workers=2)
        print(f"store: {len(store.case_ids())} cases of {store.case_shape(store.case_ids()[0])} in {setup_s:.0f} s")
        reads = {mode: measure_reads(store, crops[mode], args.read_samples) for mode in args.modes}
        for mode, r in reads.items():
            print(f"read of one {mode} box alone: {r['median_s']:.3f} s")
        case_shapes = [list(store.case_shape(c)) for c in store.case_ids()]
        assembly = {
            mode: measure_assembly(crops[mode], case_shapes[0], args.batch, args.read_samples) for mode in args.modes
        }
        for mode, r in assembly.items():
            print(f"in-memory assembly of one {mode} batch alone: {r['median_s']:.3f} s {r['times_s']}")
        results = []
        for mode in args.modes:
            for workers in args.workers:
                r = measure_loader(
                    store, patch, args.batch, crops[mode], workers, args.warmup, args.windows, args.window_batches
                )
                results.append({"mode": mode, **r})
                print(f"{mode} workers={workers}: {r['batches_per_s']:.2f} batches/s {r['window_rates']}", flush=True)
    report = {
        "command": " ".join(["python", "benchmarks/bench_loader.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(),
        "versions": {name: importlib.metadata.version(name) for name in ("grain", "tensorstore", "numpy")},
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "case_shapes": case_shapes,
        "setup_s": round(setup_s, 1),
        "patch": list(patch),
        "batch": args.batch,
        "reads": reads,
        "assembly": assembly,
        "results": results,
        "reference_batches_per_s": A100_BATCHES_PER_S,
    }
    print("\n".join(markdown_table(results)))
    print(f"load average before {load_before}, after {report['load_average_after']}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
