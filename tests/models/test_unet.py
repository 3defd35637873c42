import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medseg_jax.models import UNet, count_parameters


def init_shapes(model, shape):
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape, jnp.float32))


def test_parameter_count_matches_nnunet_3d_fullres():
    # dynamic-network-architectures 0.4.4 PlainConvUNet(1 channel, 6 stages, 32..320, kernel 3,
    # strides 1,2,2,2,2,2, 2 convs per stage, 3 classes, conv bias, deep supervision) has 31,196,399.
    model = UNet(
        num_classes=3,
        spatial_dims=3,
        n_stages=6,
        features=(32, 64, 128, 256, 320, 320),
        strides=(1, 2, 2, 2, 2, 2),
        deep_supervision=True,
    )
    assert count_parameters(init_shapes(model, (1, 32, 32, 32, 1))) == 31_196_399


def test_parameter_count_matches_nnunet_2d():
    model = UNet(num_classes=3, spatial_dims=2, n_stages=7, deep_supervision=True)
    assert model.stage_features() == (32, 64, 128, 256, 512, 512, 512)
    assert count_parameters(init_shapes(model, (1, 64, 64, 1))) == 33_473_330


def test_default_feature_rule_caps_at_320_in_3d():
    assert UNet(num_classes=2, spatial_dims=3, n_stages=7).stage_features() == (32, 64, 128, 256, 320, 320, 320)


@pytest.mark.parametrize(
    "spatial, strides, kernels",
    [
        ((48, 80), ((1, 1), (2, 2), (2, 2), (2, 2)), 3),  # odd multiples of the total stride 8
        ((8, 24, 40), ((1, 1, 1), (1, 2, 2), (2, 2, 2)), ((1, 3, 3), (1, 3, 3), (3, 3, 3))),  # thick slices
        ((12, 20, 28), ((1, 1, 1), (2, 2, 2), (2, 2, 2)), 3),
    ],
)
def test_forward_shapes_and_deep_supervision(spatial, strides, kernels):
    ndim = len(spatial)
    model = UNet(
        num_classes=4,
        spatial_dims=ndim,
        n_stages=len(strides),
        features=(4, 8, 8, 8)[: len(strides)],
        strides=strides,
        kernel_sizes=kernels,
        deep_supervision=True,
    )
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, *spatial, 2)), jnp.float32)
    params = model.init(jax.random.key(0), x)
    outputs = model.apply(params, x)
    assert len(outputs) == len(strides) - 1
    expected = np.array(spatial)
    for i, out in enumerate(outputs):  # highest resolution first, each stage divides by its stride
        assert out.shape == (2, *expected.tolist(), 4)
        assert out.dtype == jnp.float32
        expected = expected // np.array(strides[i + 1])
    single = model.clone(deep_supervision=False).apply(params, x)
    np.testing.assert_allclose(np.asarray(single), np.asarray(outputs[0]), rtol=1e-6, atol=1e-6)


def test_input_not_multiple_of_total_stride_is_a_clear_error():
    model = UNet(num_classes=2, spatial_dims=2, n_stages=3, features=(4, 8, 8))
    with pytest.raises(ValueError, match="multiple of the total stride"):
        model.init(jax.random.key(0), jnp.zeros((1, 30, 32, 1)))


def test_residual_encoder_forward_and_structure():
    model = UNet(
        num_classes=3,
        spatial_dims=3,
        n_stages=3,
        features=(4, 8, 16),
        encoder="residual",
        n_blocks_per_stage=(1, 2, 2),
        n_conv_per_stage_decoder=1,
    )
    x = jnp.ones((1, 16, 16, 16, 1))
    params = model.init(jax.random.key(0), x)
    names = set(params["params"])
    assert {"stem", "encoder_0_block_0", "encoder_1_block_1", "encoder_2_block_1"} <= names
    # the first block of a strided stage projects its skip path (channels change)
    assert "skip_projection" in params["params"]["encoder_1_block_0"]
    assert model.apply(params, x).shape == (1, 16, 16, 16, 3)


def test_bfloat16_compute_close_to_float32():
    kwargs = dict(num_classes=3, spatial_dims=2, n_stages=3, features=(8, 16, 16))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 1)), jnp.float32)
    params = UNet(**kwargs).init(jax.random.key(0), x)
    f32 = UNet(**kwargs).apply(params, x)
    bf16 = UNet(**kwargs, dtype=jnp.bfloat16).apply(params, x)
    assert bf16.dtype == jnp.float32  # logits always come back in float32
    rel = float(jnp.linalg.norm(bf16 - f32) / jnp.linalg.norm(f32))
    assert rel < 0.05, rel


def test_remat_encoder_gives_same_gradients():
    kwargs = dict(num_classes=2, spatial_dims=2, n_stages=3, features=(4, 8, 8))
    x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 16, 16, 1)), jnp.float32)
    params = UNet(**kwargs).init(jax.random.key(0), x)

    def grads(model):
        return jax.grad(lambda p: jnp.sum(model.apply(p, x) ** 2))(params)

    plain, remat = grads(UNet(**kwargs)), grads(UNet(**kwargs, remat_encoder=True))
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(remat)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_upsample_implementations_give_the_same_network():
    kwargs = dict(
        num_classes=2, spatial_dims=3, n_stages=3, features=(4, 8, 8), strides=((1, 1, 1), (1, 2, 2), (2, 2, 2))
    )
    x = jnp.asarray(np.random.default_rng(3).normal(size=(1, 8, 16, 16, 1)), jnp.float32)
    params = UNet(**kwargs).init(jax.random.key(0), x)
    a = UNet(**kwargs, upsample_implementation="matmul").apply(params, x)
    b = UNet(**kwargs, upsample_implementation="conv_transpose").apply(params, x)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
