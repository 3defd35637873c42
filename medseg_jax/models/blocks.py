"""Building blocks of the U-Nets, written once for any number of spatial dimensions.

All modules take channels-last inputs ``(N, *spatial, C)``. ``dtype`` is the compute dtype, ``param_dtype``
the storage dtype of the parameters; normalisation statistics are always computed in float32 because
bf16 sums over a 128^3 feature map lose most of their precision.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medseg_jax.kernels.conv import conv
from medseg_jax.kernels.select import resolve
from medseg_jax.kernels.upsample import upsample

Dtype = Any

# nnU-Net initialises conv weights with Kaiming-normal for LeakyReLU(0.01) (``InitWeights_He(1e-2)``);
# fan-in is C_in times the kernel's taps, which Flax computes from the last two axes (in, out).
he_normal = nn.initializers.variance_scaling(2.0 / (1.0 + 0.01**2), "fan_in", "normal")


def as_tuple(value: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    """Broadcast an int (isotropic) or a per-axis sequence to a tuple of length ``ndim``."""
    if isinstance(value, int):
        return (value,) * ndim
    value = tuple(int(v) for v in value)
    if len(value) != ndim:
        raise ValueError(f"expected {ndim} values (one per spatial axis), got {value}")
    return value


class InstanceNorm(nn.Module):
    """Instance normalisation over the spatial axes of each sample and channel (PyTorch InstanceNorm
    with ``affine=True``: a scale and a bias per channel, no running statistics).

    Under spatial sharding the means are reductions over the full (global) spatial axes, so the
    statistics are those of the whole volume, not of a shard.
    """

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
        spatial_axes = tuple(range(1, x.ndim - 1))
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=spatial_axes, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=spatial_axes, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class Conv(nn.Module):
    """Convolution with padding ``kernel // 2`` (PyTorch's), computed by the chosen implementation of
    :mod:`medseg_jax.kernels.conv`. Parameters as ``flax.linen.Conv``: ``kernel (*k, C_in, C_out)``
    (He-normal) and ``bias (C_out,)``. ``implementation="auto"`` takes the backend's default
    (:func:`medseg_jax.kernels.select.resolve`)."""

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int]
    use_bias: bool = True
    implementation: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        shape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", he_normal, shape, self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype) if self.use_bias else None
        return conv(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            None if bias is None else bias.astype(self.dtype),
            self.strides,
            resolve("conv", self.implementation),
        )


class ConvNormAct(nn.Module):
    """conv (with bias) -> InstanceNorm -> LeakyReLU(0.01), nnU-Net's ``ConvDropoutNormReLU``.

    Padding is ``kernel // 2`` on each side (as PyTorch), so a stride-2 conv halves an even size exactly.
    """

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int]
    use_bias: bool = True
    activate: bool = True
    negative_slope: float = 0.01
    conv_implementation: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = Conv(
            self.features,
            tuple(self.kernel_size),
            tuple(self.strides),
            use_bias=self.use_bias,
            implementation=self.conv_implementation,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv",
        )(x)
        x = InstanceNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x)
        if self.activate:
            x = nn.leaky_relu(x, negative_slope=self.negative_slope)
        return x


class StackedConvs(nn.Module):
    """``num_convs`` ConvNormAct blocks; only the first carries the stride (it does the downsampling)."""

    features: int
    num_convs: int
    kernel_size: Sequence[int]
    strides: Sequence[int]
    use_bias: bool = True
    conv_implementation: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        ones = (1,) * len(self.strides)
        for i in range(self.num_convs):
            x = ConvNormAct(
                self.features,
                self.kernel_size,
                self.strides if i == 0 else ones,
                use_bias=self.use_bias,
                conv_implementation=self.conv_implementation,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"conv_block_{i}",
            )(x)
        return x


class ResidualBlock(nn.Module):
    """nnU-Net ResEnc's ``BasicBlockD``: two convs on the main path; the skip path average-pools when
    strided and projects with a bias-free 1x1 conv + norm when the channel count changes (the "D"
    variant of He et al., 2019, which avoids discarding 3/4 of the input in a strided 1x1 conv)."""

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int]
    use_bias: bool = True
    conv_implementation: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        common = dict(
            use_bias=self.use_bias,
            conv_implementation=self.conv_implementation,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        ones = (1,) * len(self.strides)
        residual = ConvNormAct(self.features, self.kernel_size, self.strides, name="conv_block_0", **common)(x)
        residual = ConvNormAct(self.features, self.kernel_size, ones, activate=False, name="conv_block_1", **common)(
            residual
        )
        skip = x
        if any(s != 1 for s in self.strides):
            skip = nn.avg_pool(skip, window_shape=tuple(self.strides), strides=tuple(self.strides))
        if x.shape[-1] != self.features:
            skip = ConvNormAct(
                self.features,
                ones,
                ones,
                activate=False,
                name="skip_projection",
                use_bias=False,
                conv_implementation=self.conv_implementation,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
            )(skip)
        return nn.leaky_relu(residual + skip, negative_slope=0.01)


class Upsample(nn.Module):
    """Learned upsampling with kernel == stride; the arithmetic is chosen by ``implementation``
    (see :mod:`medseg_jax.kernels.upsample`; ``"auto"``: the backend's default, see
    :func:`medseg_jax.kernels.select.resolve`). Parameters: kernel ``(*stride, C_in, C_out)`` and bias."""

    features: int
    strides: Sequence[int]
    implementation: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", he_normal, (*self.strides, x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        y = upsample(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            bias.astype(self.dtype),
            self.strides,
            resolve("upsample", self.implementation),
        )
        return y
