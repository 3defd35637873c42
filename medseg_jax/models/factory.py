"""Build a :class:`UNet` from a :class:`medseg_jax.config.ModelConfig`."""

from __future__ import annotations

import jax.numpy as jnp

from medseg_jax.models.unet import UNet, default_features

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_unet(model_config, deep_supervision: bool | None = None) -> UNet:
    """The network a ModelConfig describes; ``deep_supervision`` overrides the config (inference wants
    only the full-resolution output; the parameters are the same either way)."""
    c = model_config
    return UNet(
        num_classes=c.num_classes,
        spatial_dims=c.spatial_dims,
        n_stages=c.n_stages,
        features=c.features or default_features(c.n_stages, c.spatial_dims, c.base_features),
        kernel_sizes=c.kernel_sizes,
        strides=c.strides,
        n_conv_per_stage=c.n_conv_per_stage,
        n_conv_per_stage_decoder=c.n_conv_per_stage_decoder,
        encoder=c.encoder,
        n_blocks_per_stage=c.n_blocks_per_stage,
        deep_supervision=c.deep_supervision if deep_supervision is None else deep_supervision,
        upsample_implementation=c.upsample_implementation,
        conv_implementation=c.conv_implementation,
        remat_encoder=c.remat_encoder,
        dtype=DTYPES[c.dtype],
        param_dtype=DTYPES[c.param_dtype],
    )


def model_config_from_plan(model_config, plan: dict):
    """``model_config`` with the data-dependent fields taken from a plan: spatial dims, channels, classes,
    stages, kernels and strides (features are kept from the config when set)."""
    import dataclasses

    return dataclasses.replace(
        model_config,
        spatial_dims=int(plan["dim"]),
        in_channels=len(plan["channel_names"]),
        num_classes=int(plan["num_classes"]),
        n_stages=int(plan["n_stages"]),
        kernel_sizes=tuple(tuple(k) for k in plan["kernel_sizes"]),
        strides=tuple(tuple(s) for s in plan["strides"]),
        features=model_config.features if model_config.features and len(model_config.features) == int(plan["n_stages"])
        else None,
    )
