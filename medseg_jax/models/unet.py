"""nnU-Net's U-Nets (PlainConvUNet and ResidualEncoderUNet) as one Flax module for 2D and 3D.

Pure: ``params = UNet(...).init(key, x)`` and ``logits = UNet(...).apply(params, x)``; no state besides
the parameters (instance norm has no running statistics), no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from medseg_jax.models.blocks import ConvNormAct, ResidualBlock, StackedConvs, Upsample, as_tuple

Dtype = Any


def default_features(n_stages: int, spatial_dims: int, base: int = 32) -> tuple[int, ...]:
    """nnU-Net's rule: ``min(base * 2^i, cap)`` with cap 320 in 3D and 512 in 2D."""
    cap = 320 if spatial_dims == 3 else 512
    return tuple(min(base * 2**i, cap) for i in range(n_stages))


def default_strides(n_stages: int, spatial_dims: int) -> tuple[tuple[int, ...], ...]:
    """Stride 1 in the first stage, 2 along every axis in the others."""
    return tuple((1 if i == 0 else 2,) * spatial_dims for i in range(n_stages))


def per_stage(value, n_stages: int, name: str) -> tuple:
    """Broadcast a scalar to every stage, or check a per-stage sequence has one entry per stage."""
    if isinstance(value, (int, np.integer)):
        return (int(value),) * n_stages
    value = tuple(value)
    if len(value) != n_stages:
        raise ValueError(f"{name}: expected {n_stages} entries (one per stage), got {len(value)}: {value}")
    return value


class UNet(nn.Module):
    """U-Net for ``spatial_dims``-D segmentation, input ``(N, *spatial, in_channels)``, output logits
    ``(N, *spatial, num_classes)`` in float32.

    Defaults give nnU-Net's PlainConvUNet: per stage ``n_conv_per_stage`` x [conv 3 (bias) ->
    InstanceNorm(eps 1e-5, affine) -> LeakyReLU(0.01)], downsampling by the first conv's stride,
    upsampling by a learned kernel==stride upsample, concatenation with the skip, then
    ``n_conv_per_stage_decoder`` convs, and a 1x1 head per decoder stage. ``encoder="residual"`` gives
    nnU-Net ResEnc (a stem conv, then ``n_blocks_per_stage`` residual blocks per stage).

    With ``deep_supervision`` the call returns a list of logits, one per decoder stage, highest
    resolution first; otherwise only the full-resolution logits. Every head always exists in the
    parameters (as in nnU-Net's implementation), so the parameter tree does not depend on the switch.

    Spatial sizes must be multiples of the product of the strides along each axis.

    ``upsample_implementation`` / ``conv_implementation`` choose the arithmetic of the upsampling and
    of every 3^d conv (:mod:`medseg_jax.kernels`; same parameters and results whichever is chosen);
    ``"auto"`` takes the backend's measured default (:func:`medseg_jax.kernels.select.resolve`), and
    :func:`medseg_jax.bench.model_tuning.autotune_model` times the candidates for a given input shape.
    """

    num_classes: int
    spatial_dims: int = 3
    n_stages: int = 6
    features: Sequence[int] | None = None
    kernel_sizes: int | Sequence[int | Sequence[int]] = 3
    strides: Sequence[int | Sequence[int]] | None = None
    n_conv_per_stage: int | Sequence[int] = 2
    n_conv_per_stage_decoder: int | Sequence[int] = 2
    encoder: Literal["plain", "residual"] = "plain"
    n_blocks_per_stage: int | Sequence[int] = (1, 3, 4, 6, 6, 6)
    deep_supervision: bool = False
    upsample_implementation: str = "auto"
    conv_implementation: str = "auto"
    conv_bias: bool = True
    remat_encoder: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def stage_features(self) -> tuple[int, ...]:
        features = self.features or default_features(self.n_stages, self.spatial_dims)
        return tuple(int(f) for f in per_stage(features, self.n_stages, "features"))

    def stage_kernels(self) -> tuple[tuple[int, ...], ...]:
        kernels = self.kernel_sizes
        if isinstance(kernels, int):
            kernels = (kernels,) * self.n_stages
        return tuple(as_tuple(k, self.spatial_dims) for k in per_stage(kernels, self.n_stages, "kernel_sizes"))

    def stage_strides(self) -> tuple[tuple[int, ...], ...]:
        strides = self.strides or default_strides(self.n_stages, self.spatial_dims)
        return tuple(as_tuple(s, self.spatial_dims) for s in per_stage(strides, self.n_stages, "strides"))

    def total_stride(self) -> tuple[int, ...]:
        """The factor every input axis must be divisible by."""
        return tuple(int(np.prod(axis)) for axis in zip(*self.stage_strides()))

    def check_input_shape(self, shape: Sequence[int]) -> None:
        spatial = tuple(shape[1:-1])
        if len(spatial) != self.spatial_dims:
            raise ValueError(
                f"UNet(spatial_dims={self.spatial_dims}) expects input (N, *{self.spatial_dims} spatial, C), "
                f"got {tuple(shape)}"
            )
        total = self.total_stride()
        if any(size % t for size, t in zip(spatial, total)):
            raise ValueError(f"input spatial shape {spatial} must be a multiple of the total stride {total}")

    @nn.compact
    def __call__(self, x):
        self.check_input_shape(x.shape)
        features, kernels, strides = self.stage_features(), self.stage_kernels(), self.stage_strides()
        common = dict(
            use_bias=self.conv_bias,
            conv_implementation=self.conv_implementation,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        x = x.astype(self.dtype)

        skips = []
        if self.encoder == "plain":
            convs = per_stage(self.n_conv_per_stage, self.n_stages, "n_conv_per_stage")
            stage_cls = nn.remat(StackedConvs) if self.remat_encoder else StackedConvs
            for s in range(self.n_stages):
                x = stage_cls(features[s], convs[s], kernels[s], strides[s], name=f"encoder_{s}", **common)(x)
                skips.append(x)
        elif self.encoder == "residual":
            blocks = per_stage(self.n_blocks_per_stage, self.n_stages, "n_blocks_per_stage")
            block_cls = nn.remat(ResidualBlock) if self.remat_encoder else ResidualBlock
            x = ConvNormAct(features[0], kernels[0], (1,) * self.spatial_dims, name="stem", **common)(x)
            for s in range(self.n_stages):
                for b in range(blocks[s]):
                    x = block_cls(
                        features[s],
                        kernels[s],
                        strides[s] if b == 0 else (1,) * self.spatial_dims,
                        name=f"encoder_{s}_block_{b}",
                        **common,
                    )(x)
                skips.append(x)
        else:
            raise ValueError(f"encoder must be 'plain' or 'residual', got {self.encoder!r}")

        decoder_convs = per_stage(self.n_conv_per_stage_decoder, self.n_stages - 1, "n_conv_per_stage_decoder")
        outputs = []
        for d in range(self.n_stages - 1):
            target = self.n_stages - 2 - d  # the encoder stage whose resolution this decoder stage restores
            x = Upsample(
                features[target],
                strides[target + 1],
                self.upsample_implementation,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"upsample_{d}",
            )(x)
            x = jnp.concatenate([x, skips[target].astype(x.dtype)], axis=-1)
            x = StackedConvs(
                features[target],
                decoder_convs[d],
                kernels[target],
                (1,) * self.spatial_dims,
                name=f"decoder_{d}",
                **common,
            )(x)
            head = nn.Conv(
                self.num_classes,
                kernel_size=(1,) * self.spatial_dims,
                use_bias=True,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"head_{d}",
            )
            outputs.append(head(x).astype(jnp.float32))
        if self.deep_supervision:
            return outputs[::-1]
        return outputs[-1]


def count_parameters(params) -> int:
    """Total number of scalars in a parameter pytree."""
    import jax

    return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)))
