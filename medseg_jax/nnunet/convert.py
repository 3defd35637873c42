"""nnU-Net (PyTorch) network weights -> medseg-jax U-Net parameters, tensor by tensor, exactly.

:func:`weight_map` lists, in network order, every medseg-jax parameter with the PyTorch state-dict key
it comes from and how its layout changes:

- convolutions: PyTorch ``(C_out, C_in, *k)`` -> Flax ``(*k, C_in, C_out)``; same taps, no flip (both
  compute a cross-correlation with padding ``k // 2``);
- transposed convolutions (kernel == stride): PyTorch ``(C_in, C_out, *s)`` -> medseg-jax's upsample kernel
  ``(*s, C_in, C_out)`` (:mod:`medseg_jax.kernels.upsample`: output offset ``a`` takes tap ``a``);
- instance-norm ``weight`` / ``bias`` -> ``scale`` / ``bias``; segmentation heads are 1x1 convs.

Spatial axes keep nnU-Net's order (the network's axis ``a`` is nnU-Net's axis ``a`` after
``transpose_forward``); the preprocessing puts the image's axes in that order
(:mod:`medseg_jax.nnunet.preprocessing`), so no weight is permuted or flipped.

Keys nnU-Net's modules register twice (``...all_modules.N`` beside ``...conv`` / ``...norm``, and
``decoder.encoder.*``, the decoder's reference to the encoder) are aliases and skipped; ``module.``
(DistributedDataParallel) and ``_orig_mod.`` (``torch.compile``) prefixes are removed first. A missing
tensor, a tensor of another shape, or a tensor the plans do not describe is a
:class:`~medseg_jax.errors.DataError` naming the first one.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from medseg_jax.errors import DataError
from medseg_jax.nnunet.architecture import Architecture

ALIAS = re.compile(r"(^|\.)all_modules\.\d+\.|^decoder\.encoder\.")
PREFIXES = ("module.", "_orig_mod.")


@dataclasses.dataclass(frozen=True)
class Weight:
    """One medseg-jax parameter: its path in the Flax tree, its PyTorch key (None: not in the checkpoint,
    filled with ``fill``), the PyTorch shape expected, and the layout change (``conv`` / ``transposed`` /
    ``vector``)."""

    path: tuple[str, ...]
    key: str | None
    torch_shape: tuple[int, ...]
    kind: str
    fill: float = 0.0


def _conv_norm(weights: list, path: tuple, prefix: str, c_in: int, c_out: int, kernel, arch: Architecture, bias=None):
    """A ConvDropoutNormReLU: ``{prefix}.conv.weight/bias`` and ``{prefix}.norm.weight/bias``."""
    use_bias = arch.conv_bias if bias is None else bias
    weights.append(Weight((*path, "conv", "kernel"), f"{prefix}.conv.weight", (c_out, c_in, *kernel), "conv"))
    if "skip_projection" not in path:  # medseg-jax's projection conv has no bias, as nnU-Net's
        weights.append(Weight((*path, "conv", "bias"), f"{prefix}.conv.bias" if use_bias else None, (c_out,), "vector"))
    affine = arch.norm_affine
    weights.append(
        Weight((*path, "norm", "scale"), f"{prefix}.norm.weight" if affine else None, (c_out,), "vector", 1.0)
    )
    weights.append(Weight((*path, "norm", "bias"), f"{prefix}.norm.bias" if affine else None, (c_out,), "vector"))


def weight_map(arch: Architecture, in_channels: int, num_classes: int) -> list[Weight]:
    """Every parameter of medseg-jax's UNet for ``arch`` with its nnU-Net source, in network order."""
    weights: list[Weight] = []
    f, k, s = arch.features, arch.kernel_sizes, arch.strides
    ones = (1,) * arch.spatial_dims
    if arch.encoder == "plain":
        c_in = in_channels
        for stage in range(arch.n_stages):
            for i in range(arch.n_conv_per_stage[stage]):
                prefix = f"encoder.stages.{stage}.0.convs.{i}"
                _conv_norm(weights, (f"encoder_{stage}", f"conv_block_{i}"), prefix, c_in, f[stage], k[stage], arch)
                c_in = f[stage]
    else:
        _conv_norm(weights, ("stem",), "encoder.stem.convs.0", in_channels, f[0], k[0], arch)
        c_in = f[0]
        for stage in range(arch.n_stages):
            for b in range(arch.n_blocks_per_stage[stage]):
                block = f"encoder.stages.{stage}.blocks.{b}"
                path = (f"encoder_{stage}_block_{b}",)
                _conv_norm(weights, (*path, "conv_block_0"), f"{block}.conv1", c_in, f[stage], k[stage], arch)
                _conv_norm(weights, (*path, "conv_block_1"), f"{block}.conv2", f[stage], f[stage], k[stage], arch)
                if c_in != f[stage]:
                    # nnU-Net's skip is Sequential(avg-pool if strided, projection): the index shifts by one
                    index = 1 if (b == 0 and any(v != 1 for v in s[stage])) else 0
                    _conv_norm(weights, (*path, "skip_projection"), f"{block}.skip.{index}", c_in, f[stage], ones, arch)
                c_in = f[stage]
    below = f[-1]
    for d in range(arch.n_stages - 1):
        target = arch.n_stages - 2 - d
        stride = s[target + 1]
        weights.append(
            Weight(
                (f"upsample_{d}", "kernel"),
                f"decoder.transpconvs.{d}.weight",
                (below, f[target], *stride),
                "transposed",
            )
        )
        bias_key = f"decoder.transpconvs.{d}.bias" if arch.conv_bias else None
        weights.append(Weight((f"upsample_{d}", "bias"), bias_key, (f[target],), "vector"))
        c_in = 2 * f[target]
        for i in range(arch.n_conv_per_stage_decoder[d]):
            prefix = f"decoder.stages.{d}.convs.{i}"
            _conv_norm(weights, (f"decoder_{d}", f"conv_block_{i}"), prefix, c_in, f[target], k[target], arch)
            c_in = f[target]
        weights.append(
            Weight((f"head_{d}", "kernel"), f"decoder.seg_layers.{d}.weight", (num_classes, f[target], *ones), "conv")
        )
        weights.append(Weight((f"head_{d}", "bias"), f"decoder.seg_layers.{d}.bias", (num_classes,), "vector"))
        below = f[target]
    return weights


def _to_flax(array: np.ndarray, kind: str) -> np.ndarray:
    spatial = tuple(range(2, array.ndim))
    if kind == "conv":  # (O, I, *k) -> (*k, I, O)
        array = np.transpose(array, (*spatial, 1, 0))
    elif kind == "transposed":  # (I, O, *s) -> (*s, I, O)
        array = np.transpose(array, (*spatial, 0, 1))
    return np.ascontiguousarray(array, dtype=np.float32)


def canonical_state_dict(state_dict: dict, source: str) -> dict[str, np.ndarray]:
    """The state dict without wrapper prefixes and alias keys; values must be arrays."""
    out: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        name = str(key)
        for prefix in PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
        if ALIAS.search(name):
            continue
        if not isinstance(value, np.ndarray):
            raise DataError(f"{source}: network weight {key!r} is not a tensor ({type(value).__name__})")
        out[name] = value
    return out


def convert_state_dict(state_dict: dict, arch: Architecture, in_channels: int, num_classes: int, source: str) -> dict:
    """Flax parameters ``{"params": {...}}`` (float32 numpy) for :func:`weight_map`'s network from an nnU-Net
    ``network_weights`` state dict. ``source`` names the checkpoint in errors."""
    tensors = canonical_state_dict(state_dict, source)
    weights = weight_map(arch, in_channels, num_classes)
    params: dict = {}
    used = set()
    for weight in weights:
        if weight.key is None:
            array = np.full(weight.torch_shape, weight.fill, dtype=np.float32)
        else:
            tensor = tensors.get(weight.key)
            if tensor is None:
                raise DataError(
                    f"{source}: the checkpoint lacks {weight.key} (shape {list(weight.torch_shape)}), which the "
                    "plans' network needs; the checkpoint does not belong to this plans.json configuration"
                )
            if tuple(tensor.shape) != weight.torch_shape:
                raise DataError(
                    f"{source}: {weight.key} has shape {list(tensor.shape)}, the plans' network needs "
                    f"{list(weight.torch_shape)}; the checkpoint does not belong to this plans.json configuration"
                )
            if not np.isfinite(tensor.astype(np.float32)).all():
                raise DataError(f"{source}: {weight.key} holds NaN or infinite values")
            used.add(weight.key)
            array = tensor
        node = params
        for name in weight.path[:-1]:
            node = node.setdefault(name, {})
        node[weight.path[-1]] = _to_flax(np.asarray(array), weight.kind)
    extra = [key for key in tensors if key not in used]
    if extra:
        raise DataError(
            f"{source}: the checkpoint holds {extra[0]} (shape {list(tensors[extra[0]].shape)})"
            f"{f' and {len(extra) - 1} more tensor(s)' if len(extra) > 1 else ''} that the plans' network does "
            "not have; the checkpoint does not belong to this plans.json configuration"
        )
    return {"params": params}
