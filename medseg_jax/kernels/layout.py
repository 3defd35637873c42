"""Layout moves shared by the upsampling implementations: kernel taps as a matrix, depth <-> space.

Convention: the "depth" form of an upsampled array ``(N, *S * s, C)`` is ``(N * prod(S), prod(s) * C)``,
rows in input-voxel order, columns offset-major (offset ``a`` in row-major order over ``s``, then
channel). One matmul of the input rows ``(N * prod(S), C_in)`` with :func:`kernel_matrix` gives it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp


def kernel_matrix(kernel, spatial: int):
    """``(*s, C_in, C_out) -> (C_in, prod(s) * C_out)``, columns offset-major."""
    c_in = kernel.shape[spatial]
    return jnp.moveaxis(kernel, spatial, 0).reshape(c_in, -1)


def matrix_to_kernel(matrix, stride: Sequence[int]):
    """Inverse of :func:`kernel_matrix`: ``(C_in, prod(s) * C_out) -> (*s, C_in, C_out)``."""
    c_in = matrix.shape[0]
    return jnp.moveaxis(matrix.reshape(c_in, *stride, -1), 0, len(stride))


def depth_to_space(rows, batch: int, sizes: Sequence[int], stride: Sequence[int]):
    """``(N * prod(S), prod(s) * C) -> (N, *(S * s), C)``: each row's offsets land at ``i * s + a``."""
    spatial = len(stride)
    y = rows.reshape(batch, *sizes, *stride, -1)
    # Interleave each input axis with its offset axis: (N, S1, s1, S2, s2, ..., C).
    order = [0] + [a for d in range(spatial) for a in (1 + d, 1 + spatial + d)] + [1 + 2 * spatial]
    return jnp.transpose(y, order).reshape(batch, *(n * s for n, s in zip(sizes, stride)), y.shape[-1])


def space_to_depth(y, stride: Sequence[int]):
    """Inverse of :func:`depth_to_space`: ``(N, *(S * s), C) -> (N * prod(S), prod(s) * C)``."""
    spatial = len(stride)
    batch, *full, channels = y.shape
    sizes = [n // s for n, s in zip(full, stride)]
    split = y.reshape(batch, *[v for n, s in zip(sizes, stride) for v in (n, s)], channels)
    # (N, S1, s1, S2, s2, ..., C) -> (N, S1, S2, ..., s1, s2, ..., C)
    order = [0] + [1 + 2 * d for d in range(spatial)] + [2 + 2 * d for d in range(spatial)] + [1 + 2 * spatial]
    return jnp.transpose(split, order).reshape(-1, math.prod(stride) * channels)
