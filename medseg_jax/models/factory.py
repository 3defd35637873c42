"""Build a :class:`UNet` from a :class:`medseg_jax.config.ModelConfig`.

The config's topology fields (spatial dims, channels, classes, stages, kernels, strides) are null until
a run is resolved against a dataset's plan (:func:`medseg_jax.train.setup.resolve_run`); this module
knows nothing of plans and only refuses a config that is not resolved yet.
"""

from __future__ import annotations

import jax.numpy as jnp

from medseg_jax.errors import ConfigError
from medseg_jax.models.ensemble import Ensemble
from medseg_jax.models.unet import UNet, default_features

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
REQUIRED_FIELDS = ("spatial_dims", "num_classes", "n_stages")  # kernels and strides have UNet defaults


def compute_dtype(name: str) -> str:
    """``model.dtype`` with ``"auto"`` resolved for JAX's default backend
    (:func:`medseg_jax.kernels.select.default_compute_dtype`)."""
    if name != "auto":
        return name
    from medseg_jax.kernels.select import default_compute_dtype

    return default_compute_dtype()


def build_unet(model_config, deep_supervision: bool | None = None):
    """The network a ModelConfig describes; ``deep_supervision`` overrides the config (inference wants
    only the full-resolution output; the parameters are the same either way). With ``model.ensemble``
    above 1, an :class:`~medseg_jax.models.ensemble.Ensemble` of that many such U-Nets."""
    c = model_config
    unset = [f"model.{name}" for name in REQUIRED_FIELDS if getattr(c, name) is None]
    if unset:
        raise ConfigError(
            f"{', '.join(unset)} not set: give them, or resolve the config against a plan "
            "(medseg_jax.train.setup.resolve_run does it for training)"
        )
    # null (a config not resolved against a plan) takes UNet's default: PlainConvUNet's
    optional = {
        "kernel_sizes": c.kernel_sizes,
        "strides": c.strides,
        "n_blocks_per_stage": c.n_blocks_per_stage,
        "encoder": c.encoder,
        "n_conv_per_stage_decoder": c.n_conv_per_stage_decoder,
    }
    kwargs = {name: value for name, value in optional.items() if value is not None}
    network = UNet(
        num_classes=c.num_classes,
        spatial_dims=c.spatial_dims,
        n_stages=c.n_stages,
        features=c.features or default_features(c.n_stages, c.spatial_dims, c.base_features),
        n_conv_per_stage=c.n_conv_per_stage,
        deep_supervision=c.deep_supervision if deep_supervision is None else deep_supervision,
        upsample_implementation=c.upsample_implementation,
        conv_implementation=c.conv_implementation,
        remat_encoder=c.remat_encoder,
        dtype=DTYPES[compute_dtype(c.dtype)],
        param_dtype=DTYPES[c.param_dtype],
        **kwargs,
    )
    return network if c.ensemble == 1 else Ensemble(network, c.ensemble)
