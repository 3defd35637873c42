"""The network of an nnU-Net v2 configuration, read from ``plans.json``, as medseg-jax's U-Net settings.

nnU-Net v2 describes the network in two styles, both read here:

- newer plans: ``configurations.{name}.architecture = {network_class_name, arch_kwargs}``, the keyword
  arguments of ``dynamic_network_architectures``' ``PlainConvUNet`` or ``ResidualEncoderUNet`` (all
  ResEnc presets -- M, L, XL -- are such kwargs);
- older plans: ``UNet_class_name``, ``UNet_base_num_features``, ``unet_max_num_features``,
  ``n_conv_per_stage_encoder`` / ``_decoder``, ``conv_kernel_sizes``, ``pool_op_kernel_sizes``, converted
  exactly as nnU-Net's own ``ConfigurationManager`` does (features ``min(base * 2^i, max)``, conv bias,
  InstanceNorm eps 1e-5 with affine, LeakyReLU 0.01).

Only what medseg-jax's :class:`~medseg_jax.models.UNet` computes identically is accepted: conv -> instance
norm -> LeakyReLU(0.01) blocks with odd kernels, ``BasicBlockD`` residual blocks, no running statistics.
Anything else (another network class, batch norm, ReLU, bottleneck blocks, an unknown keyword) is a
:class:`~medseg_jax.errors.DataError` naming the plans field, never an approximation. Dropout is accepted:
it is the identity at inference.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from medseg_jax.errors import DataError

# nnU-Net's old-style UNet_class_name and the full class names newer plans give (the residual U-Net
# moved from residual_unet to unet in dynamic_network_architectures; plans of either age exist).
CLASS_NAMES = {
    "dynamic_network_architectures.architectures.unet.PlainConvUNet": "plain",
    "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet": "residual",
    "dynamic_network_architectures.architectures.residual_unet.ResidualEncoderUNet": "residual",
}
OLD_STYLE_NAMES = {"PlainConvUNet": "plain", "ResidualEncoderUNet": "residual"}

COMMON_KWARGS = {
    "n_stages",
    "features_per_stage",
    "conv_op",
    "kernel_sizes",
    "strides",
    "n_conv_per_stage_decoder",
    "conv_bias",
    "norm_op",
    "norm_op_kwargs",
    "dropout_op",
    "dropout_op_kwargs",
    "nonlin",
    "nonlin_kwargs",
    "deep_supervision",
}
ENCODER_KWARGS = {
    "plain": {"n_conv_per_stage", "nonlin_first"},
    "residual": {"n_blocks_per_stage", "block", "bottleneck_channels", "stem_channels"},
}
EPSILON = 1e-5  # medseg-jax's InstanceNorm epsilon (and torch's default)
NEGATIVE_SLOPE = 0.01  # medseg-jax's LeakyReLU slope (and torch's default)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """An nnU-Net U-Net in medseg-jax's terms. ``norm_affine``: whether the checkpoint holds instance-norm
    scales and biases (without them the norm is scale 1, bias 0); ``conv_bias``: whether convs and
    transposed convs carry biases (without them medseg-jax's biases are zero, the same function)."""

    encoder: str
    spatial_dims: int
    n_stages: int
    features: tuple[int, ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]
    n_conv_per_stage: tuple[int, ...]
    n_blocks_per_stage: tuple[int, ...]
    n_conv_per_stage_decoder: tuple[int, ...]
    conv_bias: bool = True
    norm_affine: bool = True

    def model_fields(self) -> dict[str, Any]:
        """The :class:`~medseg_jax.config.ModelConfig` fields describing this network."""
        fields: dict[str, Any] = {
            "spatial_dims": self.spatial_dims,
            "n_stages": self.n_stages,
            "features": list(self.features),
            "kernel_sizes": [list(k) for k in self.kernel_sizes],
            "strides": [list(s) for s in self.strides],
            "n_conv_per_stage_decoder": list(self.n_conv_per_stage_decoder),
            "encoder": self.encoder,
        }
        if self.encoder == "plain":
            fields["n_conv_per_stage"] = list(self.n_conv_per_stage)
        else:
            fields["n_blocks_per_stage"] = list(self.n_blocks_per_stage)
        return fields


def configuration(plans: dict, name: str, source: str) -> dict:
    """``plans["configurations"][name]`` with ``inherits_from`` resolved (the parent's entries, overridden
    by the child's), as nnU-Net's ``PlansManager.get_configuration`` does."""
    configurations = plans.get("configurations")
    if not isinstance(configurations, dict):
        raise DataError(f"{source}: no 'configurations' mapping; not an nnU-Net v2 plans file")
    seen: list[str] = []
    current = name
    chain = []
    while current is not None:
        if current in seen:
            raise DataError(f"{source}: configurations inherit from each other in a loop: {' -> '.join(seen)}")
        if current not in configurations:
            raise DataError(
                f"{source}: configuration {current!r} not found (configurations: {', '.join(sorted(configurations))})"
            )
        seen.append(current)
        chain.append(configurations[current])
        current = configurations[current].get("inherits_from")
    merged: dict = {}
    for entry in reversed(chain):
        merged.update(entry)
    merged.pop("inherits_from", None)
    return merged


def _per_stage(value, n_stages: int, field: str) -> tuple:
    if isinstance(value, int):
        return (value,) * n_stages
    if not isinstance(value, (list, tuple)) or len(value) != n_stages:
        raise DataError(f"{field}: expected one entry per stage ({n_stages}), got {value!r}")
    return tuple(value)


def _per_axis(value, n_stages: int, dims: int, field: str) -> tuple[tuple[int, ...], ...]:
    stages = _per_stage(value, n_stages, field)
    out = []
    for s, stage in enumerate(stages):
        axes = (stage,) * dims if isinstance(stage, int) else tuple(stage)
        if len(axes) != dims or not all(isinstance(a, int) and a >= 1 for a in axes):
            raise DataError(f"{field}[{s}]: expected {dims} positive integers, got {stage!r}")
        out.append(tuple(int(a) for a in axes))
    return tuple(out)


def _op_name(value) -> str | None:
    """``torch.nn.modules.conv.Conv3d`` / ``torch.nn.Conv3d`` -> ``Conv3d``; None stays None."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith("torch.nn."):
        return f"<{value!r}>"
    return value.rsplit(".", 1)[-1]


def _check_ops(kwargs: dict, dims: int, where: str) -> tuple[bool, bool]:
    """Refuse layers medseg-jax does not compute; ``(conv_bias, norm_affine)``."""
    norm = _op_name(kwargs.get("norm_op"))
    if norm != f"InstanceNorm{dims}d":
        raise DataError(
            f"{where}.norm_op: {kwargs.get('norm_op')!r} is not supported (medseg-jax's U-Net uses InstanceNorm)"
        )
    norm_kwargs = kwargs.get("norm_op_kwargs") or {}
    if float(norm_kwargs.get("eps", EPSILON)) != EPSILON:
        raise DataError(f"{where}.norm_op_kwargs.eps: {norm_kwargs['eps']!r} is not supported (only {EPSILON})")
    if norm_kwargs.get("track_running_stats"):
        raise DataError(
            f"{where}.norm_op_kwargs.track_running_stats: running statistics are not supported "
            "(medseg-jax normalises every sample by its own statistics)"
        )
    nonlin = _op_name(kwargs.get("nonlin"))
    if nonlin != "LeakyReLU":
        raise DataError(f"{where}.nonlin: {kwargs.get('nonlin')!r} is not supported (only torch.nn.LeakyReLU)")
    slope = float((kwargs.get("nonlin_kwargs") or {}).get("negative_slope", NEGATIVE_SLOPE))
    if slope != NEGATIVE_SLOPE:
        raise DataError(f"{where}.nonlin_kwargs.negative_slope: {slope} is not supported (only {NEGATIVE_SLOPE})")
    if kwargs.get("nonlin_first"):
        raise DataError(f"{where}.nonlin_first: true is not supported (medseg-jax applies conv -> norm -> nonlin)")
    return bool(kwargs.get("conv_bias", False)), bool(norm_kwargs.get("affine", False))


def _from_kwargs(encoder: str, kwargs: dict, where: str) -> Architecture:
    unknown = sorted(set(kwargs) - COMMON_KWARGS - ENCODER_KWARGS[encoder])
    if unknown:
        raise DataError(f"{where}: unsupported architecture keyword(s) {', '.join(unknown)}")
    conv = _op_name(kwargs.get("conv_op"))
    if conv not in ("Conv2d", "Conv3d"):
        raise DataError(f"{where}.conv_op: {kwargs.get('conv_op')!r} is not supported (Conv2d or Conv3d)")
    dims = int(conv[-2])
    n_stages = kwargs.get("n_stages")
    if not isinstance(n_stages, int) or n_stages < 2:
        raise DataError(f"{where}.n_stages: expected an integer >= 2, got {n_stages!r}")
    conv_bias, norm_affine = _check_ops(kwargs, dims, where)
    features = _per_stage(kwargs.get("features_per_stage"), n_stages, f"{where}.features_per_stage")
    kernels = _per_axis(kwargs.get("kernel_sizes"), n_stages, dims, f"{where}.kernel_sizes")
    if any(k % 2 == 0 for stage in kernels for k in stage):
        raise DataError(f"{where}.kernel_sizes: even kernel sizes are not supported, got {[list(k) for k in kernels]}")
    strides = _per_axis(kwargs.get("strides"), n_stages, dims, f"{where}.strides")
    decoder = _per_stage(kwargs.get("n_conv_per_stage_decoder"), n_stages - 1, f"{where}.n_conv_per_stage_decoder")
    convs: tuple = ()
    blocks: tuple = ()
    if encoder == "plain":
        convs = _per_stage(kwargs.get("n_conv_per_stage"), n_stages, f"{where}.n_conv_per_stage")
    else:
        blocks = _per_stage(kwargs.get("n_blocks_per_stage"), n_stages, f"{where}.n_blocks_per_stage")
        block = kwargs.get("block")
        if block is not None and str(block).rsplit(".", 1)[-1] != "BasicBlockD":
            raise DataError(f"{where}.block: {block!r} is not supported (only BasicBlockD)")
        if kwargs.get("bottleneck_channels") is not None:
            raise DataError(f"{where}.bottleneck_channels: bottleneck blocks are not supported")
        stem = kwargs.get("stem_channels")
        if stem is not None and stem != features[0]:
            raise DataError(f"{where}.stem_channels: {stem} differs from the first stage's {features[0]} features")
    counts = (("features_per_stage", features), ("n_conv_per_stage", convs), ("n_blocks_per_stage", blocks))
    for field, values in (*counts, ("n_conv_per_stage_decoder", decoder)):
        if not all(isinstance(v, int) and v >= 1 for v in values):
            raise DataError(f"{where}.{field}: expected positive integers, got {list(values)}")
    return Architecture(
        encoder=encoder,
        spatial_dims=dims,
        n_stages=n_stages,
        features=tuple(int(f) for f in features),
        kernel_sizes=kernels,
        strides=strides,
        n_conv_per_stage=tuple(int(c) for c in convs),
        n_blocks_per_stage=tuple(int(b) for b in blocks),
        n_conv_per_stage_decoder=tuple(int(c) for c in decoder),
        conv_bias=conv_bias,
        norm_affine=norm_affine,
    )


def _old_style_kwargs(config: dict, where: str) -> tuple[str, dict]:
    """nnU-Net's own conversion of an old-style configuration (``ConfigurationManager.__init__``)."""
    name = config.get("UNet_class_name")
    encoder = OLD_STYLE_NAMES.get(name) if isinstance(name, str) else None
    if encoder is None:
        raise DataError(
            f"{where}.UNet_class_name: {name!r} is not supported (supported: {', '.join(sorted(OLD_STYLE_NAMES))})"
        )
    try:
        n_stages = len(config["n_conv_per_stage_encoder"])
        dims = len(config["patch_size"])
        features = [
            min(int(config["UNet_base_num_features"]) * 2**i, int(config["unet_max_num_features"]))
            for i in range(n_stages)
        ]
        kwargs = {
            "n_stages": n_stages,
            "features_per_stage": features,
            "conv_op": f"torch.nn.modules.conv.Conv{dims}d",
            "kernel_sizes": config["conv_kernel_sizes"],
            "strides": config["pool_op_kernel_sizes"],
            "n_conv_per_stage" if encoder == "plain" else "n_blocks_per_stage": config["n_conv_per_stage_encoder"],
            "n_conv_per_stage_decoder": config["n_conv_per_stage_decoder"],
            "conv_bias": True,
            "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dims}d",
            "norm_op_kwargs": {"eps": EPSILON, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(
            f"{where}: old-style plans lack or mangle a network field ({type(exc).__name__}: {exc})"
        ) from None
    return encoder, kwargs


def architecture(config: dict, where: str) -> Architecture:
    """The :class:`Architecture` of one resolved configuration (:func:`configuration`); ``where`` names it
    in messages (``plans.json: configurations.3d_fullres``)."""
    arch = config.get("architecture")
    if arch is None:
        encoder, kwargs = _old_style_kwargs(config, where)
        where_kwargs = where
    else:
        class_name = arch.get("network_class_name") if isinstance(arch, dict) else None
        known = CLASS_NAMES.get(class_name) if isinstance(class_name, str) else None
        if known is None:
            supported = ", ".join(sorted(n.rsplit(".", 1)[-1] for n in CLASS_NAMES))
            raise DataError(
                f"{where}.architecture.network_class_name: {class_name!r} is not supported (supported: {supported}"
                "; a cascade's or a custom trainer's network cannot be imported)"
            )
        encoder = known
        kwargs = arch.get("arch_kwargs")
        if not isinstance(kwargs, dict):
            raise DataError(f"{where}.architecture.arch_kwargs: expected a mapping, got {kwargs!r}")
        where_kwargs = f"{where}.architecture.arch_kwargs"
    result = _from_kwargs(encoder, kwargs, where_kwargs)
    patch = config.get("patch_size")
    if not isinstance(patch, list) or len(patch) != result.spatial_dims:
        raise DataError(f"{where}.patch_size: {patch!r} does not fit a {result.spatial_dims}D network")
    return result
