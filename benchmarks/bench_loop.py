"""Throughput of the training loop against the bare jitted train step, in the same run.

A tiny 2D U-Net on CPU (the loop's own overhead is what is measured, so the step is kept short):

- ``loop``: ``medseg_jax.train.loop.train`` end to end (grain loader, device prefetch, the step, the
  hooks: metrics every ``--log-every`` steps, a checkpoint at the end, no validation), steady-state
  steps/s from the timestamps ``metrics.jsonl`` records (from step ``--skip`` on, so compilation and
  start-up are excluded);
- ``bare``: the same step function (same model, loss, optimiser; augmentation off in both) jitted once
  and called on one device-resident batch, timed after a warm-up.

The two alternate ``--repeats`` times; medians and the ratio loop / bare (the median of each repeat's
ratio) are printed and written as JSON. Run it from a clone (``PYTHONPATH`` may point at another
checkout to measure an older loop: the script uses only APIs both have)::

    python benchmarks/bench_loop.py --out benchmarks/results/bench-loop.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

OVERRIDES = ["augment.mode=none", "data.num_workers=0", "model.deep_supervision=true"]


def make_store(root: Path, cases: int, shape) -> Path:
    from medseg_jax.data.dataset import load_dataset
    from medseg_jax.data.fingerprint import compute_fingerprint
    from medseg_jax.data.plan import make_plan
    from medseg_jax.data.preprocess import preprocess_dataset
    from medseg_jax.data.store import CaseStore
    from medseg_jax.data.synthetic import write_synthetic_dataset

    dataset = load_dataset(write_synthetic_dataset(root / "raw", cases, seed=0, shape=shape))
    plan = make_plan(compute_fingerprint(dataset), dim=2, voxel_budget=8 * shape[0] * shape[1], max_stages=4)
    store = CaseStore(root / "store")
    preprocess_dataset(dataset, plan, store, progress=False)
    if not (root / "store" / "plan.json").is_file():  # older versions wrote the plan outside preprocessing
        (root / "store" / "plan.json").write_text(json.dumps(plan))
    return root / "store"


def loop_rate(store: Path, run_dir: Path, overrides: list[str], steps: int, skip: int) -> float:
    from medseg_jax.config import load_config
    from medseg_jax.train.loop import train

    train(load_config(None, overrides), store, run_dir, fold=-1, progress=False)
    entries = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = {e["step"]: e["seconds"] for e in entries if "loss" in e}
    first = min(s for s in times if s >= skip)
    return (steps - first) / (times[steps] - times[first])


def bare_rate(store: Path, overrides: list[str], steps: int) -> float:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from medseg_jax.config import load_config
    from medseg_jax.models import UNet
    from medseg_jax.models.unet import default_features
    from medseg_jax.train.optim import make_lr_schedule, make_optimizer
    from medseg_jax.train.state import create_train_state
    from medseg_jax.train.step import jit_train_step, make_train_step

    config = load_config(None, overrides)
    plan = json.loads((store / "plan.json").read_text())
    patch, batch, n_stages = tuple(config.data.patch_size), config.data.batch_size, plan["n_stages"]
    model = UNet(
        num_classes=plan["num_classes"],
        spatial_dims=2,
        n_stages=n_stages,
        features=default_features(n_stages, 2, config.model.base_features),
        kernel_sizes=[tuple(k) for k in plan["kernel_sizes"]],
        strides=[tuple(s) for s in plan["strides"]],
        deep_supervision=True,
    )
    optimizer = make_optimizer(config.train)
    state = create_train_state(model, optimizer, jax.random.key(0), jnp.zeros((1, *patch, 1)))
    step = jit_train_step(
        make_train_step(model, optimizer, config.train.loss, lr_schedule=make_lr_schedule(config.train))
    )
    rng = np.random.default_rng(0)
    device_batch = {
        "image": jax.device_put(rng.normal(size=(batch, *patch, 1)).astype(np.float32)),
        "label": jax.device_put(rng.integers(0, plan["num_classes"], (batch, *patch)).astype(np.int32)),
    }
    for _ in range(3):  # compile and warm up
        state, metrics = step(state, device_batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, device_batch)
    jax.block_until_ready((state, metrics))
    return steps / (time.perf_counter() - start)


def checkout_commit(folder: Path) -> str | None:
    """The git commit of the checkout ``folder`` belongs to (which loop was measured), if any."""
    import subprocess

    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=folder, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="loop steps per run (default 150)")
    parser.add_argument("--skip", type=int, default=30, help="loop steps left out of the rate (start-up)")
    parser.add_argument("--log-every", type=int, default=10, help="train.log_every of the loop runs")
    parser.add_argument("--batch", type=int, default=8, help="global batch")
    parser.add_argument("--size", type=int, default=64, help="patch side (2D)")
    parser.add_argument("--base-features", type=int, default=8, help="model.base_features")
    parser.add_argument("--repeats", type=int, default=3, help="alternated loop / bare runs")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    if args.steps <= args.skip or args.repeats < 1:
        parser.error("--steps must exceed --skip, and --repeats must be >= 1")

    import jax

    import medseg_jax

    overrides = [
        *OVERRIDES,
        f"train.steps={args.steps}",
        f"train.log_every={args.log_every}",
        f"train.checkpoint_every={args.steps}",
        f"model.base_features={args.base_features}",
        f"data.batch_size={args.batch}",
        f"data.patch_size=[{args.size}, {args.size}]",
    ]
    loop, bare = [], []
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(Path(tmp), cases=6, shape=(args.size, args.size, 16))
        for repeat in range(args.repeats):
            loop.append(loop_rate(store, Path(tmp) / f"run{repeat}", overrides, args.steps, args.skip))
            bare.append(bare_rate(store, overrides, args.steps - args.skip))
            print(f"repeat {repeat}: loop {loop[-1]:.2f} steps/s, bare step {bare[-1]:.2f} steps/s", flush=True)
    result = {
        "loop_steps_per_s": loop,
        "bare_steps_per_s": bare,
        "loop_median": statistics.median(loop),
        "bare_median": statistics.median(bare),
        # each loop run is paired with the bare run right after it: the median of the pairs' ratios is
        # robust to the machine's speed drifting between repeats
        "ratio": statistics.median(a / b for a, b in zip(loop, bare)),
        "ratio_of_medians": statistics.median(loop) / statistics.median(bare),
        "settings": vars(args) | {"out": None if args.out is None else args.out.name},
        "versions": {
            "medseg_jax_commit": checkout_commit(Path(medseg_jax.__file__).parent),
            "jax": jax.__version__,
            "python": sys.version.split()[0],
        },
    }
    print(
        f"loop {result['loop_median']:.2f} steps/s, bare step {result['bare_median']:.2f} steps/s, "
        f"ratio {result['ratio']:.3f}"
    )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
