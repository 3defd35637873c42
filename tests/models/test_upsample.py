import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medseg_jax.kernels.upsample import UPSAMPLE_IMPLEMENTATIONS, upsample


def scatter_reference(x, kernel, bias, stride):
    """The definition: every input voxel writes kernel[offset]^T x at output (i*s + offset)."""
    out = np.zeros((x.shape[0], *(n * s for n, s in zip(x.shape[1:-1], stride)), kernel.shape[-1]), np.float64)
    for offset in itertools.product(*(range(s) for s in stride)):
        index = (slice(None),) + tuple(slice(o, None, s) for o, s in zip(offset, stride))
        out[index] = np.einsum("n...c,co->n...o", x.astype(np.float64), kernel[offset].astype(np.float64))
    return out + bias


@pytest.mark.parametrize("stride", [(2, 2), (1, 2, 2), (2, 2, 2), (2, 1)])
@pytest.mark.parametrize("implementation", sorted(UPSAMPLE_IMPLEMENTATIONS))
def test_matches_scatter_definition(stride, implementation):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, *[3] * len(stride), 4)).astype(np.float32)
    kernel = rng.normal(size=(*stride, 4, 5)).astype(np.float32)
    bias = rng.normal(size=5).astype(np.float32)
    y = upsample(x, kernel, bias, stride, implementation)
    np.testing.assert_allclose(np.asarray(y), scatter_reference(x, kernel, bias, stride), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 5e-2)])
def test_gradients_agree_between_implementations(dtype, tol):
    rng = np.random.default_rng(1)
    stride = (1, 2, 2)
    x = jnp.asarray(rng.normal(size=(1, 2, 3, 3, 4)), dtype)
    kernel = jnp.asarray(rng.normal(size=(*stride, 4, 3)), dtype)
    bias = jnp.zeros(3, dtype)

    def grads(impl):
        f = lambda x, k: jnp.sum(upsample(x, k, bias, stride, impl).astype(jnp.float32) ** 2)
        return jax.grad(f, argnums=(0, 1))(x, kernel)

    for a, b in zip(grads("matmul"), grads("conv_transpose")):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.abs(a - b).max() <= tol * max(1.0, np.abs(b).max())


def test_unknown_implementation_names_the_choices():
    with pytest.raises(ValueError, match="conv_transpose"):
        upsample(jnp.zeros((1, 2, 2, 1)), jnp.zeros((2, 2, 1, 1)), jnp.zeros(1), (2, 2), "pallas-not-here")
