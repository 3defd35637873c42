import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medseg_jax.kernels import autotune
from medseg_jax.kernels.autotune import OpCase, autotune_case, default_candidates, load_cache
from medseg_jax.kernels.select import (
    default_implementation,
    pallas_interpreted,
    preferences,
    resolve,
    unavailable_reason,
)
from medseg_jax.kernels.timing import time_round_robin
from medseg_jax.kernels.upsample import UPSAMPLE_IMPLEMENTATIONS
from medseg_jax.models import UNet

CASE = OpCase("conv", (1, 4, 6, 6, 2), (3, 3, 3, 2, 3), (1, 1, 1))


def test_resolve_auto_per_backend_and_explicit_names():
    onednn_here = unavailable_reason("conv", "onednn", "cpu") is None
    assert resolve("conv", "auto", "cpu") == ("onednn" if onednn_here else "depth_stack")
    assert resolve("conv", "auto", "cuda") == "xla"  # CUDA and ROCm are "gpu"
    assert resolve("upsample", "auto", "tpu") == "matmul"
    assert resolve("upsample", "auto", "some-new-backend") == "matmul"
    assert resolve("upsample", "conv_transpose", "cpu") == "conv_transpose"
    assert default_implementation("conv", "cpu") == resolve("conv", "auto", "cpu")
    with pytest.raises(ValueError, match="'auto' or one of"):
        resolve("conv", "fft", "cpu")
    with pytest.raises(ValueError, match="unknown operation"):
        resolve("pool", "auto")


def test_auto_preferences_follow_the_jax_line():
    # Measured lines are used as they are; others take the nearest measured line's choice.
    assert preferences("conv", "cpu", "0.10.2") == ("onednn", "depth_stack")
    assert preferences("conv", "cpu", "0.12.0.1") == ("onednn", "depth_stack")
    assert preferences("conv", "cpu", "0.13.1") == preferences("conv", "cpu", "0.12.0")
    assert preferences("conv", "cpu", "0.9.0") == preferences("conv", "cpu", "0.10.0")
    assert preferences("conv", "rocm") == ("xla",)
    assert preferences("upsample", "some-new-backend") == ("matmul",)


def test_auto_skips_the_onednn_convolution_where_it_cannot_run(monkeypatch):
    from medseg_jax.kernels import onednn

    monkeypatch.setattr(onednn, "unavailable_reason", lambda: "oneDNN is not installed")
    assert unavailable_reason("conv", "onednn", "cpu") == "oneDNN is not installed"
    assert resolve("conv", "auto", "cpu") == "depth_stack"
    assert "onednn" not in default_candidates("conv")
    assert unavailable_reason("conv", "onednn", "tpu") == "the onednn convolution runs on CPU only"


def test_unet_gives_the_same_logits_whatever_the_implementations():
    kwargs = dict(num_classes=2, spatial_dims=3, n_stages=2, features=(2, 4))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 4, 4, 1)), jnp.float32)
    params = UNet(**kwargs).init(jax.random.key(0), x)
    auto = UNet(**kwargs).apply(params, x)
    plain = UNet(**kwargs, conv_implementation="xla", upsample_implementation="conv_transpose").apply(params, x)
    np.testing.assert_allclose(np.asarray(auto), np.asarray(plain), rtol=1e-4, atol=1e-4)


def test_autotune_times_caches_and_reuses(tmp_path):
    cache = tmp_path / "autotune.json"
    best, seconds = autotune_case(CASE, ["xla", "depth_sum"], cache=cache, runs=1)
    assert best in ("xla", "depth_sum") and set(seconds) == {"xla", "depth_sum"}
    assert all(s > 0 for s in seconds.values())
    entries = json.loads(cache.read_text())["entries"]
    key = CASE.key(autotune.device_id())
    assert entries[key]["seconds"] == seconds
    # A cached entry is used as it is (no new timing): doctor it so that the slower-looking one wins.
    entries[key]["seconds"] = {"xla": 1.0, "depth_sum": 9.0}
    autotune.save_cache(cache, entries)
    assert autotune_case(CASE, ["xla", "depth_sum"], cache=cache)[0] == "xla"
    entries[key]["seconds"] = {"xla": 9.0, "depth_sum": 1.0}
    autotune.save_cache(cache, entries)
    assert autotune_case(CASE, ["xla", "depth_sum"], cache=cache)[0] == "depth_sum"
    # refresh=True measures again, replacing the doctored figures
    _, fresh = autotune_case(CASE, ["xla", "depth_sum"], cache=cache, runs=1, refresh=True)
    assert fresh["xla"] < 9.0 and fresh["depth_sum"] < 9.0


def test_cache_location_and_unreadable_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSEG_JAX_CACHE", str(tmp_path / "c"))
    assert autotune.cache_path() == tmp_path / "c" / "autotune.json"
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert load_cache(broken) == {}
    broken.write_text(json.dumps({"version": 999, "entries": {"k": 1}}))
    assert load_cache(broken) == {}
    assert load_cache(tmp_path / "missing.json") == {}


def test_pallas_is_never_a_default_candidate_where_it_runs_interpreted():
    assert pallas_interpreted("cpu") and not pallas_interpreted("cuda") and not pallas_interpreted("tpu")
    names = default_candidates("upsample")
    assert {"matmul", "conv_transpose"} <= set(names)
    if "pallas" in UPSAMPLE_IMPLEMENTATIONS:
        assert ("pallas" in names) == (not pallas_interpreted())


def test_round_robin_timer_interleaves_members_and_warms_up():
    calls = []
    samples = time_round_robin({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, runs=3, warmup=2)
    assert calls == ["a", "b"] * 5  # two untimed rounds, then three timed ones, one call of each per round
    assert {name: len(times) for name, times in samples.items()} == {"a": 3, "b": 3}
    assert all(t >= 0 for times in samples.values() for t in times)
    assert len(time_round_robin({"a": lambda: None}, runs=0, warmup=0)["a"]) == 1  # at least one run


def test_compute_dtype_auto_is_bfloat16_only_on_cpus_that_multiply_it_with_onednn():
    from medseg_jax.config import load_config
    from medseg_jax.kernels.select import cpu_has_bfloat16, default_compute_dtype
    from medseg_jax.models.factory import build_unet

    assert cpu_has_bfloat16("processor: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n")
    assert cpu_has_bfloat16("flags : fpu amx_bf16")
    assert not cpu_has_bfloat16("flags : fpu sse avx2 avx512f\n")
    assert not cpu_has_bfloat16("")
    assert default_compute_dtype("tpu") == default_compute_dtype("cuda") == "float32"
    native = cpu_has_bfloat16() and unavailable_reason("conv", "onednn", "cpu") is None
    assert default_compute_dtype("cpu") == ("bfloat16" if native else "float32")
    sizes = ["model.spatial_dims=2", "model.num_classes=2", "model.n_stages=2"]
    model = build_unet(load_config(None, [*sizes, "model.dtype=auto"]).model)
    assert jnp.dtype(model.dtype) == jnp.dtype(default_compute_dtype()) and jnp.dtype(model.param_dtype) == jnp.float32


def test_2d_candidates_do_not_time_one_program_three_times():
    # Below 3 spatial axes the depth_* convolutions run xla: only distinct programs are candidates.
    assert not [n for n in default_candidates("conv", 2) if n.startswith("depth_")]
    assert "xla" in default_candidates("conv", 2)
    assert {"depth_sum", "depth_stack"} <= set(default_candidates("conv", 3))
    assert default_candidates("conv") == default_candidates("conv", 3)
