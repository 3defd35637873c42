import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medseg_jax.kernels.conv import CONV_IMPLEMENTATIONS, conv, conv_output_size
from medseg_jax.kernels.select import unavailable_reason
from medseg_jax.models.blocks import Conv, he_normal


def reference_conv(x, kernel, bias, strides):
    """The definition in float64: zero-pad by k // 2, then sum every tap's strided slice times its matrix."""
    spatial = len(strides)
    taps = kernel.shape[:spatial]
    padded = np.pad(x.astype(np.float64), [(0, 0)] + [(k // 2, k // 2) for k in taps] + [(0, 0)])
    out_sizes = [conv_output_size(n, k, s) for n, k, s in zip(x.shape[1:-1], taps, strides)]
    out = np.zeros((x.shape[0], *out_sizes, kernel.shape[-1]))
    for tap in itertools.product(*(range(k) for k in taps)):
        index = (slice(None),) + tuple(slice(t, t + (m - 1) * s + 1, s) for t, m, s in zip(tap, out_sizes, strides))
        out += np.einsum("n...c,co->n...o", padded[index], kernel[tap].astype(np.float64))
    return out + bias


CASES = [
    ((2, 6, 7, 5, 3), (3, 3, 3), (1, 1, 1)),  # odd sizes
    ((1, 8, 6, 6, 2), (3, 3, 3), (2, 2, 2)),  # stride 2 (the encoder's downsampling conv)
    ((1, 5, 6, 7, 2), (3, 3, 3), (2, 2, 2)),  # stride 2 on odd sizes: output (n + 1) // 2
    ((1, 4, 8, 8, 3), (1, 3, 3), (1, 2, 2)),  # anisotropic: thick slices
    ((1, 4, 4, 4, 3), (1, 1, 1), (1, 1, 1)),  # the residual encoder's 1x1 projection
    ((2, 9, 10, 3), (3, 3), (2, 2)),  # 2D: the depth_* names take the xla path
]


@pytest.mark.parametrize("shape, taps, strides", CASES)
@pytest.mark.parametrize("implementation", sorted(CONV_IMPLEMENTATIONS))
def test_matches_definition(shape, taps, strides, implementation):
    reason = unavailable_reason("conv", implementation)
    if reason is not None:
        pytest.skip(f"{implementation} cannot run here: {reason}")
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(np.float32)
    kernel = rng.normal(size=(*taps, shape[-1], 4)).astype(np.float32)
    bias = rng.normal(size=4).astype(np.float32)
    y = conv(x, kernel, bias, strides, implementation)
    expected = reference_conv(x, kernel, bias, strides)
    assert y.shape == expected.shape
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-4), (jnp.bfloat16, 4e-2)])
@pytest.mark.parametrize("implementation", ["depth_sum", "depth_stack"])
def test_gradients_agree_with_xla(implementation, dtype, tol):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(1, 6, 6, 6, 3)), dtype)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 3, 4)) * 0.3, dtype)
    bias = jnp.asarray(rng.normal(size=4), dtype)
    cotangent = jnp.asarray(rng.normal(size=(1, 3, 3, 3, 4)), dtype)

    def grads(name):
        y, vjp = jax.vjp(lambda x, k, b: conv(x, k, b, (2, 2, 2), name), x, kernel, bias)
        return (y, *vjp(cotangent))

    for got, want in zip(grads(implementation), grads("xla")):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert np.abs(got - want).max() <= tol * max(1.0, np.abs(want).max())


def test_conv_module_parameters_equal_flax_conv():
    """Same parameter names, shapes and initial values as flax.linen.Conv, so checkpoints and
    parameter counts do not depend on the implementation."""
    x = jnp.ones((1, 6, 6, 6, 2))
    ours = Conv(5, (3, 3, 3), (1, 1, 1), implementation="depth_sum").init(jax.random.key(3), x)
    flax_conv = nn.Conv(5, (3, 3, 3), padding=[(1, 1)] * 3, kernel_init=he_normal).init(jax.random.key(3), x)
    assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(flax_conv)
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(flax_conv)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    y_ours = Conv(5, (3, 3, 3), (1, 1, 1), implementation="depth_sum").apply(ours, x)
    y_flax = nn.Conv(5, (3, 3, 3), padding=[(1, 1)] * 3).apply(flax_conv, x)
    np.testing.assert_allclose(np.asarray(y_ours), np.asarray(y_flax), rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_clear_errors():
    x, kernel = jnp.zeros((1, 4, 4, 4, 1)), jnp.zeros((3, 3, 3, 1, 2))
    with pytest.raises(ValueError, match="depth_sum"):
        conv(x, kernel, None, (1, 1, 1), "winograd")
    with pytest.raises(ValueError, match="3 spatial"):
        conv(x, kernel, None, (1, 1), "xla")
