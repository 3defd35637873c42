"""The training loop: the same code on a laptop CPU, a multi-GPU box and a TPU pod.

``train(config, store_dir, run_dir, fold)``: builds the mesh and the sharded, jitted step, restores
the newest readable checkpoint of ``run_dir`` if there is one (state, rng, learning-rate position and
data stream: a resumed run ends with the same parameters as an uninterrupted one), then steps with a
progress bar, appends metrics to ``metrics.jsonl``, validates every ``val_every`` steps (Dice on the
fold's whole validation cases by sliding window, or on patches, and nnU-Net's pseudo-Dice EMA), redraws
``training_curve.png``, checkpoints every ``checkpoint_every`` steps and at the end. SIGTERM / SIGINT save a
checkpoint and return cleanly; a non-finite loss stops with the step number (or is skipped, by config).
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from pathlib import Path

import jax
import numpy as np

from medseg_jax import checkpoint, parallel
from medseg_jax.atomic import json_safe, write_json_atomic, write_text_atomic
from medseg_jax.config import to_dict
from medseg_jax.errors import TrainingError
from medseg_jax.metrics.overlap import binary_tp_fp_fn, dice_iou_from_counts
from medseg_jax.train import setup
from medseg_jax.train.optim import make_lr_schedule, make_optimizer
from medseg_jax.train.state import create_train_state
from medseg_jax.train.step import jit_train_step, make_eval_step, make_train_step

PSEUDO_DICE_MOMENTUM = 0.9  # nnU-Net's EMA of the mean foreground Dice across validations
VALIDATION_SEED = 12345  # validation draws the same patches every time, so values are comparable


@contextlib.contextmanager
def stop_requests():
    """A ``threading.Event`` set by SIGTERM / SIGINT while the block runs (main thread only)."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: event.set())
    try:
        yield event
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def read_metrics(path: Path, up_to_step: int | None = None) -> list[dict]:
    """Entries of ``metrics.jsonl`` (a torn last line from a kill is ignored)."""
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if up_to_step is None or entry.get("step", 0) <= up_to_step:
            entries.append(entry)
    return entries


def validate(eval_fn, params, batches, shardings) -> dict:
    """Patch-level validation over ``batches``: mean loss and per-class Dice from summed counts."""
    totals, losses = None, []
    for local in batches:
        out = jax.device_get(eval_fn(params, parallel.global_batch(local, shardings)))
        counts = np.stack([out["tp"], out["fp"], out["fn"]])
        totals = counts if totals is None else totals + counts
        losses.append(float(out["loss"]))
    assert totals is not None, "validate needs at least one batch"  # val_batches >= 1 (config bound)
    return {"val_loss": float(np.mean(losses)), **dice_summary(totals)}


def dice_summary(totals: np.ndarray) -> dict:
    """Per-class Dice from summed ``(tp, fp, fn)`` counts (None where a class is absent from both) and
    their mean over the foreground classes (0 when none is present): one validation's result."""
    dice = dice_iou_from_counts(*totals)[0]
    return {
        "val_dice_per_class": [None if np.isnan(d) else float(d) for d in dice],
        "val_dice": float(np.nanmean(dice[1:])) if np.any(~np.isnan(dice[1:])) else 0.0,
    }


def validate_cases(model, params, plan: dict, config, store, case_ids, mesh) -> dict:
    """Whole-case validation: sliding window (no mirroring, windows accumulated on the host so one
    program serves every case shape) on each preprocessed validation case; Dice per class from the
    counts pooled over the cases."""
    import dataclasses

    from medseg_jax.inference.predict import Predictor

    inference = dataclasses.replace(config.inference, mirror_axes=())
    predictor = Predictor(model, params, plan, inference, accumulate="host", mesh=mesh)
    num_classes = int(plan["num_classes"])
    totals = np.zeros((3, num_classes))
    for case_id in case_ids:
        image, label = store.read_case(case_id)
        prediction = np.argmax(predictor.probabilities(image), axis=0)
        for k in range(num_classes):
            totals[:, k] += binary_tp_fp_fn(prediction == k, label == k)
    return dice_summary(totals)


VALIDATION_LABELS = {"sliding_window": "validation Dice (whole cases)", "patches": "validation Dice (patches)"}


def plot_curves(run_dir: Path, entries: list[dict], val_mode: str) -> None:
    from medseg_jax.report import plot_training_curve

    train_entries = [e for e in entries if "loss" in e]
    val_entries = [e for e in entries if "val_dice" in e]
    if train_entries:
        plot_training_curve(
            train_entries,
            run_dir / "training_curve.png",
            validation=val_entries,
            validation_label=VALIDATION_LABELS[val_mode],
        )


def augmentation(run: setup.ResolvedRun):
    """``(augment_fn for the step, batch_transform for the loader)`` for ``augment.mode`` device / cpu /
    none (see :mod:`medseg_jax.augment`); the loader cuts ``run.crop_size``."""
    import functools

    from medseg_jax.augment import augment_batch_numpy, train_step_augmentation

    c, num_classes = run.augment, run.model.num_classes
    if c.mode == "cpu":
        return None, functools.partial(
            augment_batch_numpy, config=c, patch_size=run.patch_size, num_classes=num_classes
        )
    return train_step_augmentation(c, run.patch_size, num_classes), None


def train(
    config, store_dir, run_dir, fold: int = 0, resume: bool = True, progress: bool = True, log=lambda message: None
) -> dict:
    """Train on fold ``fold`` of the store; returns a summary dict (also written to ``summary.json``)."""
    from tqdm.auto import tqdm

    from medseg_jax.data.loader import make_train_loader
    from medseg_jax.data.store import CaseStore
    from medseg_jax.models.factory import build_unet

    parallel.initialize_distributed(config.distributed)
    run_dir, store = Path(run_dir), CaseStore(store_dir)
    setup.check_run_folder(run_dir, store_dir)
    run = setup.resolve_run(config, store.read_plan())
    config, plan = run.config, run.plan
    if resume:
        setup.check_existing_run(run_dir, config)
    split = setup.store_fold(store, fold)
    main = parallel.is_main_process()

    model = build_unet(config.model)
    mesh = parallel.make_mesh(config.mesh)
    optimizer, schedule = make_optimizer(config.train), make_lr_schedule(config.train)
    init = lambda key: create_train_state(
        model,
        optimizer,
        key,
        jax.numpy.zeros(setup.sample_input_shape(run)),
        use_ema=config.train.ema_decay is not None,
    )
    abstract = jax.eval_shape(init, jax.random.key(config.train.seed))
    state_shardings = parallel.state_shardings(mesh, abstract, config.mesh.fsdp_min_size)
    batch_shardings = parallel.batch_shardings(mesh, config.model.spatial_dims)

    manager = checkpoint.make_manager(run_dir / "checkpoints", keep=config.train.keep_checkpoints)
    restored = (
        checkpoint.restore_latest_good(
            manager,
            checkpoint.abstract_with_shardings(abstract, state_shardings),
            check_meta=lambda meta: setup.check_compatible(meta, config, run_dir),
        )
        if resume
        else None
    )
    if main:  # only once the run is known to be compatible: config.yaml is what prediction reads
        setup.write_run_files(run_dir, run, fold)
    data_state, pseudo_dice = None, None
    if restored is not None:
        step0, state, data_state, restored_meta, skipped = restored
        for bad_step, reason in skipped:
            log(f"warning: checkpoint {bad_step} is unreadable ({reason}); resuming from an older one")
        pseudo_dice = restored_meta.get("pseudo_dice")
        log(f"resuming from step {step0} ({run_dir / 'checkpoints'})")
    else:
        state = jax.jit(init, out_shardings=state_shardings)(jax.random.key(config.train.seed))
    start = int(state.step)

    per_host_batch = run.per_process_batch
    augment_fn, batch_transform = augmentation(run)
    loader = iter(
        make_train_loader(
            store,
            split["train"],
            run.patch_size,
            per_host_batch,
            config.data.foreground_fraction,
            seed=config.data.seed,
            num_workers=config.data.num_workers,
            shard_index=jax.process_index(),
            shard_count=jax.process_count(),
            crop_size=run.crop_size,
            batch_transform=batch_transform,
        )
    )
    if data_state is not None:
        loader.set_state(data_state)
    step_fn = jit_train_step(
        make_train_step(
            model,
            optimizer,
            config.train.loss,
            lr_schedule=schedule,
            ema_decay=config.train.ema_decay,
            augment_fn=augment_fn,
        ),
        state_shardings,
        batch_shardings,
    )
    eval_fn = jax.jit(make_eval_step(model, config.train.loss), in_shardings=(state_shardings.params, batch_shardings))

    metrics_path = run_dir / "metrics.jsonl"
    entries = read_metrics(metrics_path, up_to_step=start)
    if main:  # drop lines logged after the checkpoint we resumed from: they will be logged again
        write_text_atomic(metrics_path, "".join(json.dumps(e) + "\n" for e in entries))

    def meta() -> dict:
        return {"config": to_dict(config), "plan": plan, "fold": fold, "pseudo_dice": pseudo_dice}

    last_saved = start if restored is not None else None

    def save(step: int, val_dice=None):
        nonlocal last_saved
        if step != last_saved:
            checkpoint.save(manager, step, state, loader.get_state(), meta(), val_dice=val_dice)
            last_saved = step

    def append(entry: dict):
        entries.append(entry)
        if main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    steps, stopped, started = config.train.steps, False, time.perf_counter()
    bar = tqdm(total=steps, initial=start, desc="train", unit="step", disable=not (progress and main))
    with stop_requests() as stop_requested:
        for step in range(start, steps):
            state, metrics = step_fn(state, parallel.global_batch(next(loader), batch_shardings))
            metrics = jax.device_get(metrics)
            done = step + 1
            if not bool(metrics["finite"]):
                if config.train.nan_policy == "stop":
                    bar.close()
                    manager.wait_until_finished()
                    raise TrainingError(
                        f"non-finite loss ({float(metrics['loss'])}) at step {step}; stopped without saving, the "
                        f"last good checkpoint in {run_dir / 'checkpoints'} is intact. Lower train.learning_rate, "
                        "check the input intensities, or set train.nan_policy=skip"
                    )
                log(f"warning: non-finite loss at step {step}; update skipped")
            bar.update(1)
            bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", lr=f"{float(metrics['learning_rate']):.2e}")
            if done % config.train.log_every == 0 or done == steps:
                append(
                    {
                        "step": done,
                        "loss": float(metrics["loss"]),
                        "learning_rate": float(metrics["learning_rate"]),
                        "grad_norm": float(metrics["grad_norm"]),
                        "seconds": round(time.perf_counter() - started, 3),
                    }
                )
            val_dice = None
            if split["val"] and (done % config.train.val_every == 0 or done == steps):
                if config.train.val_mode == "sliding_window":
                    result = validate_cases(model, state.params, plan, config, store, split["val"], mesh)
                else:
                    val_batches = iter(
                        make_train_loader(
                            store,
                            split["val"],
                            config.data.patch_size,
                            per_host_batch,
                            config.data.foreground_fraction,
                            seed=VALIDATION_SEED,
                            shard_index=jax.process_index(),
                            shard_count=jax.process_count(),
                        )
                    )
                    result = validate(
                        eval_fn,
                        state.params,
                        (next(val_batches) for _ in range(config.train.val_batches)),
                        batch_shardings,
                    )
                pseudo_dice = (
                    result["val_dice"]
                    if pseudo_dice is None
                    else (PSEUDO_DICE_MOMENTUM * pseudo_dice + (1 - PSEUDO_DICE_MOMENTUM) * result["val_dice"])
                )
                val_dice = pseudo_dice
                append({"step": done, **result, "pseudo_dice": pseudo_dice})
                if main:
                    plot_curves(run_dir, entries, config.train.val_mode)
            if done % config.train.checkpoint_every == 0 or done == steps or val_dice is not None:
                save(done, val_dice)
            if stop_requested.is_set() and done < steps:
                save(done)
                stopped = True
                break
    bar.close()
    manager.wait_until_finished()
    manager.close()
    if main:
        plot_curves(run_dir, entries, config.train.val_mode)
    final = int(state.step)
    losses = [e["loss"] for e in entries if "loss" in e]
    summary = {
        "run_dir": str(run_dir),
        "fold": fold,
        "step": final,
        "steps": steps,
        "stopped_early": stopped,
        "final_loss": losses[-1] if losses else None,
        "pseudo_dice": pseudo_dice,
        "seconds": round(time.perf_counter() - started, 2),
        "mesh": dict(mesh.shape),
    }
    if main:
        write_json_atomic(run_dir / "summary.json", json_safe(summary))  # a skipped NaN loss -> null
    if stopped:
        log(
            f"stopped at step {final} of {steps} on request; checkpoint saved. Resume with the same command "
            f"(it continues from {run_dir / 'checkpoints'})."
        )
    return summary | {"state": state, "model": model, "config": config, "plan": plan, "split": split}
