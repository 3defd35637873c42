"""nnU-Net plans -> medseg-jax U-Net settings, and PyTorch weights -> Flax parameters."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medseg_jax.config import ModelConfig, from_dict
from medseg_jax.errors import DataError
from medseg_jax.models.blocks import Conv, Upsample
from medseg_jax.models.factory import build_unet
from medseg_jax.nnunet.architecture import architecture, configuration
from medseg_jax.nnunet.convert import _to_flax, convert_state_dict, weight_map
from medseg_jax.nnunet.importer import check_params
from tests.nnunet.model_folder import arch_kwargs, plans, state_dict

WHERE = "plans.json: configurations.3d_fullres"


def new_style(encoder="plain", dims=3, **changes):
    kwargs = arch_kwargs(dims, encoder) | changes
    patch = [16] * dims
    return plans("3d_fullres", kwargs, encoder, patch, [1.0] * dims)["configurations"]["3d_fullres"]


def test_new_and_old_style_plans_give_the_same_network():
    config = new_style("plain")
    old = {k: v for k, v in config.items() if k != "architecture"}
    old |= {
        "UNet_class_name": "PlainConvUNet",
        "UNet_base_num_features": 4,
        "unet_max_num_features": 8,
        "n_conv_per_stage_encoder": [2, 2, 2],
        "n_conv_per_stage_decoder": [1, 1],
        "conv_kernel_sizes": [[3, 3, 3]] * 3,
        "pool_op_kernel_sizes": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
    }
    new_arch, old_arch = architecture(config, WHERE), architecture(old, WHERE)
    assert new_arch == old_arch
    assert new_arch.encoder == "plain" and new_arch.features == (4, 8, 8)
    assert new_arch.strides == ((1, 1, 1), (2, 2, 2), (2, 2, 2))
    assert new_arch.model_fields()["n_conv_per_stage"] == [2, 2, 2]


def test_residual_encoder_under_its_old_module_path_and_anisotropic_kernels():
    config = new_style("residual", kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3]], strides=[[1, 1, 1], [1, 2, 2], 2])
    config["architecture"]["network_class_name"] = (
        "dynamic_network_architectures.architectures.residual_unet.ResidualEncoderUNet"
    )
    config["architecture"]["arch_kwargs"]["block"] = (
        "dynamic_network_architectures.building_blocks.residual.BasicBlockD"
    )
    arch = architecture(config, WHERE)
    assert arch.encoder == "residual" and arch.n_blocks_per_stage == (1, 2, 2)
    assert arch.kernel_sizes[0] == (1, 3, 3) and arch.strides == ((1, 1, 1), (1, 2, 2), (2, 2, 2))


def test_configurations_inherit():
    plan = {
        "configurations": {"3d_fullres": new_style(), "3d_custom": {"inherits_from": "3d_fullres", "batch_size": 7}}
    }
    resolved = configuration(plan, "3d_custom", "plans.json")
    assert (
        resolved["batch_size"] == 7 and resolved["architecture"] == plan["configurations"]["3d_fullres"]["architecture"]
    )
    with pytest.raises(DataError, match=r"configuration 'missing' not found \(configurations: 3d_custom, 3d_fullres\)"):
        configuration(plan, "missing", "plans.json")


@pytest.mark.parametrize(
    "change, field",
    [
        ({"network_class_name": "dynamic_network_architectures.architectures.unet.ResidualUNet"}, "network_class_name"),
        ({"norm_op": "torch.nn.modules.batchnorm.BatchNorm3d"}, "norm_op"),
        ({"nonlin": "torch.nn.ReLU"}, "nonlin"),
        ({"nonlin_kwargs": {"negative_slope": 0.2}}, "negative_slope"),
        ({"norm_op_kwargs": {"eps": 1e-3, "affine": True}}, "eps"),
        ({"nonlin_first": True}, "nonlin_first"),
        ({"squeeze_excitation": True}, "squeeze_excitation"),
        ({"kernel_sizes": [[2, 2, 2]] * 3}, "kernel_sizes"),
        ({"n_conv_per_stage": [2, 2]}, "n_conv_per_stage"),
    ],
)
def test_unsupported_networks_are_refused_naming_the_field(change, field):
    config = new_style("plain")
    if "network_class_name" in change:
        config["architecture"].update(change)
    else:
        config["architecture"]["arch_kwargs"].update(change)
    with pytest.raises(DataError, match=field) as excinfo:
        architecture(config, WHERE)
    assert WHERE in str(excinfo.value)


def _layer_output(module, params, x):
    return np.asarray(module.apply({"params": params}, jnp.asarray(x)))


def test_conv_layout_matches_pytorch_cross_correlation():
    """PyTorch's Conv2d (O, I, kh, kw), padding k // 2, stride 2, computed by hand, equals medseg-jax's Conv
    with the converted kernel."""
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(3, 2, 3, 1)).astype(np.float32)  # anisotropic kernel (3, 1)
    bias = rng.normal(size=3).astype(np.float32)
    x = rng.normal(size=(2, 6, 5)).astype(np.float32)  # (C, H, W)
    padded = np.pad(x, ((0, 0), (1, 1), (0, 0)))
    expected = np.zeros((3, 3, 3), np.float32)  # stride (2, 2): H 6 -> 3, W 5 -> 3
    for o in range(3):
        for i in range(3):
            for j in range(3):
                expected[o, i, j] = np.sum(weight[o] * padded[:, 2 * i : 2 * i + 3, 2 * j : 2 * j + 1]) + bias[o]
    conv = Conv(3, (3, 1), (2, 2), implementation="xla")
    out = _layer_output(conv, {"kernel": _to_flax(weight, "conv"), "bias": bias}, x.transpose(1, 2, 0)[None])
    np.testing.assert_allclose(out[0].transpose(2, 0, 1), expected, rtol=1e-5, atol=1e-5)


def test_transposed_conv_layout_matches_pytorch():
    """PyTorch's ConvTranspose2d with kernel == stride: out[o, s*y + a] = sum_i x[i, y] w[i, o, a] + b."""
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(2, 3, 2, 1)).astype(np.float32)  # (C_in, C_out, *stride), stride (2, 1)
    bias = rng.normal(size=3).astype(np.float32)
    x = rng.normal(size=(2, 3, 4)).astype(np.float32)
    expected = np.zeros((3, 6, 4), np.float32)
    for a in range(2):
        expected[:, a::2, :] = np.einsum("iyx,io->oyx", x, weight[:, :, a, 0]) + bias[:, None, None]
    for implementation in ("matmul", "conv_transpose"):
        up = Upsample(3, (2, 1), implementation)
        out = _layer_output(up, {"kernel": _to_flax(weight, "transposed"), "bias": bias}, x.transpose(1, 2, 0)[None])
        np.testing.assert_allclose(out[0].transpose(2, 0, 1), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("encoder, dims", [("plain", 3), ("residual", 3), ("plain", 2), ("residual", 2)])
def test_converted_weights_fill_exactly_the_unet_parameter_tree(encoder, dims):
    config = new_style(encoder, dims, strides=[[1] * dims, [1] * dims, [2] * dims])  # an unstrided projection too
    arch = architecture(config, WHERE)
    params = convert_state_dict(state_dict(arch, 1, 3, seed=0), arch, 1, 3, "ckpt.pth")
    fields = arch.model_fields() | {"in_channels": 1, "num_classes": 3}
    model = build_unet(from_dict(ModelConfig, fields, prefix="model"), deep_supervision=False)
    check_params(model, params, [16] * dims, 1)  # raises if a name or shape differs
    out = model.apply(jax.tree_util.tree_map(jnp.asarray, params), jnp.ones((1, *[16] * dims, 1)))
    assert out.shape == (1, *[16] * dims, 3) and bool(jnp.isfinite(out).all())
    if encoder == "residual":
        keys = [w.key for w in weight_map(arch, 1, 3) if w.key and ".skip." in w.key]
        assert "encoder.stages.1.blocks.0.skip.0.conv.weight" in keys  # stride 1, 4 -> 8 features
        assert "encoder.stages.2.blocks.0.skip.1.conv.weight" not in keys  # 8 -> 8 features: pool only


def test_a_checkpoint_that_does_not_fit_names_the_first_mismatching_tensor():
    arch = architecture(new_style("plain"), WHERE)
    weights = state_dict(arch, 1, 3, seed=0)
    wrong = copy.copy(weights)
    wrong["encoder.stages.1.0.convs.0.conv.weight"] = np.zeros((8, 4, 3, 3, 1), np.float32)
    wrong["decoder.stages.0.convs.0.conv.weight"] = np.zeros((1, 1, 1, 1, 1), np.float32)
    with pytest.raises(
        DataError, match=r"ckpt.pth: encoder.stages.1.0.convs.0.conv.weight has shape \[8, 4, 3, 3, 1\]"
    ):
        convert_state_dict(wrong, arch, 1, 3, "ckpt.pth")
    missing = copy.copy(weights)
    del missing["decoder.seg_layers.1.bias"]
    with pytest.raises(DataError, match="lacks decoder.seg_layers.1.bias"):
        convert_state_dict(missing, arch, 1, 3, "ckpt.pth")
    extra = copy.copy(weights) | {"decoder.extra_head.weight": np.zeros(3, np.float32)}
    with pytest.raises(DataError, match="holds decoder.extra_head.weight"):
        convert_state_dict(extra, arch, 1, 3, "ckpt.pth")
    nan = copy.copy(weights)
    nan["decoder.seg_layers.0.bias"] = np.full(3, np.nan, np.float32)
    with pytest.raises(DataError, match="seg_layers.0.bias holds NaN"):
        convert_state_dict(nan, arch, 1, 3, "ckpt.pth")
    # the wrapper prefixes of DistributedDataParallel and torch.compile are not mismatches
    wrapped = {"module._orig_mod." + k: v for k, v in weights.items()}
    assert convert_state_dict(wrapped, arch, 1, 3, "ckpt.pth").keys() == {"params"}
