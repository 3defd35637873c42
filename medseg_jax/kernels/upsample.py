"""Learned upsampling with kernel == stride (the U-Net's "transposed convolution"), N spatial dims.

Semantics shared by every implementation (scatter form of a transposed convolution whose kernel
equals its stride): with ``x`` of shape ``(N, *S, C_in)``, ``kernel`` of shape ``(*stride, C_in, C_out)``
and ``bias`` of shape ``(C_out,)``::

    y[n, i_1*s_1 + a_1, ..., i_d*s_d + a_d, o] = sum_c x[n, i_1, ..., i_d, c] * kernel[a_1, ..., a_d, c, o] + bias[o]

so ``y`` has shape ``(N, S_1*s_1, ..., S_d*s_d, C_out)``. The kernel layout and parameter count equal
PyTorch's ``ConvTranspose{2,3}d(C_in, C_out, kernel_size=stride, stride=stride)`` (up to axis order).

Implementations:
- ``conv_transpose``: ``lax.conv_transpose`` — the reference. Its backward pass uses lhs dilation,
  which is very slow on CPU and in bf16 on GPU.
- ``matmul``: one matmul over channels followed by depth-to-space (reshape + transpose). Exact, and
  typically much faster, because no multiply ever touches a dilation zero.
- ``pallas``: the same matmul as a Pallas kernel with a hand-written VJP
  (:mod:`medseg_jax.kernels.upsample_pallas`); registered where the installed jax ships
  ``jax.experimental.pallas``, and imported only when this implementation is first called (Pallas is
  experimental and heavy to import: a model that does not use it never loads it). On CPU it runs in
  interpret mode (correct, slow: for tests).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence

from jax import lax

from medseg_jax.kernels.layout import depth_to_space, kernel_matrix


def upsample_conv_transpose(x, kernel, bias, stride: Sequence[int]):
    spatial = len(stride)
    spatial_letters = "DHW"[-spatial:] if spatial <= 3 else None
    if spatial_letters is None:
        raise ValueError(f"conv_transpose upsampling supports 1-3 spatial dims, got {spatial}")
    lhs = "N" + spatial_letters + "C"
    rhs = spatial_letters + "IO"
    # lax.conv_transpose without transpose_kernel correlates the dilated input with the kernel, which
    # pairs output offset a with kernel tap (s - 1 - a): flip the taps to get the scatter semantics.
    flipped = kernel[tuple(slice(None, None, -1) for _ in range(spatial))]
    y = lax.conv_transpose(
        x, flipped.astype(x.dtype), strides=tuple(stride), padding="VALID", dimension_numbers=(lhs, rhs, lhs)
    )
    return y + bias.astype(y.dtype)


def upsample_matmul(x, kernel, bias, stride: Sequence[int]):
    spatial = len(stride)
    batch, *sizes, c_in = x.shape
    # One matmul yields every output offset of every input voxel (columns offset-major).
    rows = x.reshape(-1, c_in) @ kernel_matrix(kernel, spatial).astype(x.dtype)
    y = depth_to_space(rows, batch, sizes, stride)
    return y + bias.astype(y.dtype)


def pallas_shipped() -> bool:
    """Whether the installed jax has ``jax.experimental.pallas``, found without importing it."""
    try:
        return importlib.util.find_spec("jax.experimental.pallas") is not None
    except (ImportError, ValueError):  # pragma: no cover - depends on the installed jax
        return False


def upsample_pallas(x, kernel, bias, stride: Sequence[int]):
    """The Pallas kernel (:func:`medseg_jax.kernels.upsample_pallas.upsample_pallas`), imported on
    first use."""
    from medseg_jax.kernels.upsample_pallas import upsample_pallas as pallas_kernel

    return pallas_kernel(x, kernel, bias, stride)


UPSAMPLE_IMPLEMENTATIONS: dict[str, Callable] = {
    "conv_transpose": upsample_conv_transpose,
    "matmul": upsample_matmul,
}
if pallas_shipped():
    UPSAMPLE_IMPLEMENTATIONS["pallas"] = upsample_pallas


def upsample(x, kernel, bias, stride: Sequence[int], implementation: str = "matmul"):
    """Upsample ``x`` by ``stride`` with a learned kernel (see the module docstring for shapes).

    ``implementation`` names an entry of :data:`UPSAMPLE_IMPLEMENTATIONS`; ``"auto"`` is resolved by
    the caller (:func:`medseg_jax.kernels.select.resolve`), not here."""
    try:
        fn = UPSAMPLE_IMPLEMENTATIONS[implementation]
    except KeyError:
        raise ValueError(
            f"unknown upsample implementation {implementation!r}; choose one of {sorted(UPSAMPLE_IMPLEMENTATIONS)}"
        ) from None
    return fn(x, kernel, bias, tuple(stride))
