"""Sliding-window inference throughput: the jitted sliding window versus a plain Python loop over windows.

For one random 3D scan (``--shape``, default 96^3, one channel) and an untrained U-Net (``--features``,
default 8 16 32 with stride 2 per stage) at ``--patch`` (default 32^3), step 0.5, Gaussian blending:

- ``loop`` (baseline): a Python loop over the windows of :func:`compute_window_starts`, one jitted
  ``model.apply`` per window (batch 1), weighted logits summed into numpy arrays; with TTA each window is
  flipped in numpy for every mirror combination and predicted again;
- ``device``: :func:`medseg_jax.inference.sliding_window`, one jitted program (``accumulate="device"``);
- ``host``: the same with ``accumulate="host"`` (memory-bounded mode: per-batch program, numpy sums).

Each runs without TTA and with mirroring over all 3 axes (8 predictions per window). Reported: voxels
per second of the scan (median of ``--repeats`` timed runs after one untimed first call), the first
call's time less that median as the compile time, and the speed-up over the loop at the same TTA
setting. All three give the same logits (checked: maximum absolute difference in the JSON).

    python benchmarks/bench_sliding_window.py --shape 64 64 64 --patch 32 32 32 --repeats 3 --out r.json
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time

import numpy as np

from medseg_jax.bench.suite import machine_info
from medseg_jax.kernels.timing import time_round_robin


def loop_baseline(apply, params, image, patch, mirror: bool) -> np.ndarray:
    """Python loop over windows: jitted apply per (flipped) window, numpy accumulation. ``image (*S, C)``."""
    from medseg_jax.inference import compute_window_starts, gaussian_importance_map

    weight = gaussian_importance_map(patch)
    spatial = image.shape[:-1]
    pad = [(max(p - s, 0) // 2, max(p - s, 0) - max(p - s, 0) // 2) for s, p in zip(spatial, patch)]
    padded = np.pad(image, pad + [(0, 0)])
    axes = range(len(patch)) if mirror else ()
    combos = [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]
    acc, total = None, np.zeros(padded.shape[:-1], np.float32)
    for start in itertools.product(*compute_window_starts(padded.shape[:-1], patch)):
        region = tuple(slice(s, s + p) for s, p in zip(start, patch))
        window = padded[region]
        logits = 0.0
        for axes in combos:
            flipped = np.flip(window, axes)[None] if axes else window[None]
            out = np.asarray(apply(params, flipped))[0]
            logits = logits + (np.flip(out, axes) if axes else out)
        logits = logits / len(combos)
        if acc is None:
            acc = np.zeros(padded.shape[:-1] + (logits.shape[-1],), np.float32)
        acc[region] += logits * weight[..., None]
        total[region] += weight
    crop = tuple(slice(lo, lo + s) for (lo, _), s in zip(pad, spatial))
    return (acc / total[..., None])[crop]


def measure(run, repeats: int) -> dict:
    """First call (compile + run) and the median of ``repeats`` further calls; ``run`` must block."""
    start = time.perf_counter()
    result = run()
    first = time.perf_counter() - start
    times = time_round_robin({"run": run}, repeats, warmup=0)["run"]
    median = statistics.median(times)
    return {"first_s": first, "compile_s": max(first - median, 0.0), "median_s": median, "times_s": times}, result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 96, 96], help="scan size (voxels per axis)")
    parser.add_argument("--patch", type=int, nargs=3, default=[32, 32, 32], help="window size")
    parser.add_argument("--features", type=int, nargs="+", default=[8, 16, 32], help="U-Net features per stage")
    parser.add_argument("--batch", type=int, default=4, help="windows per forward pass (sliding window)")
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median reported)")
    parser.add_argument("--modes", nargs="+", default=["loop", "device", "host"], choices=["loop", "device", "host"])
    parser.add_argument("--no-tta", action="store_true", help="skip the runs with mirroring")
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)

    import jax

    from medseg_jax.inference import sliding_window
    from medseg_jax.models.unet import UNet

    patch, shape = tuple(args.patch), tuple(args.shape)
    n_stages = len(args.features)
    model = UNet(num_classes=args.classes, spatial_dims=3, n_stages=n_stages, features=tuple(args.features))
    params = model.init(jax.random.key(0), np.zeros((1, *patch, 1), np.float32))
    image = np.random.default_rng(0).normal(size=(*shape, 1)).astype(np.float32)
    apply = jax.jit(model.apply)
    voxels = int(np.prod(shape))

    runners = {
        "loop": lambda tta: loop_baseline(apply, params, image, patch, tta),
        "device": lambda tta: np.asarray(
            sliding_window(
                model.apply, image, patch, batch_size=args.batch, mirror_axes=None if tta else (), params=params
            )
        ),
        "host": lambda tta: sliding_window(
            model.apply,
            image,
            patch,
            batch_size=args.batch,
            mirror_axes=None if tta else (),
            params=params,
            accumulate="host",
        ),
    }
    rows, outputs = [], {}
    for tta in [False] if args.no_tta else [False, True]:
        for mode in args.modes:
            figures, logits = measure(lambda mode=mode, tta=tta: runners[mode](tta), args.repeats)
            outputs[mode, tta] = logits
            rows.append(dict(mode=mode, tta=tta, voxels_per_s=voxels / figures["median_s"], **figures))
    for row in rows:
        base = next((r for r in rows if r["mode"] == "loop" and r["tta"] == row["tta"]), None)
        row["speedup_over_loop"] = None if base is None else base["median_s"] / row["median_s"]
        reference = outputs.get(("loop", row["tta"]))
        row["max_abs_diff_to_loop"] = (
            None if reference is None else float(np.abs(outputs[row["mode"], row["tta"]] - reference).max())
        )

    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    result = {
        "command": command,
        "machine": machine_info(),
        "shape": shape,
        "patch": patch,
        "features": args.features,
        "batch": args.batch,
        "classes": args.classes,
        "repeats": args.repeats,
        "rows": rows,
    }
    print(f"sliding window, scan {shape}, patch {patch}, U-Net features {args.features}, batch {args.batch}")
    print("| mode | TTA | voxels/s | median s | compile s | speed-up vs loop |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        speedup = "-" if r["speedup_over_loop"] is None else f"{r['speedup_over_loop']:.2f}x"
        print(
            f"| {r['mode']} | {'8 flips' if r['tta'] else 'off'} | {r['voxels_per_s']:,.0f} | {r['median_s']:.3f} "
            f"| {r['compile_s']:.2f} | {speedup} |"
        )
    if args.out:
        from medseg_jax.atomic import write_json_atomic

        write_json_atomic(args.out, result)
    return result


if __name__ == "__main__":
    main()
