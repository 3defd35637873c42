"""Sharded training on 8 fake CPU devices, in a subprocess so that XLA_FLAGS is set before JAX starts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("multidevice_script.py")


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mesh", ["8x1", "4x2", "2x4", "1x8"])
def test_one_step_matches_single_device(results, mesh):
    # Float tolerance: sharded reductions sum in a different order (data: the batch mean; spatial: conv
    # halos and instance-norm statistics), so results agree to float32 rounding, not bit for bit.
    got = results["meshes"][mesh]
    assert got["loss"] == pytest.approx(results["single_loss"], rel=1e-5, abs=1e-6)
    assert got["max_param_diff"] < 1e-5


def test_fsdp_shards_parameters_and_matches(results):
    assert results["fsdp"]["sharded_leaves"] > 0
    assert results["fsdp"]["loss"] == pytest.approx(results["single_loss"], rel=1e-5)
    assert results["fsdp"]["max_param_diff"] < 1e-5


@pytest.mark.parametrize("target", ["1 device", "2x4"])
def test_checkpoint_from_4x2_restores_onto_other_meshes(results, target):
    restored = results["restore"][target]
    assert restored["equal"] and restored["on_target"]
    assert restored["data_state"] == {"position": 1}
