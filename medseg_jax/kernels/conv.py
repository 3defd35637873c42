"""The U-Net's convolution (kernel ``k``, stride ``s``, padding ``k // 2`` each side) behind one interface.

Semantics shared by every implementation: with ``x`` of shape ``(N, *S, C_in)``, ``kernel`` of shape
``(*k, C_in, C_out)`` and ``bias`` of shape ``(C_out,)`` (or ``None``)::

    y[n, i, o] = sum_{t, c} x_pad[n, i * s + t, c] * kernel[t, c, o] + bias[o]

over every tap ``t`` of the kernel, where ``x_pad`` is ``x`` zero-padded by ``k // 2`` on both sides of
each axis (PyTorch's ``padding=k // 2``); ``y`` has ``(S + 2 * (k // 2) - k) // s + 1`` voxels per axis.
This is ``flax.linen.Conv`` with ``padding=[(k // 2, k // 2)]`` and the same parameter layout.

Implementations (all exact reformulations; they differ in rounding only):
- ``xla``: one ``lax.conv_general_dilated`` -- the reference.
- ``depth_sum``: a 3D conv as the sum, over the taps of the first spatial axis, of 2D convs of
  depth-shifted (and depth-strided) slices folded into the batch. Measured on x86 CPUs, XLA's 2D
  convolution and above all its 2D gradients are much faster than the 3D ones (a strided 3D conv's
  input gradient, an lhs-dilated conv, was ~20x slower; see ``benchmarks/RESULTS.md``).
- ``depth_stack``: the depth taps concatenated along channels, then one 2D conv with ``k_0 * C_in``
  input channels: fewer, larger 2D convs than ``depth_sum``, at the price of a ``k_0``-fold copy of
  the input (kept for the backward pass: more activation memory). The CPU default (fastest in the
  measured nnU-Net 3D training step on XLA alone).
- ``onednn``: oneDNN's CPU convolutions (the ones PyTorch runs) as XLA custom calls, for any number
  of spatial axes (:mod:`.onednn`: optional, built on first use; imported only when called). The
  fastest on x86 CPUs by far where it is installed.

Inputs with fewer than 3 spatial axes take the ``xla`` path under the ``depth_*`` names (there is no smaller conv
to reduce to that XLA would run faster).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax.numpy as jnp
from jax import lax


def conv_output_size(size: int, kernel: int, stride: int) -> int:
    """Voxels along one axis after a conv with padding ``kernel // 2`` on both sides."""
    return (size + 2 * (kernel // 2) - kernel) // stride + 1


def dimension_numbers(spatial: int) -> tuple[str, str, str]:
    """Channels-last layouts for ``spatial`` axes: ``("N...C", "...IO", "N...C")``."""
    if not 1 <= spatial <= 3:
        raise ValueError(f"convolutions support 1-3 spatial axes, got {spatial}")
    letters = "DHW"[-spatial:]
    return "N" + letters + "C", letters + "IO", "N" + letters + "C"


def add_bias(y, bias):
    return y if bias is None else y + bias.astype(y.dtype)


def conv_xla(x, kernel, bias, strides: Sequence[int], accumulate_dtype=None):
    """The reference: ``lax.conv_general_dilated``, channels-last, padding ``k // 2``. The result has
    ``accumulate_dtype`` when given (partial sums kept in float32), else ``x.dtype``."""
    spatial = x.ndim - 2
    taps = kernel.shape[:spatial]
    y = lax.conv_general_dilated(
        x,
        kernel.astype(x.dtype),
        tuple(strides),
        [(k // 2, k // 2) for k in taps],
        dimension_numbers=dimension_numbers(spatial),
        preferred_element_type=accumulate_dtype,
    )
    return add_bias(y, bias)


def depth_slices(x, kernel_depth: int, stride_depth: int) -> list:
    """For each depth tap ``t``, the input slice it multiplies: ``x_pad[:, t :: stride][:D_out]``.

    ``x`` is ``(N, D, *rest, C)``; each slice is ``(N, D_out, *rest, C)``. Slicing (not a strided conv)
    keeps the gradient a plain pad + add.
    """
    half = kernel_depth // 2
    depth_out = conv_output_size(x.shape[1], kernel_depth, stride_depth)
    padded = jnp.pad(x, [(0, 0), (half, half)] + [(0, 0)] * (x.ndim - 2))
    stop = lambda t: t + (depth_out - 1) * stride_depth + 1
    return [padded[:, t : stop(t) : stride_depth] for t in range(kernel_depth)]


def fold_depth(x):
    """``(N, D, *rest, C) -> (N * D, *rest, C)``: depth becomes batch for a conv over ``rest``."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def conv_depth_sum(x, kernel, bias, strides: Sequence[int]):
    """Sum over depth taps of (N-1)-D convs of depth slices; exact, see the module docstring."""
    if x.ndim - 2 < 3:
        return conv_xla(x, kernel, bias, strides)
    batch = x.shape[0]
    # Low-precision inputs: the partial sums are added in float32 and rounded once, as one conv would.
    accumulate = jnp.float32 if jnp.finfo(x.dtype).bits < 32 else None
    pieces = depth_slices(x, kernel.shape[0], strides[0])
    total = conv_xla(fold_depth(pieces[0]), kernel[0], None, strides[1:], accumulate)
    for tap in range(1, len(pieces)):
        total = total + conv_xla(fold_depth(pieces[tap]), kernel[tap], None, strides[1:], accumulate)
    total = total.reshape(batch, -1, *total.shape[1:]).astype(x.dtype)
    return add_bias(total, bias)


def conv_depth_stack(x, kernel, bias, strides: Sequence[int]):
    """One (N-1)-D conv over depth slices stacked along channels (tap-major, matching the kernel)."""
    if x.ndim - 2 < 3:
        return conv_xla(x, kernel, bias, strides)
    batch = x.shape[0]
    stacked = jnp.concatenate(depth_slices(x, kernel.shape[0], strides[0]), axis=-1)
    # (k0, *k_rest, C_in, C_out) -> (*k_rest, k0 * C_in, C_out), tap-major to match the concatenation.
    k0, c_in, c_out = kernel.shape[0], kernel.shape[-2], kernel.shape[-1]
    folded_kernel = jnp.moveaxis(kernel, 0, -3).reshape(*kernel.shape[1:-2], k0 * c_in, c_out)
    y = conv_xla(fold_depth(stacked), folded_kernel, None, strides[1:])
    return add_bias(y.reshape(batch, -1, *y.shape[1:]), bias)


def conv_onednn(x, kernel, bias, strides: Sequence[int]):
    """oneDNN's convolution (:func:`medseg_jax.kernels.onednn.conv`); the module is imported here, on
    first use, because loading it may compile the extension. Raises
    :class:`~medseg_jax.kernels.onednn.OnednnUnavailable` (saying what to install) where it cannot run."""
    from medseg_jax.kernels import onednn

    return onednn.conv(x, kernel, bias, strides)


CONV_IMPLEMENTATIONS: dict[str, Callable] = {
    "xla": conv_xla,
    "depth_sum": conv_depth_sum,
    "depth_stack": conv_depth_stack,
    "onednn": conv_onednn,
}


def conv(x, kernel, bias, strides: Sequence[int], implementation: str = "xla"):
    """Convolve ``x`` (``(N, *S, C_in)``) with ``kernel`` (``(*k, C_in, C_out)``), padding ``k // 2``.

    ``implementation`` names an entry of :data:`CONV_IMPLEMENTATIONS`; ``"auto"`` is resolved by the
    caller (:func:`medseg_jax.kernels.select.resolve`), not here.
    """
    try:
        fn = CONV_IMPLEMENTATIONS[implementation]
    except KeyError:
        raise ValueError(
            f"unknown conv implementation {implementation!r}; choose one of {sorted(CONV_IMPLEMENTATIONS)}"
        ) from None
    strides = tuple(int(s) for s in strides)
    if len(strides) != x.ndim - 2 or kernel.ndim != x.ndim:
        raise ValueError(
            f"conv: input {x.shape} needs a kernel (*k, C_in, C_out) and strides with {x.ndim - 2} spatial "
            f"entries, got kernel {kernel.shape} and strides {strides}"
        )
    return fn(x, kernel, bias, strides)
