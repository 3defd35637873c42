"""Prediction over 8 fake CPU devices, in a subprocess so that XLA_FLAGS is set before JAX starts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).with_name("predict_devices_script.py")


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_all_local_devices_by_default_and_one_device_runs_unsharded(results):
    assert results["mesh_sizes"] == {"1": None, "2": 2, "None": 8}


@pytest.mark.parametrize("accumulate", ["device", "host"])
@pytest.mark.parametrize("devices", ["2", "None"])
def test_labels_on_several_devices_equal_one_device(results, accumulate, devices):
    one = np.asarray(results["labels"][f"{accumulate} 1"])
    assert len(np.unique(one)) > 1  # a real comparison, not two empty masks
    np.testing.assert_array_equal(np.asarray(results["labels"][f"{accumulate} {devices}"]), one)


def test_a_device_count_this_process_does_not_have_is_refused(results):
    assert len(results["errors"]) == 3
    assert all("8 local cpu device(s); choose 1..8" in message for message in results["errors"])


def test_predict_refuses_more_devices_than_the_process_has_before_reading_anything(tmp_path, capsys):
    import jax

    from medseg_jax.cli import main

    too_many = str(jax.local_device_count() + 1)
    args = ["predict", "--model", str(tmp_path / "run"), "-i", str(tmp_path / "scan.nii.gz")]
    assert main([*args, "-o", str(tmp_path / "out"), "--devices", too_many]) == 2
    assert f"devices={too_many}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
