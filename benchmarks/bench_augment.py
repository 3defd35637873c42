"""Augmentation cost: on the device (jitted, inside the step) versus CPU worker processes (NumPy/SciPy).

Measures, with nnU-Net v2's default augmentation (:class:`medseg_jax.augment.AugmentConfig`):

A. at ``--patch`` (default nnU-Net's typical 3D patch 128^3, batch 2), input crops of
   ``loader_crop_size`` (the rotation/scaling margin):
   - ``device``: the jitted ``augment_fn`` on the batch (``block_until_ready``), per batch;
   - ``cpu_sample``: ``augment_numpy`` on one sample in this process (transforms that are not drawn
     cost nothing there, so this is the mean over many samples), per sample;
   - ``cpu_pool``: batches produced by a ``multiprocessing`` pool of ``--workers`` processes, each holding
     its own crop and sending the augmented patch back (as a loader's workers do), per batch.
B. at ``--step-patch`` (default: ``--patch``): the train step of the nnU-Net-default U-Net for that
   patch (``ModelConfig`` defaults, SGD) without augmentation on patch-sized batches and with device
   augmentation on crop-sized batches (timed alternately), and the device augmentation alone at that
   patch. The figure
   for CPU-only machines is ``augment / step``; on a GPU, ``step with`` versus ``step without``.

Every figure is the median of ``--repeats`` timed runs after a warm-up (compilation excluded and
reported apart). Run ``python benchmarks/bench_augment.py --help`` for the flags; ``--small`` is a quick
run (patch 64^3, step patch 32^3).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time

import numpy as np

from medseg_jax.bench.suite import machine_info
from medseg_jax.kernels.timing import time_round_robin

_WORKER = {}


def _init_worker(crop, channels, patch, seed):
    """Pool initialiser: each worker holds its own crop, like a loader worker that has read it."""
    from medseg_jax.augment import AugmentConfig

    rng = np.random.default_rng(seed)
    _WORKER.update(
        image=rng.normal(size=(1, *crop, channels)).astype(np.float32),
        label=rng.integers(0, 3, (1, *crop)).astype(np.int32),
        patch=patch,
        config=AugmentConfig(),
    )


def _worker_augment(seed):
    from medseg_jax.augment import augment_numpy

    w = _WORKER
    image, label = augment_numpy(np.random.default_rng(seed), w["image"], w["label"], w["config"], w["patch"])
    return image[0], label[0]


def timed(fn, repeats):
    """Median and all of ``repeats`` wall times of ``fn()`` (which must block until done; it has been
    warmed up by the caller)."""
    times = time_round_robin({"run": fn}, repeats, warmup=0)["run"]
    return statistics.median(times), times


def random_batch(shape, channels, batch, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(batch, *shape, channels)).astype(np.float32),
        rng.integers(0, 3, (batch, *shape)).astype(np.int32),
    )


def bench_device_augment(patch, batch, channels, repeats):
    import jax

    from medseg_jax.augment import AugmentConfig, loader_crop_size, make_augmentation

    config = AugmentConfig()
    crop = loader_crop_size(config, patch)
    image, label = (jax.device_put(a) for a in random_batch(crop, channels, batch))
    augment = jax.jit(make_augmentation(config, patch))
    start = time.perf_counter()
    jax.block_until_ready(augment(jax.random.key(0), image, label))
    compile_s = time.perf_counter() - start
    counter = iter(range(1, 10**6))
    median, times = timed(lambda: jax.block_until_ready(augment(jax.random.key(next(counter)), image, label)), repeats)
    return dict(crop=crop, compile_s=compile_s, median_s=median, times_s=times)


def bench_cpu_sample(patch, channels, samples):
    from medseg_jax.augment import AugmentConfig, augment_numpy, loader_crop_size

    config = AugmentConfig()
    crop = loader_crop_size(config, patch)
    image, label = random_batch(crop, channels, 1)
    seeds = iter(range(samples))  # a new draw per call: transforms not drawn cost nothing on the CPU
    times = time_round_robin(
        {"sample": lambda: augment_numpy(np.random.default_rng(next(seeds)), image, label, config, patch)},
        samples,
        warmup=0,
    )["sample"]
    return dict(mean_s=statistics.mean(times), median_s=statistics.median(times), max_s=max(times), samples=samples)


def bench_cpu_pool(patch, batch, channels, workers, batches, repeats):
    from medseg_jax.augment import AugmentConfig, loader_crop_size

    crop = loader_crop_size(AugmentConfig(), patch)
    context = multiprocessing.get_context("spawn")  # never fork a process that has started JAX
    with context.Pool(workers, _init_worker, (crop, channels, patch, 0)) as pool:
        pool.map(_worker_augment, range(workers), chunksize=1)  # start-up and imports, not timed
        seeds = iter(range(10**6))

        def run():
            list(pool.imap_unordered(_worker_augment, [next(seeds) for _ in range(batches * batch)], chunksize=1))

        median, times = timed(run, repeats)
    return dict(
        workers=workers, batches_per_run=batches, median_batch_s=median / batches, times_s=[t / batches for t in times]
    )


def prepare_train_step(patch, batch, channels, with_augment):
    """A jitted nnU-Net-default train step on a fixed batch: patch-sized without augmentation,
    crop-sized with device augmentation. Returns ``run()`` (one step, blocking) and facts about it."""
    import jax
    import jax.numpy as jnp

    from medseg_jax.augment import (
        AugmentConfig,
        loader_crop_size,
        train_step_augmentation,
    )
    from medseg_jax.config import ModelConfig, TrainConfig
    from medseg_jax.models.factory import build_unet
    from medseg_jax.train import create_train_state, make_optimizer, make_train_step
    from medseg_jax.train.step import jit_train_step

    model_config = ModelConfig(spatial_dims=len(patch), in_channels=channels, num_classes=3)
    train_config = TrainConfig()
    model = build_unet(model_config)
    optimizer = make_optimizer(train_config)
    augment = AugmentConfig()
    augment_fn = train_step_augmentation(augment, patch, num_classes=3) if with_augment else None
    shape = loader_crop_size(augment, patch) if with_augment else tuple(patch)
    image, label = random_batch(shape, channels, batch)
    data = {"image": jax.device_put(image), "label": jax.device_put(label)}
    state = create_train_state(model, optimizer, jax.random.key(0), jnp.zeros((1, *patch, channels)))
    step = jit_train_step(make_train_step(model, optimizer, train_config.loss, augment_fn=augment_fn))
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], data)
        jax.block_until_ready(metrics["loss"])

    start = time.perf_counter()
    run()  # compiles
    return run, dict(input=shape, compile_s=time.perf_counter() - start)


def bench_train_steps(patch, batch, channels, repeats):
    """Steps without and with augmentation, timed alternately (one of each per round) so that a change
    of load on a shared machine hits both alike."""
    members = {
        name: prepare_train_step(patch, batch, channels, name == "step_with") for name in ("step_without", "step_with")
    }
    times = time_round_robin({name: run for name, (run, _) in members.items()}, repeats, warmup=0)
    return {
        name: dict(info, median_s=statistics.median(times[name]), times_s=times[name])
        for name, (_, info) in members.items()
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patch", type=int, nargs="+", default=[128, 128, 128], help="output patch (spatial)")
    parser.add_argument("--step-patch", type=int, nargs="+", default=None, help="patch of part B (default --patch)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="CPU augmentation worker processes")
    parser.add_argument("--cpu-batches", type=int, default=4, help="batches per timed run of the worker pool")
    parser.add_argument("--cpu-samples", type=int, default=24, help="samples timed one by one in this process")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median reported)")
    parser.add_argument("--small", action="store_true", help="quick run: patch 64^3, step patch 32^3")
    parser.add_argument("--skip-step", action="store_true", help="skip part B (train steps)")
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.small:
        args.patch, args.step_patch = [64] * len(args.patch), [32] * len(args.patch)
    patch = tuple(args.patch)
    step_patch = tuple(args.step_patch or args.patch)

    result = dict(
        command="python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        machine=machine_info(),
        patch=patch,
        batch=args.batch,
        channels=args.channels,
    )
    print(f"part A at {patch}: CPU pool, one process, device", file=sys.stderr, flush=True)
    result["cpu_pool"] = bench_cpu_pool(patch, args.batch, args.channels, args.workers, args.cpu_batches, args.repeats)
    result["cpu_sample"] = bench_cpu_sample(patch, args.channels, args.cpu_samples)
    result["device"] = bench_device_augment(patch, args.batch, args.channels, args.repeats)
    device_s = result["device"]["median_s"]
    result["ratios"] = dict(
        cpu_pool_over_device=result["cpu_pool"]["median_batch_s"] / device_s,
        cpu_one_process_batch_over_device=result["cpu_sample"]["mean_s"] * args.batch / device_s,
    )
    if not args.skip_step:
        result["step_patch"] = step_patch
        print(f"part B at {step_patch}: device augmentation, train steps", file=sys.stderr, flush=True)
        result["device_at_step_patch"] = bench_device_augment(step_patch, args.batch, args.channels, args.repeats)
        result.update(bench_train_steps(step_patch, args.batch, args.channels, args.repeats))
        without = result["step_without"]["median_s"]
        result["ratios"].update(
            augment_over_step=result["device_at_step_patch"]["median_s"] / without,
            step_with_over_without=result["step_with"]["median_s"] / without,
        )
    print(report(result))
    if args.out:
        from medseg_jax.atomic import write_json_atomic

        write_json_atomic(args.out, result)
    return result


def report(r) -> str:
    m = r["machine"]
    lines = [
        f"- machine: {m['cpu']}, {m['cpu_count']} cores, JAX backend {m['backend']} ({m['device_kind']}), "
        f"load average at start {', '.join(f'{x:.1f}' for x in m['load_average'])}",
        f"- versions: Python {m['python']}, jax {m['jax']}, numpy {m['numpy']}, scipy {m['scipy']}",
        f"- command: `{r['command']}`",
        f"- patch {'x'.join(map(str, r['patch']))}, batch {r['batch']}, {r['channels']} channel(s), nnU-Net v2 "
        f"default augmentation, input crop {'x'.join(map(str, r['device']['crop']))}; medians of the timed runs",
        "",
        "| measurement | seconds | runs (s) |",
        "| --- | ---: | --- |",
        f"| device augmentation, per batch (jitted; compile {r['device']['compile_s']:.1f} s) | "
        f"{r['device']['median_s']:.3f} | {', '.join(f'{t:.3f}' for t in r['device']['times_s'])} |",
        f"| CPU pool of {r['cpu_pool']['workers']} workers, per batch | {r['cpu_pool']['median_batch_s']:.3f} | "
        f"{', '.join(f'{t:.3f}' for t in r['cpu_pool']['times_s'])} |",
        f"| CPU one process, per sample (mean of {r['cpu_sample']['samples']}; median "
        f"{r['cpu_sample']['median_s']:.3f}, max {r['cpu_sample']['max_s']:.3f}) | {r['cpu_sample']['mean_s']:.3f} | |",
    ]
    if "step_without" in r:
        sp = "x".join(map(str, r["step_patch"]))
        lines += [
            f"| device augmentation at {sp}, per batch | {r['device_at_step_patch']['median_s']:.3f} | "
            f"{', '.join(f'{t:.3f}' for t in r['device_at_step_patch']['times_s'])} |",
            f"| train step at {sp}, no augmentation (compile {r['step_without']['compile_s']:.0f} s) | "
            f"{r['step_without']['median_s']:.3f} | {', '.join(f'{t:.3f}' for t in r['step_without']['times_s'])} |",
            f"| train step at {sp} with device augmentation, input {'x'.join(map(str, r['step_with']['input']))} | "
            f"{r['step_with']['median_s']:.3f} | {', '.join(f'{t:.3f}' for t in r['step_with']['times_s'])} |",
        ]
    lines += ["", "Ratios: " + ", ".join(f"{k} = {v:.3f}" for k, v in r["ratios"].items())]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
