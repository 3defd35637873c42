"""Importing the model is light and has no side effects: checked in a fresh interpreter, because
``sys.modules`` and the umask of the test process have been touched by every other test."""

import os
import subprocess
import sys
import textwrap

import pytest

from medseg_jax.kernels.upsample import UPSAMPLE_IMPLEMENTATIONS

# Modules `from medseg_jax.models import UNet` must not load: training, data, CLI and file-writing code,
# the checkpoint / data-loading / storage libraries, Pallas (experimental, heavy), timing and benchmarking.
FORBIDDEN = (
    "medseg_jax.train",
    "medseg_jax.data",
    "medseg_jax.cli",
    "medseg_jax.config",
    "medseg_jax.bench",
    "medseg_jax.atomic",
    "medseg_jax.kernels.autotune",
    "medseg_jax.kernels.timing",
    "medseg_jax.kernels.upsample_pallas",
    "jax.experimental.pallas",
    "optax",
    "orbax",
    "grain",
    "tensorstore",
)

MODEL_USER = textwrap.dedent("""
    import os, sys
    os.umask(0o027)
    from medseg_jax.models import UNet
    import jax, jax.numpy as jnp

    model = UNet(num_classes=2, spatial_dims=2, n_stages=2, features=(2, 4))
    x = jnp.ones((1, 8, 8, 1))
    params = model.init(jax.random.key(0), x)
    assert model.apply(params, x).shape == (1, 8, 8, 2)

    forbidden = {forbidden!r}
    loaded = sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in forbidden))
    assert not loaded, loaded
    mask = os.umask(0o027)
    assert mask == 0o027, oct(mask)
    print("isolated")
    if {try_pallas}:  # the pallas implementation is still there: chosen, it loads Pallas on first use
        pallas = UNet(num_classes=2, spatial_dims=2, n_stages=2, features=(2, 4), upsample_implementation="pallas")
        y = pallas.apply(params, x)
        assert abs(float((y - model.apply(params, x)).max())) < 1e-4
        assert "jax.experimental.pallas" in sys.modules
        print("pallas on demand")
""")


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


def test_model_import_and_use_load_nothing_heavy_and_keep_the_umask():
    try_pallas = "pallas" in UPSAMPLE_IMPLEMENTATIONS
    result = run_python(MODEL_USER.format(forbidden=FORBIDDEN, try_pallas=try_pallas))
    assert result.returncode == 0, result.stderr
    assert "isolated" in result.stdout
    assert ("pallas on demand" in result.stdout) == try_pallas


@pytest.mark.parametrize(
    "module",
    [
        "medseg_jax",
        "medseg_jax.models",
        "medseg_jax.kernels",
        "medseg_jax.configs",
        "medseg_jax.bench",
        "medseg_jax.bench.command",
        "medseg_jax.cli",
    ],
)
def test_importing_changes_no_process_state(module):
    code = (
        f"import os; os.umask(0o027); import {module}; mask = os.umask(0o027); "
        "assert mask == 0o027, oct(mask); print('kept')"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert "kept" in result.stdout


def test_benchmark_help_imports_no_jax():
    code = (
        "import sys\nfrom medseg_jax.cli import build_parser\nbuild_parser()\n"
        "assert 'jax' not in sys.modules, 'jax loaded'\nprint('light')"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert "light" in result.stdout
