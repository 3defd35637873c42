import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medseg_jax.kernels import upsample_pallas
from medseg_jax.kernels.layout import depth_to_space, kernel_matrix, matrix_to_kernel, space_to_depth
from medseg_jax.kernels.upsample import upsample

pytestmark = pytest.mark.skipif(not upsample_pallas.AVAILABLE, reason="jax.experimental.pallas not importable")


def test_pallas_matmul_pads_and_crops_odd_shapes():
    # 130 rows (two row blocks, the second mostly padding), 20-deep contraction (padded to 32),
    # 36 columns (one padded column block): exact after cropping.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(130, 20)).astype(np.float32)
    w = rng.normal(size=(20, 36)).astype(np.float32)
    b = rng.normal(size=36).astype(np.float32)
    y = upsample_pallas.pallas_matmul_bias(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b), interpret=True)
    assert y.shape == (130, 36)
    np.testing.assert_allclose(np.asarray(y), x @ w + b, rtol=1e-5, atol=1e-5)


def test_layout_moves_are_inverse():
    y = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
    rows = space_to_depth(y, (2, 3))
    assert rows.shape == (2 * 2 * 2, 6 * 3)
    np.testing.assert_array_equal(np.asarray(depth_to_space(rows, 2, (2, 2), (2, 3))), np.asarray(y))
    kernel = jnp.arange(1 * 2 * 2 * 3 * 5, dtype=jnp.float32).reshape(1, 2, 2, 3, 5)
    np.testing.assert_array_equal(np.asarray(matrix_to_kernel(kernel_matrix(kernel, 3), (1, 2, 2))), np.asarray(kernel))


@pytest.mark.parametrize("stride", [(2, 2), (1, 2, 2), (2, 2, 2)])
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1.6e-2)])
def test_forward_and_gradients_equal_matmul(stride, dtype, tol):
    rng = np.random.default_rng(2)
    c_in, c_out = 6, 5
    x = jnp.asarray(rng.normal(size=(2, *[3] * len(stride), c_in)), dtype)
    kernel = jnp.asarray(rng.normal(size=(*stride, c_in, c_out)) * 0.5, dtype)
    bias = jnp.asarray(rng.normal(size=c_out), dtype)
    out_shape = (2, *(3 * s for s in stride), c_out)
    cotangent = jnp.asarray(rng.normal(size=out_shape), dtype)

    def forward_and_grads(implementation, compute_dtype):
        args = [a.astype(compute_dtype) for a in (x, kernel, bias)]
        y, vjp = jax.vjp(lambda x, k, b: upsample(x, k, b, stride, implementation), *args)
        return (y, *vjp(cotangent.astype(compute_dtype)))

    # The reference is the matmul form in float32 on the same (rounded) inputs: Pallas accumulates
    # in float32, so in bf16 it is compared with what it approximates, not with another rounding.
    got, want = forward_and_grads("pallas", dtype), forward_and_grads("matmul", jnp.float32)
    for name, g, w in zip(["y", "dx", "dkernel", "dbias"], got, want):
        assert g.shape == w.shape and g.dtype == dtype, name
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.abs(g - w).max() <= tol * max(1.0, np.abs(w).max()), name


def test_gradient_under_jit_matches_finite_difference():
    """The hand-written VJP against the function itself (not only against another implementation)."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(1, 2, 2, 3)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(2, 2, 3, 2)), jnp.float32)
    bias = jnp.zeros(2)
    loss = jax.jit(lambda k: jnp.sum(jnp.sin(upsample(x, k, bias, (2, 2), "pallas"))))
    grad = np.asarray(jax.grad(loss)(kernel))
    eps = 1e-3
    index = (1, 0, 2, 1)
    bump = jnp.zeros_like(kernel).at[index].set(eps)
    numeric = (float(loss(kernel + bump)) - float(loss(kernel - bump))) / (2 * eps)
    assert abs(grad[index] - numeric) < 1e-2 * max(1.0, abs(numeric))
