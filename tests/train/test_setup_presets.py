"""A ResEnc preset's plan decides the network `medseg-jax train` builds: resolve_run -> build_unet gives
nnU-Net's ResidualEncoderUNet without model fields set by hand; a default plan leaves the network to the config."""

import jax
import jax.numpy as jnp
import pytest

from medseg_jax.config import load_config
from medseg_jax.data.plan import make_plan
from medseg_jax.errors import ConfigError
from medseg_jax.models.factory import build_unet
from medseg_jax.models.unet import count_parameters
from medseg_jax.train.setup import resolve_run

FINGERPRINT = {
    "dataset_name": "Dataset001_Test",
    "channel_names": ["CT"],
    "labels": {"background": 0, "liver": 1, "tumour": 2},
    "spacings": [[1.0, 1.0, 1.0]] * 2,
    "shapes_after_crop": [[16, 16, 16]] * 2,
    "foreground_intensity_properties_per_channel": {
        "0": {"mean": 50.0, "std": 20.0, "percentile_00_5": -80.0, "percentile_99_5": 250.0}
    },
}
# 16^3 -> 8^3 -> 4^3: three stages, features 32, 64, 128, ResEnc blocks 1, 3, 4, one conv per decoder stage
RESENC_PLAN = make_plan(FINGERPRINT, preset="resenc-m")


def resolve(overrides=(), plan=RESENC_PLAN):
    return resolve_run(load_config(None, ["augment.mode=none", *overrides]), plan, device_count=1, process_count=1)


def nnunet_resenc_parameters(features, blocks, decoder_convs, in_channels, classes, kernel=27):
    """Parameters of nnU-Net's ResidualEncoderUNet (3D, kernel 3, stride 2, conv bias, affine instance norm)."""
    conv = lambda cin, cout: cin * cout * kernel + cout + 2 * cout  # conv + bias + norm scale and shift
    total = conv(in_channels, features[0])  # stem
    previous = features[0]
    for f, n in zip(features, blocks):
        for b in range(n):
            cin = previous if b == 0 else f
            total += conv(cin, f) + conv(f, f) + (cin * f + 2 * f if cin != f else 0)  # 1x1 projection, no bias
        previous = f
    for d, convs in enumerate(decoder_convs):
        t = len(features) - 2 - d
        total += features[t + 1] * features[t] * 8 + features[t]  # transposed conv 2x2x2
        total += conv(2 * features[t], features[t]) + (convs - 1) * conv(features[t], features[t])
        total += features[t] * classes + classes  # the (deep supervision) head
    return total


def test_a_resenc_plan_builds_nnunets_residual_encoder_unet():
    run = resolve()
    model = run.model
    assert model.encoder == "residual" and model.n_blocks_per_stage == (1, 3, 4)
    assert model.n_conv_per_stage_decoder == (1, 1) and model.features == (32, 64, 128)
    network = build_unet(model)
    shapes = jax.eval_shape(network.init, jax.random.key(0), jnp.zeros((1, *run.patch_size, 1)))["params"]
    blocks = {s: sum(name.startswith(f"encoder_{s}_block_") for name in shapes) for s in range(3)}
    assert blocks == {0: 1, 1: 3, 2: 4} and "stem" in shapes
    assert all(sorted(shapes[f"decoder_{d}"]) == ["conv_block_0"] for d in range(2))
    assert count_parameters(shapes) == nnunet_resenc_parameters((32, 64, 128), (1, 3, 4), (1, 1), 1, 3)


def test_config_values_that_disagree_with_the_presets_network_are_refused_naming_both():
    cases = [
        ("model.encoder=plain", r"model\.encoder: the config says 'plain' but the plan says 'residual'"),
        ("model.n_conv_per_stage_decoder=2", r"model\.n_conv_per_stage_decoder: the config says 2 .* \[1, 1\]"),
        ("model.n_blocks_per_stage=[1, 2, 2]", r"model\.n_blocks_per_stage: .* \[1, 2, 2\] .* \[1, 3, 4\]"),
    ]
    for override, message in cases:
        with pytest.raises(ConfigError, match=message):
            resolve([override])
    same = resolve(["model.encoder=residual", "model.n_conv_per_stage_decoder=1", "model.n_blocks_per_stage=[1, 3, 4]"])
    assert same.model.n_conv_per_stage_decoder == (1, 1) and same.model.n_blocks_per_stage == (1, 3, 4)


def test_a_default_plan_leaves_the_network_to_the_config():
    plan = make_plan(FINGERPRINT)
    assert not {"encoder", "n_blocks_per_stage", "n_conv_per_stage_decoder"} & set(plan)
    assert plan["preset"] == "default" and plan["configuration"] == "3d_fullres"
    model = resolve(plan=plan).model
    assert model.encoder == "plain" and model.n_conv_per_stage_decoder == 2
    residual = resolve(["model.encoder=residual", "model.n_conv_per_stage_decoder=1"], plan=plan).model
    assert residual.encoder == "residual" and residual.n_blocks_per_stage == (1, 3, 4)
