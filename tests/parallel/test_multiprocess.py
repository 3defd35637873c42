"""`medseg-jax train` as two real processes of one JAX cluster on this machine (127.0.0.1, 4 emulated
CPU devices each, gloo collectives) against one process with 8 devices: the multi-host path for real.

Kept small (a 3-stage 2D network with 4 base features, a few steps); every wait is bounded.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from medseg_jax import checkpoint

pytestmark = pytest.mark.slow

STEPS = 6
OVERRIDES = [
    f"train.steps={STEPS}",
    "train.checkpoint_every=2",
    "train.val_every=3",
    "train.log_every=1",
    "model.base_features=4",
    "data.batch_size=8",
    "data.patch_size=[32, 32]",
]
TIMEOUT = 300


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    from medseg_jax.data.dataset import load_dataset
    from medseg_jax.data.fingerprint import compute_fingerprint
    from medseg_jax.data.plan import make_plan
    from medseg_jax.data.preprocess import preprocess_dataset
    from medseg_jax.data.splits import make_splits
    from medseg_jax.data.store import CaseStore
    from medseg_jax.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("multiprocess")
    dataset = load_dataset(write_synthetic_dataset(root / "raw", 5, seed=3, shape=(32, 32, 12)))
    plan = make_plan(compute_fingerprint(dataset), dim=2, voxel_budget=2 * 32 * 32, max_stages=3)
    store = CaseStore(root / "store", chunk_shape=(32, 32, 1))
    preprocess_dataset(dataset, plan, store, progress=False)
    # two folds: fold 0 validates 2-3 cases, so that both processes have a share of the final validation
    store.write_json("splits.json", make_splits(store.case_ids(), n_folds=2))
    return root / "store"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def command(store_dir, run_dir, overrides=(), fold=0):
    args = [sys.executable, "-m", "medseg_jax.cli", "train", "--data", str(store_dir), "--out", str(run_dir)]
    args += ["--fold", str(fold), "--quiet"]
    for override in [*OVERRIDES, *overrides]:
        args += ["--set", override]
    return args


def environment(devices: int) -> dict:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")


def start_cluster(store_dir, run_dir, overrides=(), fold=0) -> list[subprocess.Popen]:
    """Two processes of one cluster, 4 devices each."""
    port = free_port()
    cluster = [
        "distributed.enabled=true",
        f"distributed.coordinator_address=127.0.0.1:{port}",
        "distributed.num_processes=2",
        "distributed.heartbeat_timeout_seconds=10",
        "distributed.shutdown_timeout_seconds=10",
        "train.stop_timeout_seconds=60",
    ]
    return [
        subprocess.Popen(
            command(store_dir, run_dir, [*cluster, f"distributed.process_id={i}", *overrides], fold),
            env=environment(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]


def finish(processes) -> list[tuple[int, str, str]]:
    results = []
    for proc in processes:
        try:
            out, err = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            raise
        results.append((proc.returncode, out, err))
    return results


def final_params(run_dir):
    """Newest checkpoint's step and parameter leaves, restored in this single process on one device
    (the way `medseg-jax predict` loads a run)."""
    import jax

    from medseg_jax.inference.run_folder import load_run

    manager = checkpoint.make_manager(Path(run_dir) / "checkpoints")
    step = max(manager.all_steps())
    manager.close()
    params = load_run(run_dir)[1]
    return step, [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(params)]


def logged_steps(run_dir) -> int:
    path = Path(run_dir) / "metrics.jsonl"
    return sum('"loss"' in line for line in path.read_text().splitlines()) if path.is_file() else 0


def wait_for_steps(run_dir, processes, count: int) -> None:
    """Until ``count`` steps are logged (or a process ended, or the time is up)."""
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and logged_steps(run_dir) < count and all(p.poll() is None for p in processes):
        time.sleep(0.05)


def drain(process, timeout: float) -> tuple[str, str]:
    """Wait for ``process`` to end, reading its pipes meanwhile (a full pipe would block it)."""
    return process.communicate(timeout=timeout)


@pytest.fixture(scope="module")
def two_process_run(store_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cluster") / "run"
    results = finish(start_cluster(store_dir, run_dir))
    for code, _, err in results:
        assert code == 0, err[-4000:]
    return run_dir, results


@pytest.fixture(scope="module")
def one_process_run(store_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single") / "run"
    proc = subprocess.run(
        command(store_dir, run_dir), env=environment(8), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir


def test_two_processes_train_validate_and_match_one_process_of_eight_devices(two_process_run, one_process_run):
    run_dir, results = two_process_run
    # (6) whole-case validation ran on both processes (each its share of the cases, counts summed)
    entries = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in entries if "val_dice" in e] == [3, 6]
    assert all("val Dice" in out for _, out, _ in results)
    single = [json.loads(line) for line in (one_process_run / "metrics.jsonl").read_text().splitlines()]
    # (1) + (2): the same global batches whatever the process count, hence the same training
    assert [e["loss"] for e in entries if "loss" in e] == pytest.approx(
        [e["loss"] for e in single if "loss" in e], rel=1e-5
    )
    step, params = final_params(run_dir)
    ref_step, ref_params = final_params(one_process_run)
    assert step == ref_step == STEPS
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(params, ref_params)) < 1e-5
    val_cluster = [e["val_dice_per_class"] for e in entries if "val_dice" in e]
    val_single = [e["val_dice_per_class"] for e in single if "val_dice" in e]
    assert np.allclose(np.asarray(val_cluster, float), np.asarray(val_single, float), atol=1e-4, equal_nan=True)


def test_the_final_validation_is_shared_by_the_processes_and_equals_one_process(two_process_run, one_process_run):
    run_dir, results = two_process_run
    summary = json.loads((run_dir / "validation" / "summary.json").read_text())
    cases = sorted(summary["references"])
    assert len(cases) >= 2
    for index, (_, out, _) in enumerate(results):  # each process predicted every second case
        share = len(cases[index::2])
        assert f"process {index}: predicted {share} of its {share} validation case(s)" in out
    single = json.loads((one_process_run / "validation" / "summary.json").read_text())
    assert sorted(single["references"]) == cases and summary["step"] == single["step"] == STEPS
    for case in cases:
        cluster = np.load(run_dir / "validation" / f"{case}.npz")["probabilities"]
        alone = np.load(one_process_run / "validation" / f"{case}.npz")["probabilities"]
        np.testing.assert_allclose(cluster, alone, atol=1e-4)


def test_a_process_failing_in_the_final_validation_stops_both(store_dir, two_process_run, tmp_path):
    import shutil

    run_dir, _ = two_process_run
    store, run = tmp_path / "store", tmp_path / "run"
    shutil.copytree(store_dir, store)
    shutil.copytree(run_dir, run)
    shutil.rmtree(run / "validation")
    cases = sorted(json.loads((store / "splits.json").read_text())[0]["val"])
    shutil.rmtree(store / cases[1] / "image.zarr")  # the case process 1 predicts can no longer be read
    results = finish(start_cluster(store, run))
    assert all(code != 0 for code, _, _ in results)
    assert "another process failed in the final validation" in results[0][2]
    assert cases[1] in results[1][2]  # process 1 names what it could not read
    assert not (run / "validation" / "summary.json").exists()
    assert (run / "validation" / f"{cases[0]}.nii.gz").is_file()  # process 0's share is kept for the rerun


def test_checkpoints_are_written_once_and_restore_elsewhere(store_dir, two_process_run, tmp_path):
    import shutil

    run_dir, _ = two_process_run
    # (3) one folder per step, no leftovers of a second writer
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert all(name.isdigit() for name in names) and len(names) == len(set(names))
    # restored in a single process, on a different mesh (4 x 2), and trained further (steps raised)
    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved)
    proc = subprocess.run(
        command(store_dir, moved, [f"train.steps={STEPS + 2}", "mesh.data=4", "mesh.spatial=2"]),
        env=environment(8),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"resuming from step {STEPS}" in proc.stdout
    assert json.loads((moved / "summary.json").read_text())["step"] == STEPS + 2


def test_kill_both_then_restart_is_bit_identical(store_dir, two_process_run, tmp_path):
    # (4) SIGKILL of both processes mid-run, then the same command again
    run_dir = tmp_path / "killed"
    processes = start_cluster(store_dir, run_dir)
    wait_for_steps(run_dir, processes, 3)
    killed = all(p.poll() is None for p in processes)
    for proc in processes:
        proc.kill()
        drain(proc, 60)
    assert killed, "the run ended before it could be killed"
    for code, _, err in finish(start_cluster(store_dir, run_dir)):
        assert code == 0, err[-4000:]
    step, params = final_params(run_dir)
    ref_step, ref_params = final_params(two_process_run[0])
    assert step == ref_step == STEPS
    for a, b in zip(params, ref_params):
        np.testing.assert_array_equal(a, b)


def test_sigterm_to_one_process_stops_both_at_the_same_step(store_dir, tmp_path):
    # (5) a stop request on one host is agreed by all: both save the same step and exit 0
    run_dir = tmp_path / "term"
    processes = start_cluster(store_dir, run_dir, ["train.steps=400", "train.checkpoint_every=1000"], fold=-1)
    wait_for_steps(run_dir, processes, 3)
    processes[1].send_signal(signal.SIGTERM)
    results = finish(processes)
    for code, out, err in results:
        assert code == 0, err[-4000:]
        assert "stopped at step" in out
    stopped = {out.split("stopped at step ")[1].split()[0] for _, out, _ in results}
    assert len(stopped) == 1
    step = int(stopped.pop())
    manager = checkpoint.make_manager(run_dir / "checkpoints")
    assert manager.all_steps() == [step]
    manager.close()


def test_a_lost_peer_never_leaves_a_process_hanging(store_dir, tmp_path):
    # (5) a peer killed outright: the survivor stops by itself within the heartbeat timeout (a second
    # SIGTERM: tests/train/test_loop.py)
    run_dir = tmp_path / "lost"
    processes = start_cluster(store_dir, run_dir, ["train.steps=4000", "train.checkpoint_every=10000"], fold=-1)
    wait_for_steps(run_dir, processes, 3)
    processes[1].kill()
    started = time.time()
    drain(processes[0], 120)
    assert processes[0].returncode != 0 and time.time() - started < 120
    drain(processes[1], 60)
