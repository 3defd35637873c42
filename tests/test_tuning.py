"""Autotuning a run's network: the shapes timed for training and for prediction, and one choice for
every process of a cluster (end to end through `train` and `predict`: tests/train/test_loop.py)."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from medseg_jax.config import InferenceConfig, load_config
from medseg_jax.errors import ConfigError
from medseg_jax.train.setup import resolve_run
from medseg_jax.tuning import inference_input_shape, training_input_shape

PLAN_3D = {
    "dim": 3,
    "channel_names": ["CT", "PET"],
    "num_classes": 2,
    "labels": {"background": 0, "lesion": 1},
    "n_stages": 3,
    "kernel_sizes": [[3, 3, 3]] * 3,
    "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
    "patch_size": [16, 32, 24],
    "batch_size": 8,
}


def test_training_times_one_devices_rows_of_the_batch():
    run = resolve_run(load_config(None, []), PLAN_3D, device_count=4, process_count=2)
    assert training_input_shape(run) == (2, 16, 32, 24, 2)  # 8 rows over a data axis of 4
    run = resolve_run(load_config(None, ["mesh.spatial=2"]), PLAN_3D, device_count=4, process_count=1)
    assert training_input_shape(run) == (4, 16, 32, 24, 2)  # data axis 2; the whole patch is timed


def test_prediction_times_one_sliding_window_call_with_its_mirrored_copies():
    shape = lambda **settings: inference_input_shape(PLAN_3D, InferenceConfig(**settings), 2)
    assert shape() == (2 * 8, 16, 32, 24, 2)  # every axis mirrored: 2^3 copies of each window
    assert shape(mirror_axes=(0, 2), batch_size=3) == (3 * 4, 16, 32, 24, 2)
    assert shape(mirror_axes=()) == (2, 16, 32, 24, 2)
    with pytest.raises(ConfigError, match="mirror_axes"):  # refused before minutes of timing, not after
        shape(mirror_axes=(3,))
    with pytest.raises(ConfigError, match="batch_size"):  # --batch-size 0 reaches here unchecked
        shape(batch_size=0)


PROCESS = textwrap.dedent("""
    import json, sys
    from medseg_jax import parallel
    from medseg_jax.config import load_config

    process_id, port, cache = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    cluster = [
        "distributed.enabled=true",
        f"distributed.coordinator_address=127.0.0.1:{port}",
        "distributed.num_processes=2",
        f"distributed.process_id={process_id}",
        "distributed.heartbeat_timeout_seconds=10",
        "distributed.shutdown_timeout_seconds=10",
    ]
    parallel.initialize_distributed(load_config(None, cluster).distributed)
    from medseg_jax.models import UNet
    from medseg_jax.tuning import tune_model

    model = UNet(num_classes=2, spatial_dims=3, n_stages=2, features=(2, 4))
    tuned, record = tune_model(model, (1, 8, 8, 8, 1), backward=True, cache=cache)
    own = {op: min(e["total_seconds"], key=e["total_seconds"].get) for op, e in record["operations"].items()}
    print(json.dumps({"implementations": record["implementations"], "own": own,
                      "model": [tuned.conv_implementation, tuned.upsample_implementation]}))
""")


def seeded_cache(path, fastest: dict[str, str]) -> str:
    """A timing cache in which ``fastest[operation]`` wins every layer of PROCESS's network, so
    nothing is timed and each process's own choice is known in advance."""
    from medseg_jax.bench.model_tuning import layer_cases
    from medseg_jax.kernels import autotune
    from medseg_jax.models import UNet

    model = UNet(num_classes=2, spatial_dims=3, n_stages=2, features=(2, 4))
    entries = {}
    for case in layer_cases(model, (1, 8, 8, 8, 1)):
        names = autotune.default_candidates(case.operation, 3)
        seconds = {name: 1.0 if name == fastest[case.operation] else 2.0 for name in names}
        entries[case.key(autotune.device_id())] = {"seconds": seconds}
    autotune.save_cache(path, entries)
    return str(path)


def test_every_process_of_a_cluster_takes_process_0s_choice(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    caches = [
        seeded_cache(tmp_path / "cache0.json", {"conv": "xla", "upsample": "conv_transpose"}),
        seeded_cache(tmp_path / "cache1.json", {"conv": "depth_sum", "upsample": "matmul"}),
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu", MEDSEG_JAX_CACHE=str(tmp_path))
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", PROCESS, str(i), port, caches[i]],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = []
    try:
        for proc in processes:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err[-2000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in processes:
            proc.kill()
    assert results[0]["own"] == {"conv": "xla", "upsample": "conv_transpose"}
    assert results[1]["own"] == {"conv": "depth_sum", "upsample": "matmul"}  # it would choose otherwise alone
    for result in results:
        assert result["model"] == ["xla", "conv_transpose"]
        assert result["implementations"] == {"conv_implementation": "xla", "upsample_implementation": "conv_transpose"}
