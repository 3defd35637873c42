"""The stop rules of StopRequests, in a subprocess whose main thread is stuck (as in a collective whose
peer is gone): a second signal exits at once, a stop that cannot finish exits after its timeout."""

import signal
import subprocess
import sys
import time

import pytest

STUCK = """
import sys, time
from medseg_jax.train.hooks import StopRequests
with StopRequests(timeout_seconds=float(sys.argv[1])) as stops:
    print("ready", flush=True)
    deadline = time.time() + 60
    while time.time() < deadline:  # stands for a call that never returns
        time.sleep(0.01)
print("left normally", flush=True)
"""


def start(timeout_seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", STUCK, str(timeout_seconds)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_a_second_signal_exits_at_once():
    proc = start(timeout_seconds=600)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # two signals sent together may be delivered as one
    assert proc.poll() is None  # the first only asks for a stop
    started = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143 and "a second stop signal" in err and "left normally" not in out
    assert time.time() - started < 10


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_that_cannot_finish_exits_after_its_timeout(sig):
    proc = start(timeout_seconds=2)
    started = time.time()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "has not finished" in err and "left normally" not in out
    assert 2 <= time.time() - started < 30
