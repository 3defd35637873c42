"""The oneDNN convolution (custom calls through jax.ffi) against XLA's: values and gradients, every
geometry the U-Net uses, both dtypes, concurrent calls, sharded operands, and its failures."""

import os
import subprocess
import sys
import textwrap
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medseg_jax.kernels import onednn
from medseg_jax.kernels.conv import conv, conv_xla
from medseg_jax.models import UNet

REASON = onednn.unavailable_reason()
needs_onednn = pytest.mark.skipif(REASON is not None, reason=f"oneDNN convolution unavailable: {REASON}")

GEOMETRIES = [
    ((2, 7, 9, 11, 3), (3, 3, 3), (1, 1, 1)),  # odd sizes, batch 2
    ((2, 7, 9, 11, 3), (3, 3, 3), (2, 2, 2)),  # stride 2 on odd sizes: the right padding shrinks
    ((3, 4, 8, 6, 5), (1, 3, 3), (1, 2, 2)),  # anisotropic: thick slices
    ((2, 4, 4, 4, 6), (1, 1, 1), (1, 1, 1)),  # the residual encoder's 1x1 projection
    ((3, 13, 10, 4), (3, 3), (2, 1)),  # 2D, mixed strides
    ((2, 17, 4), (3,), (2,)),  # 1D
]


def values_and_gradients(fn, x, kernel, bias, strides):
    def loss(x, kernel, bias):
        y = fn(x, kernel, bias, strides)
        return jnp.sum(jnp.sin(y.astype(jnp.float32))), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(x, kernel, bias)
    return (y, *grads)


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


def random_case(shape, taps, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=shape), dtype)
    kernel = jnp.asarray(rng.normal(size=(*taps, shape[-1], 6)) * 0.3, dtype)
    bias = jnp.asarray(rng.normal(size=6), jnp.float32)
    return x, kernel, bias


@needs_onednn
@pytest.mark.parametrize("shape, taps, strides", GEOMETRIES)
@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_values_and_gradients_equal_xla(shape, taps, strides, dtype, tolerance):
    x, kernel, bias = random_case(shape, taps, dtype)
    got = values_and_gradients(lambda *a: conv(*a, implementation="onednn"), x, kernel, bias, strides)
    want = values_and_gradients(conv_xla, x, kernel, bias, strides)
    for name, g, w in zip(("y", "dx", "dkernel", "dbias"), got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert relative_error(g, w) < tolerance, (name, relative_error(g, w))


@needs_onednn
def test_other_dtypes_take_the_xla_path():
    x, kernel, bias = random_case((1, 5, 6, 7, 2), (3, 3, 3), jnp.float16)
    y = conv(x, kernel, bias, (1, 1, 1), "onednn")
    assert y.dtype == jnp.float16
    assert relative_error(y, conv_xla(x, kernel, bias, (1, 1, 1))) == 0.0


@needs_onednn
def test_concurrent_calls_from_many_threads_agree_with_serial_ones():
    """XLA runs independent custom calls on its own threads; here eight Python threads run four
    different geometries at once, each many times, and every result must equal the serial one."""
    cases = [
        random_case(shape, taps, jnp.float32, seed=i) + (strides,)
        for i, (shape, taps, strides) in enumerate(GEOMETRIES[:4])
    ]
    fns = [
        jax.jit(lambda x, k, b, s=strides: jax.vjp(lambda x, k: conv(x, k, b, s, "onednn"), x, k)[0])
        for *_, strides in cases
    ]
    serial = [np.asarray(fn(x, k, b)) for fn, (x, k, b, _) in zip(fns, cases)]
    failures: list[str] = []

    def worker(index: int):
        fn, (x, k, b, _) = fns[index % 4], cases[index % 4]
        for _ in range(20):
            if not np.array_equal(np.asarray(fn(x, k, b)), serial[index % 4]):
                failures.append(f"thread {index}")
                return

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


@needs_onednn
def test_unet_trains_the_same_with_onednn_and_xla():
    kwargs = dict(num_classes=3, spatial_dims=3, n_stages=3, features=(4, 8, 8), deep_supervision=False)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 12, 16, 1)), jnp.float32)
    params = UNet(**kwargs).init(jax.random.key(0), x)

    def loss_and_grads(implementation):
        model = UNet(**kwargs, conv_implementation=implementation)
        return jax.jit(jax.value_and_grad(lambda p: jnp.mean(model.apply(p, x) ** 2)))(params)

    (loss, grads), (ref_loss, ref_grads) = loss_and_grads("onednn"), loss_and_grads("xla")
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    for g, r in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
        # A conv bias ahead of instance norm has an exactly-zero gradient: both sides give rounding noise.
        assert np.abs(np.asarray(g) - np.asarray(r)).max() <= 1e-4 * max(np.abs(np.asarray(r)).max(), 1e-3)


SHARDED_SCRIPT = textwrap.dedent(
    """
    import json, os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from medseg_jax.kernels.conv import conv, conv_xla

    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "spatial"))
    x = jax.random.normal(jax.random.key(0), (8, 8, 9, 10, 3))
    k = jax.random.normal(jax.random.key(1), (3, 3, 3, 3, 4)) * 0.2
    def loss(name):
        return lambda x, k: jnp.sum(jnp.sin(conv(x, k, None, (2, 2, 2), name)))
    want = jax.jit(jax.value_and_grad(loss("xla"), argnums=(0, 1)))(x, k)
    out = {}
    for label, spec in {"data": P("data"), "data+spatial": P("data", "spatial")}.items():
        fn = jax.jit(jax.value_and_grad(loss("onednn"), argnums=(0, 1)))
        args = jax.device_put(x, NamedSharding(mesh, spec)), jax.device_put(k, NamedSharding(mesh, P()))
        got = fn(*args)
        leaves = jax.tree_util.tree_leaves
        errors = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(leaves(got), leaves(want))]
        out[label] = {"errors": errors, "all_gather": "all-gather" in fn.lower(*args).compile().as_text()}
    print(json.dumps(out))
    """
)


@needs_onednn
def test_batch_sharded_operands_stay_sharded_and_agree():
    """On 8 devices the passes split over the batch (no gather of the activations: each device runs
    its own shard) and the weight gradient is summed across shards; a spatially sharded input is
    gathered first, and still agrees."""
    import json

    proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["data"]["all_gather"]
    for label in ("data", "data+spatial"):
        assert max(result[label]["errors"]) < 1e-3, result


def test_missing_onednn_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(
        onednn, "unavailable_reason", lambda: 'oneDNN is not installed: pip install "medseg-jax[onednn]"'
    )
    x, kernel, bias = random_case((1, 4, 4, 4, 1), (3, 3, 3), jnp.float32)
    with pytest.raises(onednn.OnednnUnavailable, match=r"medseg-jax\[onednn\]"):
        conv(x, kernel, bias, (1, 1, 1), "onednn")


def test_bad_onednn_root_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDSEG_ONEDNN_ROOT", str(tmp_path))
    with pytest.raises(onednn.OnednnUnavailable, match="MEDSEG_ONEDNN_ROOT=.*dnnl.hpp"):
        onednn.installed_prefix()


@needs_onednn
def test_failed_build_says_why_and_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDSEG_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.raises(onednn.OnednnUnavailable, match="no C\\+\\+ compiler 'no-such-compiler-here'"):
        onednn.build()
    monkeypatch.setenv("CXX", "false")  # a compiler that fails
    with pytest.raises(onednn.OnednnUnavailable, match="building the oneDNN convolution failed"):
        onednn.build()
    assert list(tmp_path.rglob("*.so")) == [] and [p for p in tmp_path.rglob("*") if p.is_file()] == []


@needs_onednn
def test_build_is_cached_per_source_and_library(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDSEG_JAX_CACHE", str(tmp_path))
    first = onednn.build()
    assert first.is_file() and first.is_relative_to(tmp_path / "onednn")
    stamp = first.stat().st_mtime_ns
    assert onednn.build() == first and first.stat().st_mtime_ns == stamp  # reused, not rebuilt


@needs_onednn
def test_auto_falls_back_with_a_warning_when_the_installed_extension_cannot_build(tmp_path):
    env = dict(os.environ, CXX="false", MEDSEG_JAX_CACHE=str(tmp_path))
    code = "from medseg_jax.kernels.select import resolve; print(resolve('conv', 'auto', 'cpu'))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "depth_stack"
    assert "oneDNN is installed but its convolution cannot be used" in proc.stderr
    assert "building the oneDNN convolution failed" in proc.stderr
