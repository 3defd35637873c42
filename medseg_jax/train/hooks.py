"""What the training loop does besides stepping, each at its own interval.

- :class:`StopRequests`: SIGTERM / SIGINT become a stop request that every process agrees on; a second
  signal, or a stop that cannot finish within ``train.stop_timeout_seconds`` (a lost peer), exits.
- :class:`MetricsLog`: reads the steps' metrics in one transfer after each log step, never the step
  just launched (the host never waits for it), checks every step is finite, and writes
  ``metrics.jsonl``, TensorBoard events and the validation lines of ``log.txt``.
- :class:`Validator`: whole-case (sliding window) or patch validation, correct when arrays span
  processes.
- :class:`Checkpointer`: Orbax saves of the state, the loader position and the run's metadata.

Only process 0 writes files; every process runs the same hooks at the same steps (they contain
collectives).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np

from medseg_jax import checkpoint, parallel
from medseg_jax.errors import TrainingError
from medseg_jax.metrics.overlap import binary_tp_fp_fn, dice_iou_from_counts

PSEUDO_DICE_MOMENTUM = 0.9  # nnU-Net's EMA of the mean foreground Dice across validations
VALIDATION_SEED = 12345  # validation draws the same patches every time, so values are comparable
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
VALIDATION_LABELS = {"sliding_window": "validation Dice (whole cases)", "patches": "validation Dice (patches)"}


class StopRequests:
    """A stop request from SIGTERM / SIGINT, agreed across processes.

    Python runs signal handlers only between bytecodes of the main thread, which may sit for minutes
    in a collective whose peer is gone. So the signal is also written to a socket (``set_wakeup_fd``)
    that a watchdog thread reads: the first signal requests a stop, a second one exits at once, and a
    requested stop that has not finished after ``timeout_seconds`` exits with an error. Outside the
    main thread (no signals can be installed there) it never requests a stop.
    """

    def __init__(self, timeout_seconds: float, log=lambda message: None):
        self.timeout_seconds, self.log = float(timeout_seconds), log
        self.event = threading.Event()
        self.requested_at: float | None = None
        self._previous: dict = {}
        self._sockets: tuple[socket.socket, socket.socket] | None = None
        self._done = threading.Event()
        self._previous_wakeup = -1

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is not threading.main_thread():
            return self
        receiver, sender = socket.socketpair()
        sender.setblocking(False)
        self._sockets = (receiver, sender)
        self._previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        for sig in STOP_SIGNALS:
            signal.signal(sig, lambda signum, frame: self._request())
        self._previous_wakeup = signal.set_wakeup_fd(sender.fileno(), warn_on_full_buffer=False)
        threading.Thread(target=self._watch, name="medseg-stop-watchdog", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        if self._sockets is None:
            return
        signal.set_wakeup_fd(self._previous_wakeup)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        for sock in self._sockets:
            sock.close()

    def _request(self) -> None:
        if not self.event.is_set():
            self.requested_at = time.monotonic()
            self.event.set()

    def _watch(self) -> None:
        assert self._sockets is not None
        receiver = self._sockets[0]
        receiver.settimeout(1.0)
        received = 0
        while not self._done.is_set():
            try:
                data = receiver.recv(64)
            except TimeoutError:
                data = b""
            except OSError:  # closed on exit
                return
            received += sum(1 for byte in data if byte in {int(s) for s in STOP_SIGNALS})
            if received >= 1:
                self._request()
            if received >= 2:
                self._exit(143, "a second stop signal: exiting now, without saving")
            if self.requested_at is not None and time.monotonic() - self.requested_at > self.timeout_seconds:
                self._exit(
                    1,
                    f"the stop requested {self.timeout_seconds:.0f} s ago has not finished (is a peer process "
                    "gone?); exiting without saving. The last completed checkpoint is intact",
                )

    def _exit(self, status: int, message: str) -> None:
        if self._done.is_set():
            return
        print(f"error: {message}", file=sys.stderr, flush=True)
        os._exit(status)

    def agreed(self, step: int, every: int) -> bool:
        """Whether every process stops after ``step``. On one process: as soon as a signal came. On
        several: decided together every ``every`` steps (a small all-gather), so all save the same step."""
        if jax.process_count() == 1:
            return self.event.is_set()
        if step % every:
            return False
        return parallel.any_process(self.event.is_set())


class MetricsLog:
    """Training metrics read late, and everything written about them.

    ``push(step, metrics)`` hands over the device metrics of the step just launched; the pending ones
    before it are read together once a log step is among them (so the host transfers every
    ``train.log_every`` steps and never waits for the newest step); ``flush()`` reads all. Every step's
    finiteness is still checked: a non-finite loss stops the run naming its step
    (``train.nan_policy: stop``; checkpoints are only written after a flush, so never of such a state)
    or is reported and skipped (``skip``).
    """

    def __init__(self, run_dir: Path, config, plan: dict, entries: list[dict], start: int, bar, log, main: bool):
        self.run_dir, self.config, self.entries, self.bar, self.log, self.main = (
            run_dir,
            config,
            entries,
            bar,
            log,
            main,
        )
        self.steps, self.start = config.train.steps, start
        self.class_names = {int(v): k for k, v in plan.get("labels", {}).items()}
        self.pending: list[tuple[int, dict]] = []
        self.started = time.perf_counter()
        self.last_log = (start, self.started)
        self.writer = None
        if main:
            from tensorboardX import SummaryWriter

            # purge_step drops events logged after the checkpoint a resumed run restarts from
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start if start else None)

    def push(self, step: int, device_metrics: dict) -> None:
        """Keep the metrics of the step just launched; once the step before it was a log step, read
        everything before the newest in one transfer (the newest step may still be running)."""
        self.pending.append((step, device_metrics))
        if len(self.pending) > 1 and self.is_log_step(self.pending[-2][0]):
            self._consume(self.pending[:-1])
            self.pending = self.pending[-1:]

    def flush(self) -> None:
        """Read every pending step's metrics (before a validation, a checkpoint or the end)."""
        if self.pending:
            pending, self.pending = self.pending, []
            self._consume(pending)

    def is_log_step(self, done: int) -> bool:
        return done % self.config.train.log_every == 0 or done == self.steps

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def _consume(self, pending: list[tuple[int, dict]]) -> None:
        for done, metrics in zip([step for step, _ in pending], jax.device_get([m for _, m in pending])):
            self._record(done, metrics)

    def _record(self, done: int, metrics: dict) -> None:
        if not bool(metrics["finite"]):
            if self.config.train.nan_policy == "stop":
                raise TrainingError(
                    f"non-finite loss ({float(metrics['loss'])}) at step {done - 1}; stopped without saving, the "
                    f"last good checkpoint in {self.run_dir / 'checkpoints'} is intact. Lower train.learning_rate, "
                    "check the input intensities, or set train.nan_policy=skip"
                )
            self.log(f"warning: non-finite loss at step {done - 1}; update skipped")
        self.bar.update(done - self.bar.n)
        self.bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", lr=f"{float(metrics['learning_rate']):.2e}")
        if not self.is_log_step(done):
            return
        now = time.perf_counter()
        seconds_per_step = (now - self.last_log[1]) / max(done - self.last_log[0], 1)
        self.last_log = (done, now)
        entry = {
            "step": done,
            "loss": float(metrics["loss"]),
            "learning_rate": float(metrics["learning_rate"]),
            "grad_norm": float(metrics["grad_norm"]),
            "seconds": round(now - self.started, 3),
        }
        self.append(entry)
        self.scalars(done, {"train/" + k: v for k, v in entry.items() if k not in ("step", "seconds")})
        self.scalars(done, {"train/seconds_per_step": seconds_per_step})

    def append(self, entry: dict) -> None:
        self.entries.append(entry)
        if self.main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")

    def scalars(self, step: int, values: dict) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                if value is not None:
                    self.writer.add_scalar(tag, value, step)

    def validation(self, done: int, result: dict, pseudo_dice: float) -> None:
        """Record one validation: metrics.jsonl, TensorBoard and a line in the console and ``log.txt``."""
        self.append({"step": done, **result, "pseudo_dice": pseudo_dice})
        per_class = dict(enumerate(result["val_dice_per_class"]))
        self.scalars(done, {f"val/dice/{self.class_names.get(k, k)}": v for k, v in per_class.items() if k})
        self.scalars(done, {"val/pseudo_dice": pseudo_dice, "val/mean_dice": result["val_dice"]})
        elapsed = self.seconds()
        rate = (done - self.start) / elapsed if elapsed > 0 else 0.0
        eta = datetime.timedelta(seconds=round((self.steps - done) / rate)) if rate > 0 else "?"
        dice = " ".join(
            f"{self.class_names.get(k, k)} {'-' if v is None else f'{v:.3f}'}" for k, v in per_class.items() if k
        )
        self.line(
            f"step {done}/{self.steps}  val Dice {dice}  pseudo-Dice {pseudo_dice:.3f}  {rate:.2f} steps/s  ETA {eta}"
        )

    def line(self, text: str) -> None:
        """A line for people: the console (``log``) and, from process 0, ``RUN/log.txt``."""
        self.log(text)
        if self.main:
            with open(self.run_dir / "log.txt", "a") as f:
                f.write(f"{datetime.datetime.now().isoformat(timespec='seconds')}  {text}\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def pseudo_dice_update(previous: float | None, val_dice: float) -> float:
    """nnU-Net's pseudo-Dice: an exponential moving average of the mean foreground Dice over validations."""
    if previous is None:
        return val_dice
    return PSEUDO_DICE_MOMENTUM * previous + (1 - PSEUDO_DICE_MOMENTUM) * val_dice


def dice_summary(totals: np.ndarray) -> dict:
    """Per-class Dice from summed ``(tp, fp, fn)`` counts (None where a class is absent from both) and
    their mean over the foreground classes (0 when none is present): one validation's result."""
    dice = dice_iou_from_counts(*totals)[0]
    return {
        "val_dice_per_class": [None if np.isnan(d) else float(d) for d in dice],
        "val_dice": float(np.nanmean(dice[1:])) if np.any(~np.isnan(dice[1:])) else 0.0,
    }


class Validator:
    """Validation of the current parameters on the fold's validation cases.

    ``sliding_window``: each process predicts its share of the cases (every ``process_count``-th) on
    its own devices with a local copy of the parameters, so nothing reads arrays another process
    holds; the per-class counts (int64) are summed over the processes. ``patches``: the eval step on
    fixed validation batches drawn like training batches; its counts are summed on the device.
    """

    def __init__(self, model, plan: dict, config, store, case_ids, mesh, eval_fn, batch_shardings, make_batches):
        self.model, self.plan, self.config, self.store, self.case_ids, self.mesh = (
            model,
            plan,
            config,
            store,
            list(case_ids),
            mesh,
        )
        self.eval_fn, self.batch_shardings, self.make_batches = eval_fn, batch_shardings, make_batches

    def __call__(self, params) -> dict:
        if self.config.train.val_mode == "sliding_window":
            return self.whole_cases(params)
        return self.patches(params)

    def whole_cases(self, params) -> dict:
        import dataclasses

        from medseg_jax.inference.predict import Predictor

        inference = dataclasses.replace(self.config.inference, mirror_axes=())
        mesh = parallel.local_mesh() if jax.process_count() > 1 else self.mesh
        predictor = Predictor(
            self.model, parallel.host_local_tree(params, mesh), self.plan, inference, accumulate="host", mesh=mesh
        )
        num_classes = int(self.plan["num_classes"])
        totals = np.zeros((3, num_classes), dtype=np.int64)
        for case_id in self.case_ids[jax.process_index() :: jax.process_count()]:
            image, label = self.store.read_case(case_id)
            prediction = np.argmax(predictor.probabilities(image), axis=0)
            for k in range(num_classes):
                totals[:, k] += binary_tp_fp_fn(prediction == k, label == k)
        return dice_summary(parallel.sum_over_processes(totals))

    def patches(self, params) -> dict:
        totals, losses = np.zeros(0, dtype=np.int64), []
        for local in self.make_batches():
            out = jax.device_get(self.eval_fn(params, parallel.global_batch(local, self.batch_shardings)))
            counts = np.stack([out["tp"], out["fp"], out["fn"]]).astype(np.int64)
            totals = counts if totals.size == 0 else totals + counts
            losses.append(float(out["loss"]))
        return {"val_loss": float(np.mean(losses)), **dice_summary(totals)}


class Checkpointer:
    """Saves at ``train.checkpoint_every``, at validations (with the pseudo-Dice, for the best-kept
    checkpoint), on a stop request and at the end; never the same step twice."""

    def __init__(self, manager, meta, last_saved: int | None):
        self.manager, self.meta, self.last_saved = manager, meta, last_saved

    def save(self, step: int, state, data_state: dict, val_dice: float | None = None) -> None:
        if step != self.last_saved:
            checkpoint.save(self.manager, step, state, data_state, self.meta(), val_dice=val_dice)
            self.last_saved = step

    def finish(self) -> None:
        """Wait for the asynchronous saves (their errors propagate) and release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()

    def abandon(self) -> None:
        """On the way out of a failed run: let pending saves finish without masking the run's error."""
        with contextlib.suppress(Exception):
            self.manager.wait_until_finished()
        with contextlib.suppress(Exception):
            self.manager.close()
