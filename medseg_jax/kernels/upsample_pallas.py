"""Kernel == stride upsampling as a Pallas matmul kernel (TPU: Mosaic; GPU: the installed Pallas
backend, Triton by default; CPU: Pallas interpret mode, for tests only -- it is slow).

The forward pass is one row-blocked matmul ``(M, C_in) @ (C_in, prod(s) * C_out)`` with the bias fused,
then depth-to-space (an XLA transpose). Pallas calls have no automatic derivative, so the backward
pass is written out (``jax.custom_vjp``): space-to-depth of the cotangent ``g`` to ``(M, prod(s) * C_out)``,
then ``dx = g @ W^T`` with the same Pallas kernel, ``dW = x^T @ g`` and ``db = sum(g)`` with XLA's dot
and reduction (a plain matmul and a sum: no lhs dilation anywhere, unlike ``lax.conv_transpose``).

Block shapes: 128 rows per grid step; ``C_in`` whole (padded to a power of two, at least 16, because
Triton's ``dot`` wants power-of-two blocks of at least 16); output columns in blocks of 128 (padded
up). Zero padding does not change the result. These blocks satisfy Mosaic's (8, 128) tiling as well.
The import of Pallas is guarded so that this module imports everywhere; :data:`AVAILABLE` says
whether the kernel can run. Only :mod:`medseg_jax.kernels.upsample`'s ``pallas`` entry imports this
module, on its first call.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from medseg_jax.kernels.layout import depth_to_space, kernel_matrix, matrix_to_kernel, space_to_depth
from medseg_jax.kernels.select import pallas_interpreted

try:  # Pallas is experimental: its import path and API move between jax releases.
    from jax.experimental import pallas as pl
except Exception:  # pragma: no cover - depends on the installed jax
    pl = None  # type: ignore[assignment]

AVAILABLE = pl is not None and hasattr(pl, "pallas_call") and hasattr(pl, "BlockSpec")

BLOCK_ROWS = 128
BLOCK_COLS = 128


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def padded_depth(size: int) -> int:
    """The contraction size a block holds whole: a power of two, at least 16."""
    return max(16, 1 << (size - 1).bit_length())


def _matmul_bias_kernel(x_ref, w_ref, b_ref, o_ref):
    """One (BLOCK_ROWS, BLOCK_COLS) output block: ``x_block @ w_block + b_block``, f32 accumulation."""
    acc = jnp.dot(x_ref[...], w_ref[...], preferred_element_type=jnp.float32)
    o_ref[...] = (acc + b_ref[...].astype(jnp.float32)).astype(o_ref.dtype)


def pallas_matmul_bias(x, w, b, *, interpret: bool | None = None):
    """``x @ w + b`` for ``x (M, K)``, ``w (K, N)``, ``b (N,)`` with a Pallas kernel; result ``(M, N)`` in
    ``x.dtype``, accumulated in float32. Operands are zero-padded to the block grid, the result cropped."""
    if not AVAILABLE:
        raise RuntimeError("jax.experimental.pallas is not available in the installed jax")
    rows, depth = x.shape
    cols = w.shape[1]
    rows_p, depth_p, cols_p = round_up(rows, BLOCK_ROWS), padded_depth(depth), round_up(cols, BLOCK_COLS)
    x_p = jnp.pad(x, [(0, rows_p - rows), (0, depth_p - depth)])
    w_p = jnp.pad(w.astype(x.dtype), [(0, depth_p - depth), (0, cols_p - cols)])
    b_p = jnp.pad(b.astype(x.dtype), [(0, cols_p - cols)]).reshape(1, cols_p)
    call = pl.pallas_call(
        _matmul_bias_kernel,
        out_shape=jax.ShapeDtypeStruct((rows_p, cols_p), x.dtype),
        grid=(rows_p // BLOCK_ROWS, cols_p // BLOCK_COLS),
        in_specs=[
            pl.BlockSpec(block_shape=(BLOCK_ROWS, depth_p), index_map=lambda i, j: (i, 0)),
            pl.BlockSpec(block_shape=(depth_p, BLOCK_COLS), index_map=lambda i, j: (0, j)),
            pl.BlockSpec(block_shape=(1, BLOCK_COLS), index_map=lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec(block_shape=(BLOCK_ROWS, BLOCK_COLS), index_map=lambda i, j: (i, j)),
        interpret=pallas_interpreted() if interpret is None else interpret,
    )
    return call(x_p, w_p, b_p)[:rows, :cols]


def _forward(x, kernel, bias, stride):
    spatial = len(stride)
    batch, *sizes, c_in = x.shape
    taps = kernel_matrix(kernel, spatial)
    rows = pallas_matmul_bias(x.reshape(-1, c_in), taps, jnp.tile(bias, math.prod(stride)))
    return depth_to_space(rows, batch, sizes, stride)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _upsample_pallas(x, kernel, bias, stride):
    return _forward(x, kernel, bias, stride)


def _upsample_pallas_fwd(x, kernel, bias, stride):
    return _forward(x, kernel, bias, stride), (x, kernel, bias)


def _upsample_pallas_bwd(stride, residuals, g):
    x, kernel, bias = residuals
    spatial = len(stride)
    c_in, c_out = x.shape[-1], kernel.shape[-1]
    g_rows = space_to_depth(g, stride)  # (M, prod(s) * C_out)
    x_rows = x.reshape(-1, c_in)
    taps = kernel_matrix(kernel, spatial)
    dx = pallas_matmul_bias(g_rows, taps.T, jnp.zeros((c_in,), g.dtype)).reshape(x.shape)
    dtaps = jnp.dot(x_rows.T, g_rows, preferred_element_type=jnp.float32)
    dbias = jnp.sum(g_rows.astype(jnp.float32).reshape(-1, math.prod(stride), c_out), axis=(0, 1))
    return (
        dx.astype(x.dtype),
        matrix_to_kernel(dtaps, stride).astype(kernel.dtype),
        dbias.astype(bias.dtype),
    )


_upsample_pallas.defvjp(_upsample_pallas_fwd, _upsample_pallas_bwd)


def upsample_pallas(x, kernel, bias, stride: Sequence[int]):
    """Pallas implementation of :func:`medseg_jax.kernels.upsample.upsample` (same shapes and
    semantics); differentiable through a hand-written VJP."""
    return _upsample_pallas(x, kernel, bias, tuple(int(s) for s in stride))
