import pytest

from medseg_jax.bench.model_tuning import autotune_model, layer_cases
from medseg_jax.kernels import autotune
from medseg_jax.kernels.autotune import OpCase
from medseg_jax.models import UNet


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


def test_autotune_model_picks_from_cached_timings(tmp_path):
    model = UNet(num_classes=2, spatial_dims=3, n_stages=2, features=(2, 4), upsample_implementation="matmul")
    shape = (1, 4, 4, 4, 1)
    cache = tmp_path / "autotune.json"
    device = autotune.device_id()
    # Seed the cache: depth_stack fastest for every conv layer, so no timing is needed.
    entries = {
        c.key(device): {"seconds": {"xla": 3.0, "depth_sum": 2.0, "depth_stack": 1.0}}
        for c in layer_cases(model, shape)
    }
    autotune.save_cache(cache, entries)
    tuned, report = autotune_model(model, shape, cache=cache, candidates={"conv": ["xla", "depth_sum", "depth_stack"]})
    assert tuned.conv_implementation == "depth_stack"
    assert tuned.upsample_implementation == "matmul"  # explicit choices are kept, not tuned
    assert "upsample" not in report
    assert report["conv"]["cases"] == 2 * 2 + 2  # two encoder stages + one decoder stage, two convs each
    assert report["conv"]["total_seconds"]["depth_stack"] == pytest.approx(report["conv"]["cases"] * 1.0)
