"""The training loop: the same code on a laptop CPU, a multi-GPU box and a TPU pod.

``train(config, store_dir, run_dir, fold)`` resolves the run (:mod:`medseg_jax.train.setup`), builds the
mesh and the sharded, jitted step, restores the newest readable checkpoint of ``run_dir`` if there is one
(state, rng, learning-rate position and data stream: a resumed run ends with the same parameters as an
uninterrupted one), then runs the lean step loop: take a batch that is already on the device, launch the
step, load and transfer the next batch while the device computes, and read the *previous* step's metrics.
The hooks (:mod:`medseg_jax.train.hooks`) run at their intervals: metrics (``metrics.jsonl``,
TensorBoard, ``log.txt``), validation, checkpoints, and the stop request that SIGTERM / SIGINT make
(agreed by every process, saved, then a clean return). A non-finite loss stops with the step number (or
is skipped, by config).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import jax

from medseg_jax import checkpoint, parallel, tuning
from medseg_jax.atomic import json_safe, write_json_atomic, write_text_atomic
from medseg_jax.config import to_dict
from medseg_jax.errors import ConfigError, DataError
from medseg_jax.train import hooks, setup
from medseg_jax.train.optim import make_lr_schedule, make_optimizer
from medseg_jax.train.prefetch import DevicePrefetcher
from medseg_jax.train.state import create_train_state
from medseg_jax.train.step import jit_train_step, make_eval_step, make_train_step


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What a call of :func:`train` did (also written to ``RUN/summary.json``)."""

    run_dir: Path
    fold: int
    step: int
    steps: int
    stopped_early: bool
    final_loss: float | None
    pseudo_dice: float | None
    final_validation_dice: float | None  # mean foreground Dice of the final validation (None: not run)
    seconds: float
    mesh: dict
    split: dict

    def summary(self) -> dict:
        fields = dataclasses.asdict(self)
        return {k: str(v) if isinstance(v, Path) else v for k, v in fields.items() if k != "split"}


def _final_validation(run_dir, store, case_ids, model, state, plan, config, mesh, progress, log) -> float | None:
    """Validate the fold (:mod:`medseg_jax.train.final_validation`) with a local copy of the parameters (EMA
    where kept, as prediction uses), unless a complete validation of this step exists. With several processes
    each predicts every ``process_count``-th case on its own devices, then process 0 evaluates them all
    (the run folder is shared, as for checkpoints); a process that fails makes every process raise, so none
    waits for it. Returns the mean foreground Dice on process 0, None on the others."""
    from medseg_jax.train import final_validation as validation

    step = int(jax.device_get(state.step))
    params = state.ema_params if state.ema_params is not None else state.params
    local = parallel.local_mesh() if jax.process_count() > 1 else mesh
    params = parallel.host_local_tree(params, local)  # every process: it may need a collective
    main = parallel.is_main_process()
    summary = validation.validation_summary(run_dir)
    # every process takes the same branch (a shared file system may show the file late to some)
    if parallel.any_process(summary is None or summary.get("step") != step):
        if main:
            validation.start_validation(run_dir, step)
        parallel.barrier("final-validation-start")
        mine = sorted(case_ids)[jax.process_index() :: jax.process_count()]
        failure: Exception | None = None
        try:
            predicted = validation.predict_validation_cases(
                run_dir, store, mine, model, params, plan, config.inference, mesh=local, progress=progress and main
            )
            if jax.process_count() > 1:
                log(f"process {jax.process_index()}: predicted {predicted} of its {len(mine)} validation case(s)")
        except Exception as exc:  # noqa: BLE001 -- re-raised below, after the other processes are told
            failure = exc
        if parallel.any_process(failure is not None):
            if failure is not None:
                raise failure
            raise DataError("another process failed in the final validation (see its log); run train again to finish")
        if main:  # any_process above is a collective: every process has written its cases by now
            summary = validation.write_validation_summary(run_dir, store, case_ids, plan, config.inference, step)
    if not main:
        return None
    assert summary is not None  # complete, or just written
    return float(summary["foreground_mean"]["dice"])


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


def plot_curves(run_dir: Path, entries: list[dict], val_mode: str) -> None:
    from medseg_jax.report import plot_training_curve

    train_entries = [e for e in entries if "loss" in e]
    val_entries = [e for e in entries if "val_dice" in e]
    if train_entries:
        plot_training_curve(
            train_entries,
            run_dir / "training_curve.png",
            validation=val_entries,
            validation_label=hooks.VALIDATION_LABELS[val_mode],
        )


def augmentation(run: setup.ResolvedRun):
    """``(augment_fn for the step, batch_transform for the loader)`` for ``augment.mode`` device / cpu /
    none (see :mod:`medseg_jax.augment`); the loader cuts ``run.crop_size``."""
    import functools

    from medseg_jax.augment import augment_batch_numpy, train_step_augmentation
    from medseg_jax.cascade import degrade_batch, mask_channels

    c, num_classes = run.augment, run.model.num_classes
    masks = mask_channels(run.plan)  # a cascade's previous-stage masks: degraded in the loader, kept binary
    if c.mode == "cpu":
        return None, functools.partial(
            augment_batch_numpy, config=c, patch_size=run.patch_size, num_classes=num_classes, mask_channels=masks
        )
    degrade = functools.partial(degrade_batch, mask_channels=masks) if masks else None
    return train_step_augmentation(c, run.patch_size, num_classes, masks), degrade


def train(
    config,
    store_dir,
    run_dir,
    fold: int = 0,
    resume: bool = True,
    progress: bool = True,
    log=lambda message: None,
    transfer_guard: str | None = None,
    autotune: bool = False,
    init_from=None,
    final_validation: bool = True,
) -> TrainResult:
    """Train on fold ``fold`` of the store.

    ``transfer_guard`` (e.g. ``"disallow"``) runs every step under ``jax.transfer_guard``: a hidden
    host/device transfer in the step loop is then an error (tests use it; the hooks run outside it).
    ``autotune``: before anything is compiled, time the implementations left at ``"auto"`` for one
    device's training batch and train with the fastest (:mod:`medseg_jax.tuning`; recorded in
    ``RUN/autotune.json``, never in the run's config, so the run resumes with or without it).
    ``init_from``: a run folder whose parameters a new run starts from (:mod:`medseg_jax.train.init_from`;
    ``config.model`` must already carry its network settings, see ``adopt_network``); a resumed run
    continues from its own checkpoint.
    ``final_validation``: once the last step is done, predict and evaluate the fold's validation cases as
    ``predict`` does (:mod:`medseg_jax.train.final_validation`, ``RUN/validation/``); a finished run called
    again only completes a validation that is missing or was interrupted.
    """
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

    model, tuning_record = build_unet(config.model), None
    if autotune:  # before anything is compiled: every program below runs the tuned implementations
        quiet = lambda message: None
        shape = tuning.training_input_shape(run)
        model, tuning_record = tuning.tune_model(model, shape, backward=True, log=log if main else quiet)
    mesh = parallel.make_mesh(config.mesh)
    optimizer, schedule = make_optimizer(config.train), make_lr_schedule(config.train)
    sample = setup.sample_input_shape(run)
    use_ema = config.train.ema_decay is not None
    init = lambda key: create_train_state(model, optimizer, key, jax.numpy.zeros(sample), use_ema=use_ema)
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
        if init_from is not None:
            from medseg_jax.train.init_from import initialise_from

            state = initialise_from(state, init_from, state_shardings, log if main else lambda message: None)
    start = int(jax.device_get(state.step))
    if start > config.train.steps:
        raise ConfigError(
            f"train.steps={config.train.steps} is below step {start} of the checkpoint in {run_dir / 'checkpoints'}: "
            "a run can be trained longer, not shortened"
        )
    if main:
        tuning.write_record(run_dir, tuning_record, from_step=start)

    augment_fn, batch_transform = augmentation(run)
    loader_options = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
    loader = iter(
        make_train_loader(
            store,
            split["train"],
            run.patch_size,
            run.per_process_batch,  # this process's rows of every global batch
            config.data.foreground_fraction,
            seed=config.data.seed,
            num_workers=config.data.num_workers,
            crop_size=run.crop_size,
            batch_transform=batch_transform,
            **loader_options,
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

    def validation_batches():
        batches = iter(
            make_train_loader(
                store,
                split["val"],
                run.patch_size,
                run.per_process_batch,
                config.data.foreground_fraction,
                seed=hooks.VALIDATION_SEED,
                **loader_options,
            )
        )
        return (next(batches) for _ in range(config.train.val_batches or 0))

    validator = hooks.Validator(
        model, plan, config, store, split["val"], mesh, eval_fn, batch_shardings, validation_batches
    )
    metrics_path = run_dir / "metrics.jsonl"
    entries = read_metrics(metrics_path, up_to_step=start)
    if main:  # drop lines logged after the checkpoint we resumed from: they will be logged again
        write_text_atomic(metrics_path, "".join(json.dumps(e) + "\n" for e in entries))

    def meta() -> dict:
        return {"config": to_dict(config), "plan": plan, "fold": fold, "pseudo_dice": pseudo_dice}

    checkpointer = hooks.Checkpointer(manager, meta, last_saved=start if restored is not None else None)
    steps, stopped = config.train.steps, False
    bar = tqdm(total=steps, initial=start, desc="train", unit="step", disable=not (progress and main))
    metrics_log = hooks.MetricsLog(run_dir, config, plan, entries, start, bar, log, main)
    prefetcher = DevicePrefetcher(
        loader, lambda batch: parallel.global_batch(batch, batch_shardings), depth=config.train.prefetch_batches
    )
    guard = (lambda: jax.transfer_guard(transfer_guard)) if transfer_guard else contextlib.nullcontext
    try:
        with hooks.StopRequests(config.train.stop_timeout_seconds, log) as stops:
            if start < steps:
                prefetcher.fill()
            for step in range(start, steps):
                done = step + 1
                with guard():  # the lean loop: launch, prefetch, read the previous step's metrics
                    state, device_metrics = step_fn(state, prefetcher.take())
                    if done < steps:
                        prefetcher.fill()
                    metrics_log.push(done, device_metrics)
                val_dice = None
                if split["val"] and (done % config.train.val_every == 0 or done == steps):
                    metrics_log.flush()  # the step's own metrics (and its finiteness) before validating it
                    validation = validator(state.params)
                    pseudo_dice = hooks.pseudo_dice_update(pseudo_dice, validation["val_dice"])
                    val_dice = pseudo_dice
                    metrics_log.validation(done, validation, pseudo_dice)
                    if main:
                        plot_curves(run_dir, entries, config.train.val_mode)
                if done % config.train.checkpoint_every == 0 or done == steps or val_dice is not None:
                    metrics_log.flush()  # never checkpoint a step whose loss is not known to be finite
                    checkpointer.save(done, state, prefetcher.consumed_state, val_dice)
                if done < steps and stops.agreed(done, config.train.log_every):
                    metrics_log.flush()
                    checkpointer.save(done, state, prefetcher.consumed_state)
                    stopped = True
                    break
            metrics_log.flush()
    except BaseException:
        bar.close()
        metrics_log.close()
        checkpointer.abandon()
        loader.close()
        raise
    bar.close()
    metrics_log.close()
    checkpointer.finish()
    loader.close()
    if main:
        plot_curves(run_dir, entries, config.train.val_mode)
    final = int(jax.device_get(state.step))
    validation_dice = None
    if final_validation and not stopped and split["val"] and final == steps:
        validation_dice = _final_validation(
            run_dir, store, split["val"], model, state, plan, config, mesh, progress, log
        )
        if validation_dice is not None:
            log(f"final validation of {len(split['val'])} case(s): mean foreground Dice {validation_dice:.4f}")
    losses = [e["loss"] for e in entries if "loss" in e]
    result = TrainResult(
        run_dir=run_dir,
        fold=fold,
        step=final,
        steps=steps,
        stopped_early=stopped,
        final_loss=losses[-1] if losses else None,
        pseudo_dice=pseudo_dice,
        final_validation_dice=validation_dice,
        seconds=round(metrics_log.seconds(), 2),
        mesh=dict(mesh.shape),
        split=split,
    )
    if main:
        write_json_atomic(run_dir / "summary.json", json_safe(result.summary()))
    if stopped:
        log(
            f"stopped at step {final} of {steps} on request; checkpoint saved. Resume with the same command "
            f"(it continues from {run_dir / 'checkpoints'})."
        )
    return result
