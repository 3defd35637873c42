"""Run configuration: frozen dataclasses, YAML files read with ``yaml.safe_load``, dotted overrides.

Every field has a default that works and a one-line ``help``. Unknown keys and wrong types are
:class:`~medseg_jax.errors.ConfigError` s that name the dotted key (``train.learning_rate``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from medseg_jax.errors import ConfigError


def field(default, help: str, *, ge=None, gt=None, le=None, lt=None):
    """A dataclass field with a default (copied for mutables), a one-line description and optional
    numeric bounds (``ge``: >=, ``gt``: >, ``le``: <=, ``lt``: <), checked for the value and for every
    number in a tuple value when a config is read."""
    bounds = {name: bound for name, bound in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if bound is not None}
    metadata = {"help": help, "bounds": bounds}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # The fields whose help starts with "the plan's" are decided by the dataset's plan: null takes the
    # plan's value, and a value that disagrees with the plan is an error (medseg_jax.train.setup).
    spatial_dims: Literal[2, 3] | None = field(None, "the plan's: 2 for slice-wise, 3 for volumetric networks")
    in_channels: int | None = field(None, "the plan's: number of input image channels (modalities)", ge=1)
    num_classes: int | None = field(None, "the plan's: number of output classes including background", ge=2)
    n_stages: int | None = field(None, "the plan's: resolution stages of the encoder", ge=1)
    features: tuple[int, ...] | None = field(
        None, "features per stage; null = min(base*2^i, 320 (3D) / 512 (2D))", ge=1
    )
    base_features: int = field(32, "features of the first stage when features is null", ge=1)
    kernel_sizes: int | tuple[int | tuple[int, ...], ...] | None = field(
        None, "the plan's: conv kernel size, or one per stage (per axis allowed)", ge=1
    )
    strides: tuple[int | tuple[int, ...], ...] | None = field(
        None, "the plan's: stride per stage (per axis allowed)", ge=1
    )
    n_conv_per_stage: int | tuple[int, ...] = field(2, "convs per encoder stage (plain encoder)", ge=1)
    n_conv_per_stage_decoder: int | tuple[int, ...] | None = field(
        None, "convs per decoder stage; null = the plan's (ResEnc presets: 1), else 2", ge=1
    )
    encoder: Literal["plain", "residual"] | None = field(
        None, "plain (PlainConvUNet) or residual (nnU-Net ResEnc); null = the plan's (ResEnc presets), else plain"
    )
    n_blocks_per_stage: int | tuple[int, ...] | None = field(
        None, "residual blocks per stage (residual encoder); null = the plan's, else ResEnc's 1, 3, 4, 6, 6, ...", ge=1
    )
    deep_supervision: bool = field(True, "train on a 1x1 head per decoder stage (nnU-Net default)")
    upsample_implementation: str = field(
        "auto", "upsampling arithmetic: auto (the backend's fastest), matmul, conv_transpose, pallas"
    )
    conv_implementation: str = field(
        "auto", "convolution arithmetic: auto (the backend's fastest), onednn, xla, depth_sum, depth_stack"
    )
    dtype: Literal["float32", "bfloat16", "auto"] = field(
        "float32", "compute dtype (bfloat16 = mixed precision; auto = bfloat16 where measured faster at equal accuracy)"
    )
    param_dtype: Literal["float32", "bfloat16"] = field("float32", "storage dtype of parameters")
    remat_encoder: bool = field(False, "recompute encoder activations in the backward pass (saves memory)")
    ensemble: int = field(
        1,
        "networks (own parameters each) whose logits are averaged, as nnU-Net's fold ensembles; training needs 1",
        ge=1,
    )


# Model fields that choose how the network is computed, not which parameters it has: a run may be
# predicted (or resumed) with other values than it was trained with, e.g. on another backend.
EXECUTION_ONLY_MODEL_FIELDS = ("upsample_implementation", "conv_implementation", "dtype", "remat_encoder")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    patch_size: tuple[int, ...] | None = field(None, "training patch size per spatial axis; null = the plan's", ge=1)
    batch_size: int | None = field(None, "global batch size (split over the data axis); null = the plan's", ge=1)
    foreground_fraction: float = field(0.33, "fraction of each batch forced to contain foreground", ge=0.0, le=1.0)
    num_workers: int | Literal["auto"] = field(
        "auto", "loader worker processes (0 = in the training process); auto = min(4, cores - 2), 0 below 3 cores", ge=0
    )
    seed: int = field(0, "seed of the data stream", ge=0)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    dice_weight: float = field(1.0, "weight of the soft Dice term", ge=0.0)
    ce_weight: float = field(1.0, "weight of the cross-entropy term", ge=0.0)
    smooth: float = field(1e-5, "soft Dice smoothing constant", ge=0.0)
    batch_dice: bool = field(False, "compute Dice over the whole batch instead of per sample")
    include_background: bool = field(False, "include class 0 in the Dice term")
    ignore_index: int | None = field(None, "label value excluded from every loss term", ge=0)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = field(250_000, "total optimiser steps (nnU-Net: 1000 epochs x 250)", ge=1)
    optimizer: Literal["sgd", "adamw"] = field("sgd", "sgd (nnU-Net: Nesterov, poly decay) or adamw (warmup + cosine)")
    learning_rate: float = field(1e-2, "peak learning rate", gt=0.0)
    momentum: float = field(0.99, "SGD momentum (Nesterov)", ge=0.0, lt=1.0)
    weight_decay: float = field(3e-5, "L2 weight decay (sgd) / decoupled weight decay (adamw)", ge=0.0)
    poly_power: float = field(0.9, "exponent of the poly learning-rate decay (sgd)", ge=0.0)
    warmup_steps: int = field(0, "linear warmup steps (fewer than train.steps)", ge=0)
    grad_clip_norm: float | None = field(12.0, "clip the global gradient norm to this value; null = off", gt=0.0)
    ema_decay: float | None = field(
        None, "keep an exponential moving average of params with this decay", gt=0.0, lt=1.0
    )
    nan_policy: Literal["stop", "skip"] = field("stop", "on a non-finite loss: stop the run, or skip the update")
    seed: int = field(0, "seed of parameter init and step randomness", ge=0)
    log_every: int = field(10, "steps between metric lines in metrics.jsonl", ge=1)
    checkpoint_every: int = field(250, "steps between checkpoints (one is always written at the end)", ge=1)
    keep_checkpoints: int = field(2, "latest checkpoints kept (the best by validation Dice is kept too)", ge=1)
    val_every: int = field(250, "steps between validations on the fold's validation cases", ge=1)
    val_mode: Literal["sliding_window", "patches"] = field(
        "sliding_window",
        "validate on whole cases (sliding window, no mirroring) or on patches (nnU-Net's choice during training)",
    )
    val_batches: int | None = field(
        None, "validation batches per validation, only with val_mode: patches; null = 4 there", ge=1
    )
    deterministic: bool = field(False, "ask XLA for deterministic (slower) GPU kernels")
    stop_timeout_seconds: int = field(
        600, "after SIGTERM: seconds to save and exit before the process gives up with an error (a lost peer)", ge=1
    )
    prefetch_batches: int = field(2, "batches kept on the device ahead of the step", ge=1)
    loss: LossConfig = field(LossConfig(), "loss terms")


@dataclasses.dataclass(frozen=True)
class InferenceConfig:
    step_size: float = field(0.5, "sliding-window step as a fraction of the patch", gt=0.0, le=1.0)
    sigma_scale: float = field(0.125, "Gaussian importance sigma as a fraction of the patch", gt=0.0)
    mirror_axes: tuple[int, ...] | None = field(None, "spatial axes mirrored at test time; null = all", ge=0)
    batch_size: int = field(2, "windows per forward pass", ge=1)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = field(-1, "devices along the data-parallel axis (-1 = the rest)", ge=-1)
    spatial: int = field(
        1, "devices along the spatial-parallel axis (splits the first patch axis; -1 = the rest)", ge=-1
    )
    fsdp_min_size: int | None = field(
        None, "split parameters with at least this many elements over data; null = replicate", ge=1
    )


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    enabled: bool = field(False, "call jax.distributed.initialize() (multi-host)")
    coordinator_address: str | None = field(None, "host:port of process 0; null = auto-detect (Cloud TPU, SLURM)")
    num_processes: int | None = field(None, "number of processes (with coordinator_address)", ge=1)
    process_id: int | None = field(None, "this process's id (with coordinator_address)", ge=0)
    heartbeat_timeout_seconds: int = field(
        100, "seconds without a peer's heartbeat before every process stops with an error (a lost host)", ge=1
    )
    shutdown_timeout_seconds: int = field(
        60, "seconds a finishing (or failing) process waits for its peers at exit before it leaves anyway", ge=1
    )


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """nnU-Net v2's augmentation (see :mod:`medseg_jax.augment`): each probability is per sample; ranges
    marked "(nnU-Net BGContrast)" draw below and above 1 with equal probability."""

    mode: Literal["device", "cpu", "none"] = field(
        "device", "where augmentation runs: inside the jitted step (device), in the loader (cpu), or not at all (none)"
    )
    rotation_probability: float = field(0.2, "probability of a random rotation")
    rotation_degrees: float | None = field(
        None, "largest rotation per axis plane in degrees; null = nnU-Net's 180 in 2D and in-plane, 30 in 3D", ge=0.0
    )
    in_plane_only: bool | None = field(
        None,
        "3D: rotate, scale and deform only in the plane of the two larger patch sides, the same for every slice "
        "(nnU-Net's dummy-2D augmentation for anisotropic data); null = when the largest patch side exceeds 3x the "
        "smallest (nnU-Net's rule)",
    )
    scale_probability: float = field(
        0.2, "probability of random scaling (one factor for all axes, or for the in-plane axes)"
    )
    scale_range: tuple[float, float] = field(
        (0.7, 1.4), "range of the factor on sampling coordinates (> 1 shows more context: structures look smaller)"
    )
    elastic_probability: float = field(0.0, "probability of an elastic deformation (off in nnU-Net v2)")
    elastic_control_spacing: int = field(16, "voxels between the control points of the elastic B-spline", ge=1)
    elastic_magnitude: tuple[float, float] = field(
        (0.0, 4.0), "range of the largest control-point displacement in voxels"
    )
    mirror_probability: float = field(0.5, "probability of mirroring, drawn per axis")
    mirror_axes: tuple[int, ...] | None = field(None, "spatial axes that may be mirrored; null = all", ge=0)
    label_interpolation: Literal["nearest", "linear"] = field(
        "nearest", "labels: nearest neighbour, or linear on the one-hot encoding then argmax"
    )
    noise_probability: float = field(0.1, "probability of additive Gaussian noise")
    noise_std: tuple[float, float] = field(
        (0.0, 0.1), "range of the noise standard deviation (nnU-Net names it variance but uses it as the std)"
    )
    blur_probability: float = field(0.2, "probability of Gaussian blur")
    blur_channel_probability: float = field(0.5, "probability that a channel is blurred when blur is applied")
    blur_sigma: tuple[float, float] = field((0.5, 1.0), "range of the blur sigma in voxels, drawn per channel and axis")
    brightness_probability: float = field(0.15, "probability of a multiplicative brightness change")
    brightness_range: tuple[float, float] = field(
        (0.75, 1.25), "range of the brightness multiplier per channel (nnU-Net BGContrast)"
    )
    contrast_probability: float = field(0.15, "probability of a contrast change (range preserved)")
    contrast_range: tuple[float, float] = field(
        (0.75, 1.25), "range of the contrast factor per channel (nnU-Net BGContrast)"
    )
    low_resolution_probability: float = field(0.25, "probability of simulated low resolution")
    low_resolution_channel_probability: float = field(
        0.5, "probability that a channel is degraded when low resolution is applied"
    )
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
# coerced below.


def _type_name(tp) -> str:
    """Readable name of an annotation for messages: ``int or 'auto'``, ``tuple[int, ...]``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it (lists -> tuples, "3e-4" -> float)."""
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
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
        for arg in non_null:
            try:
                return coerce(value, arg, key)
            except ConfigError:
                continue
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
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None or not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
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
    bounds = {f.name: f.metadata.get("bounds", {}) for f in dataclasses.fields(cls)}
    values = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        values[name] = coerce(value, hints[name], key)
        check_bounds(values[name], bounds[name], key)
    return cls(**values)


_BOUND_TESTS = {
    "ge": (lambda v, b: v >= b, ">="),
    "gt": (lambda v, b: v > b, ">"),
    "le": (lambda v, b: v <= b, "<="),
    "lt": (lambda v, b: v < b, "<"),
}


def check_bounds(value: Any, bounds: dict, key: str) -> None:
    """Raise :class:`ConfigError` naming ``key`` when ``value`` (or a number nested in it) is outside
    ``bounds`` (``{"ge": 0, "lt": 1}``); None (a null field) is always allowed."""
    if value is None or not bounds:
        return
    if isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            check_bounds(item, bounds, f"{key}[{i}]")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    for name, bound in bounds.items():
        test, symbol = _BOUND_TESTS[name]
        if not test(value, bound):
            raise ConfigError(f"{key}: {value!r} must be {symbol} {bound!r}")


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


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), cls=RunConfig):
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
