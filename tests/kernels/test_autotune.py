import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medseg_jax.kernels import autotune
from medseg_jax.kernels.autotune import OpCase, autotune_case, autotune_model, layer_cases, load_cache
from medseg_jax.kernels.select import BACKEND_DEFAULTS, default_implementation, resolve
from medseg_jax.models import UNet

CASE = OpCase("conv", (1, 4, 6, 6, 2), (3, 3, 3, 2, 3), (1, 1, 1))


def test_resolve_auto_per_backend_and_explicit_names():
    assert resolve("conv", "auto", "cpu") == "depth_stack"
    assert resolve("conv", "auto", "cuda") == "xla"  # CUDA and ROCm are "gpu"
    assert resolve("upsample", "auto", "tpu") == "matmul"
    assert resolve("upsample", "auto", "some-new-backend") == "matmul"
    assert resolve("upsample", "conv_transpose", "cpu") == "conv_transpose"
    assert default_implementation("conv", "cpu") == BACKEND_DEFAULTS["cpu"]["conv"]
    with pytest.raises(ValueError, match="'auto' or one of"):
        resolve("conv", "fft", "cpu")
    with pytest.raises(ValueError, match="unknown operation"):
        resolve("pool", "auto")


def test_unet_gives_the_same_logits_whatever_the_implementations():
    kwargs = dict(num_classes=2, spatial_dims=3, n_stages=2, features=(2, 4))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 4, 4, 1)), jnp.float32)
    params = UNet(**kwargs).init(jax.random.key(0), x)
    auto = UNet(**kwargs).apply(params, x)
    plain = UNet(**kwargs, conv_implementation="xla", upsample_implementation="conv_transpose").apply(params, x)
    np.testing.assert_allclose(np.asarray(auto), np.asarray(plain), rtol=1e-4, atol=1e-4)


def test_layer_cases_lists_every_conv_and_upsampling():
    model = UNet(num_classes=2, spatial_dims=3, n_stages=3, features=(4, 8, 8), strides=(1, (1, 2, 2), 2))
    cases = layer_cases(model, (1, 4, 8, 8, 1))
    convs = [c for c in cases if c.operation == "conv"]
    ups = [c for c in cases if c.operation == "upsample"]
    assert len(convs) == 3 * 2 + 2 * 2 and len(ups) == 2
    assert convs[0] == OpCase("conv", (1, 4, 8, 8, 1), (3, 3, 3, 1, 4), (1, 1, 1))
    assert convs[2] == OpCase("conv", (1, 4, 8, 8, 4), (3, 3, 3, 4, 8), (1, 2, 2))  # stage 1's entry conv
    # the last upsampling undoes stage 1's (1, 2, 2) stride: (1, 4, 4, 4, 8) -> 4 features
    assert ups[-1] == OpCase("upsample", (1, 4, 4, 4, 8), (1, 2, 2, 8, 4), (1, 2, 2))


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


def test_autotune_model_picks_from_cached_timings(tmp_path):
    model = UNet(num_classes=2, spatial_dims=3, n_stages=2, features=(2, 4), upsample_implementation="matmul")
    shape = (1, 4, 4, 4, 1)
    cache = tmp_path / "autotune.json"
    device = autotune.device_id()
    # Seed the cache: depth_stack fastest for every conv layer, so no timing is needed.
    entries = {c.key(device): {"seconds": {"xla": 3.0, "depth_sum": 2.0, "depth_stack": 1.0}}
               for c in layer_cases(model, shape)}
    autotune.save_cache(cache, entries)
    tuned, report = autotune_model(model, shape, cache=cache,
                                   candidates={"conv": ["xla", "depth_sum", "depth_stack"]})
    assert tuned.conv_implementation == "depth_stack"
    assert tuned.upsample_implementation == "matmul"  # explicit choices are kept, not tuned
    assert "upsample" not in report
    assert report["conv"]["cases"] == 2 * 2 + 2  # two encoder stages + one decoder stage, two convs each
    assert report["conv"]["total_seconds"]["depth_stack"] == pytest.approx(report["conv"]["cases"] * 1.0)
