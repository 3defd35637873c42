"""Run configuration: frozen dataclasses, YAML files read with ``yaml.safe_load``, dotted overrides.

Every field has a default that works and a one-line ``help``. Unknown keys and wrong types are
:class:`~medseg_jax.errors.ConfigError` s that name the dotted key (``train.learning_rate``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from medseg_jax.errors import ConfigError


def field(default, help: str):
    """A dataclass field with a default (copied for mutables) and a one-line description."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    spatial_dims: Literal[2, 3] = field(3, "2 for slice-wise, 3 for volumetric networks")
    in_channels: int = field(1, "number of input image channels (modalities)")
    num_classes: int = field(3, "number of output classes including background")
    n_stages: int = field(6, "resolution stages of the encoder")
    features: Optional[tuple[int, ...]] = field(None, "features per stage; null = min(base*2^i, 320 (3D) / 512 (2D))")
    base_features: int = field(32, "features of the first stage when features is null")
    kernel_sizes: Union[int, tuple[Union[int, tuple[int, ...]], ...]] = field(3, "conv kernel size, or one per stage (per axis allowed)")
    strides: Optional[tuple[Union[int, tuple[int, ...]], ...]] = field(None, "stride per stage (per axis allowed); null = 1 then 2s")
    n_conv_per_stage: Union[int, tuple[int, ...]] = field(2, "convs per encoder stage (plain encoder)")
    n_conv_per_stage_decoder: Union[int, tuple[int, ...]] = field(2, "convs per decoder stage")
    encoder: Literal["plain", "residual"] = field("plain", "plain (PlainConvUNet) or residual (nnU-Net ResEnc)")
    n_blocks_per_stage: Union[int, tuple[int, ...]] = field((1, 3, 4, 6, 6, 6), "residual blocks per stage (residual encoder)")
    deep_supervision: bool = field(True, "train on a 1x1 head per decoder stage (nnU-Net default)")
    upsample_implementation: str = field("auto", "upsampling arithmetic: auto (the backend's fastest), matmul, conv_transpose, pallas")
    conv_implementation: str = field("auto", "convolution arithmetic: auto (the backend's fastest), xla, depth_sum, depth_stack")
    dtype: Literal["float32", "bfloat16"] = field("float32", "compute dtype (bfloat16 = mixed precision)")
    param_dtype: Literal["float32", "bfloat16"] = field("float32", "storage dtype of parameters")
    remat_encoder: bool = field(False, "recompute encoder activations in the backward pass (saves memory)")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    patch_size: Optional[tuple[int, ...]] = field(None, "training patch size per spatial axis; null = the plan's")
    batch_size: Optional[int] = field(None, "global batch size (split over the data axis); null = the plan's")
    foreground_fraction: float = field(0.33, "fraction of each batch forced to contain foreground")
    num_workers: int = field(0, "data loader worker processes (0 = in the main process)")
    seed: int = field(0, "seed of the data stream")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    dice_weight: float = field(1.0, "weight of the soft Dice term")
    ce_weight: float = field(1.0, "weight of the cross-entropy term")
    smooth: float = field(1e-5, "soft Dice smoothing constant")
    batch_dice: bool = field(False, "compute Dice over the whole batch instead of per sample")
    include_background: bool = field(False, "include class 0 in the Dice term")
    ignore_index: Optional[int] = field(None, "label value excluded from every loss term")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = field(250_000, "total optimiser steps (nnU-Net: 1000 epochs x 250)")
    optimizer: Literal["sgd", "adamw"] = field("sgd", "sgd (nnU-Net: Nesterov, poly decay) or adamw (warmup + cosine)")
    learning_rate: float = field(1e-2, "peak learning rate")
    momentum: float = field(0.99, "SGD momentum (Nesterov)")
    weight_decay: float = field(3e-5, "L2 weight decay (sgd) / decoupled weight decay (adamw)")
    poly_power: float = field(0.9, "exponent of the poly learning-rate decay (sgd)")
    warmup_steps: int = field(0, "linear warmup steps")
    grad_clip_norm: Optional[float] = field(12.0, "clip the global gradient norm to this value; null = off")
    ema_decay: Optional[float] = field(None, "keep an exponential moving average of params with this decay")
    nan_policy: Literal["stop", "skip"] = field("stop", "on a non-finite loss: stop the run, or skip the update")
    seed: int = field(0, "seed of parameter init and step randomness")
    log_every: int = field(10, "steps between metric lines in metrics.jsonl")
    checkpoint_every: int = field(250, "steps between checkpoints (one is always written at the end)")
    keep_checkpoints: int = field(2, "latest checkpoints kept (the best by validation Dice is kept too)")
    val_every: int = field(250, "steps between validations on the fold's validation cases")
    val_mode: Literal["sliding_window", "patches"] = field("sliding_window", "validate on whole cases (sliding window, no mirroring) or on patches")
    val_batches: int = field(4, "validation batches per validation (val_mode: patches)")
    deterministic: bool = field(False, "ask XLA for deterministic (slower) GPU kernels")
    loss: LossConfig = field(LossConfig(), "loss terms")


@dataclasses.dataclass(frozen=True)
class InferenceConfig:
    step_size: float = field(0.5, "sliding-window step as a fraction of the patch")
    sigma_scale: float = field(0.125, "Gaussian importance sigma as a fraction of the patch")
    mirror_axes: Optional[tuple[int, ...]] = field(None, "spatial axes mirrored at test time; null = all")
    batch_size: int = field(2, "windows per forward pass")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = field(-1, "devices along the data-parallel axis (-1 = the rest)")
    spatial: int = field(1, "devices along the spatial-parallel axis (splits the first patch axis)")
    fsdp_min_size: Optional[int] = field(None, "split parameters with at least this many elements over data; null = replicate")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    enabled: bool = field(False, "call jax.distributed.initialize() (multi-host)")
    coordinator_address: Optional[str] = field(None, "host:port of process 0; null = auto-detect (Cloud TPU, SLURM)")
    num_processes: Optional[int] = field(None, "number of processes (with coordinator_address)")
    process_id: Optional[int] = field(None, "this process's id (with coordinator_address)")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """nnU-Net v2's augmentation (see :mod:`medseg_jax.augment`): each probability is per sample; ranges
    marked "(nnU-Net BGContrast)" draw below and above 1 with equal probability."""

    mode: Literal["device", "cpu", "none"] = field("device", "where augmentation runs: inside the jitted step (device), in the loader (cpu), or not at all (none)")
    rotation_probability: float = field(0.2, "probability of a random rotation")
    rotation_degrees: Optional[float] = field(None, "largest rotation per axis plane in degrees; null = nnU-Net's 180 in 2D and in-plane, 30 in 3D")
    in_plane_only: Optional[bool] = field(None, "3D: rotate, scale and deform only in the plane of the two larger patch sides, the same for every slice (nnU-Net's dummy-2D augmentation for anisotropic data); null = when the largest patch side exceeds 3x the smallest (nnU-Net's rule)")
    scale_probability: float = field(0.2, "probability of random scaling (one factor for all axes, or for the in-plane axes)")
    scale_range: tuple[float, float] = field((0.7, 1.4), "range of the factor on sampling coordinates (> 1 shows more context: structures look smaller)")
    elastic_probability: float = field(0.0, "probability of an elastic deformation (off in nnU-Net v2)")
    elastic_control_spacing: int = field(16, "voxels between the control points of the elastic B-spline")
    elastic_magnitude: tuple[float, float] = field((0.0, 4.0), "range of the largest control-point displacement in voxels")
    mirror_probability: float = field(0.5, "probability of mirroring, drawn per axis")
    mirror_axes: Optional[tuple[int, ...]] = field(None, "spatial axes that may be mirrored; null = all")
    label_interpolation: Literal["nearest", "linear"] = field("nearest", "labels: nearest neighbour, or linear on the one-hot encoding then argmax")
    noise_probability: float = field(0.1, "probability of additive Gaussian noise")
    noise_std: tuple[float, float] = field((0.0, 0.1), "range of the noise standard deviation (nnU-Net names it variance but uses it as the std)")
    blur_probability: float = field(0.2, "probability of Gaussian blur")
    blur_channel_probability: float = field(0.5, "probability that a channel is blurred when blur is applied")
    blur_sigma: tuple[float, float] = field((0.5, 1.0), "range of the blur sigma in voxels, drawn per channel and axis")
    brightness_probability: float = field(0.15, "probability of a multiplicative brightness change")
    brightness_range: tuple[float, float] = field((0.75, 1.25), "range of the brightness multiplier per channel (nnU-Net BGContrast)")
    contrast_probability: float = field(0.15, "probability of a contrast change (range preserved)")
    contrast_range: tuple[float, float] = field((0.75, 1.25), "range of the contrast factor per channel (nnU-Net BGContrast)")
    low_resolution_probability: float = field(0.25, "probability of simulated low resolution")
    low_resolution_channel_probability: float = field(0.5, "probability that a channel is degraded when low resolution is applied")
    low_resolution_zoom: tuple[float, float] = field((0.5, 1.0), "range of the downsampling factor per channel")
    gamma_inverted_probability: float = field(0.1, "probability of a gamma change of the inverted image")
    gamma_probability: float = field(0.3, "probability of a gamma change (applied after the inverted one)")
    gamma_range: tuple[float, float] = field((0.7, 1.5), "range of gamma per channel (nnU-Net BGContrast)")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(ModelConfig(), "network")
    data: DataConfig = field(DataConfig(), "patches and batches")
    train: TrainConfig = field(TrainConfig(), "optimisation")
    inference: InferenceConfig = field(InferenceConfig(), "sliding-window prediction")
    mesh: MeshConfig = field(MeshConfig(), "device mesh")
    distributed: DistributedConfig = field(DistributedConfig(), "multi-host initialisation")
    augment: AugmentConfig = field(AugmentConfig(), "data augmentation (on the device by default)")


# Fields left as nested dataclasses are replaced whole-or-by-key; fields annotated with plain types are
# coerced below. PEP 604 unions (``int | None``) are avoided in the annotations so that get_type_hints
# works the same on every supported Python.

def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it (lists -> tuples, "3e-4" -> float)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_null = [a for a in args if a is not type(None)]
        if len(non_null) == 1:  # Optional[X]: X's own message is the clearest
            return coerce(value, non_null[0], key)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")  # a bug in a dataclass, not user input


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from a (possibly partial) mapping; unknown keys and bad types raise."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(where + k for k in unknown)}; "
            f"valid keys{' under ' + prefix if prefix else ''}: {', '.join(sorted(names))}"
        )
    values = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        values[name] = coerce(value, hints[name], key)
    return cls(**values)


def to_dict(config) -> dict:
    """Plain nested dict (tuples as lists) suitable for YAML / JSON."""

    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return v

    return plain(config)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.learning_rate=3e-4"`` -> (["train", "learning_rate"], 3e-4); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({exc})") from exc
    return parts, value


def merge_override(data: dict, parts: list[str], value: Any) -> dict:
    """Return a copy of nested ``data`` with ``value`` set at the dotted path ``parts``."""
    merged = dict(data)
    if len(parts) == 1:
        merged[parts[0]] = value
        return merged
    child = merged.get(parts[0]) or {}
    if not isinstance(child, dict):
        raise ConfigError(f"{parts[0]} is not a section, cannot set {'.'.join(parts)}")
    merged[parts[0]] = merge_override(child, parts[1:], value)
    return merged


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = (), cls=RunConfig):
    """Load ``cls`` from an optional YAML file, then apply dotted ``key=value`` overrides in order."""
    data = read_yaml(path) if path is not None else {}
    for text in overrides:
        parts, value = parse_override(text)
        data = merge_override(data, parts, value)
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        if path is not None:
            raise ConfigError(f"{path}: {exc}") from exc
        raise


def save_config(config, path: str | Path) -> Path:
    """Write ``config`` as YAML atomically."""
    from medseg_jax.atomic import write_text_atomic

    return write_text_atomic(path, yaml.safe_dump(to_dict(config), sort_keys=False))
