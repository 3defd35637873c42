"""What the suite measures: network topologies per preset, and comparison groups per operation.

FLOP convention (``flops_analytic``): 2 FLOPs per multiply-add, over every kernel tap including
taps that fall on zero padding (the PyTorch / fvcore convention); conv forward
``2 N prod(S_out) prod(k) C_in C_out``, upsampling ``2 N prod(S_in) prod(s) C_in C_out``; a backward
pass counts twice its forward (input and weight gradients). Normalisation, activations, loss and
optimiser are not counted. XLA's own count of the compiled program (``flops_xla``: padded taps
excluded, elementwise work included) is reported beside it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from medseg_jax.bench.model_tuning import layer_cases
from medseg_jax.bench.timing import Prepared, prepare_jax
from medseg_jax.kernels.autotune import OpCase, case_arguments, default_candidates, time_case
from medseg_jax.kernels.conv import conv_output_size
from medseg_jax.kernels.select import implementations, resolve
from medseg_jax.models import UNet
from medseg_jax.models.blocks import ConvNormAct


@dataclasses.dataclass(frozen=True)
class Topology:
    """A PlainConvUNet training setup: patch, batch, features and strides per stage (kernel 3, two
    convs per stage in encoder and decoder, deep supervision, 1 input channel, 3 classes)."""

    patch: tuple[int, ...]
    batch: int
    features: tuple[int, ...]
    strides: tuple[tuple[int, ...], ...]
    num_classes: int = 3
    in_channels: int = 1

    @property
    def dims(self) -> int:
        return len(self.patch)

    def unet(self, dtype: str, conv: str = "auto", upsample: str = "auto", deep_supervision: bool = True) -> UNet:
        return UNet(
            num_classes=self.num_classes,
            spatial_dims=self.dims,
            n_stages=len(self.features),
            features=self.features,
            strides=self.strides,
            deep_supervision=deep_supervision,
            conv_implementation=conv,
            upsample_implementation=upsample,
            dtype=jnp.dtype(dtype),
            param_dtype=jnp.float32,
        )

    def input_shape(self) -> tuple[int, ...]:
        return (self.batch, *self.patch, self.in_channels)


def nnunet_strides(dims: int, stages: int) -> tuple[tuple[int, ...], ...]:
    return tuple(((1 if i == 0 else 2),) * dims for i in range(stages))


# nnU-Net's plans for these patches: stages until the lowest resolution is 4 voxels, features
# min(32 * 2^i, 512 (2D) / 320 (3D)). "smoke" keeps the structure at toy sizes for CI.
PRESETS: dict[str, dict[int, Topology]] = {
    "smoke": {
        2: Topology((16, 16), 2, (4, 8), nnunet_strides(2, 2)),
        3: Topology((8, 8, 8), 1, (4, 8), nnunet_strides(3, 2)),
    },
    "nnunet": {
        2: Topology((256, 256), 2, (32, 64, 128, 256, 512, 512, 512), nnunet_strides(2, 7)),
        3: Topology((64, 64, 64), 2, (32, 64, 128, 256, 320), nnunet_strides(3, 5)),
    },
}
# CPU inference (TotalSegmentator-style): the 3D network's forward pass over sliding windows of 128^3,
# 6 stages, one and two windows per call.
INFERENCE_FEATURES = (32, 64, 128, 256, 320, 320)
INFERENCE_PRESETS: dict[str, tuple[Topology, ...]] = {
    "smoke": (Topology((16, 16, 16), 1, (4, 8), nnunet_strides(3, 2)),),
    "nnunet": tuple(
        Topology((128, 128, 128), batch, INFERENCE_FEATURES, nnunet_strides(3, len(INFERENCE_FEATURES)))
        for batch in (1, 2)
    ),
}

# Whole-network variants compared in the U-Net groups: (conv, upsample) implementations.
NETWORK_VARIANTS: dict[str, tuple[str, str]] = {
    "medseg-jax default": ("auto", "auto"),
    "xla conv + matmul upsample": ("xla", "matmul"),
    "plain flax (xla conv + conv_transpose)": ("xla", "conv_transpose"),
}
NETWORK_BASELINE = "plain flax (xla conv + conv_transpose)"
# What "auto" runs on CPU without the optional oneDNN convolution (XLA alone).
XLA_ONLY_3D_VARIANT = {"xla-only default (depth_stack conv + matmul upsample)": ("depth_stack", "matmul")}
ALTERNATIVE_3D_VARIANT = {"depth_sum conv + matmul upsample": ("depth_sum", "matmul"), **XLA_ONLY_3D_VARIANT}
TORCH_MEMBER = "pytorch nnU-Net PlainConvUNet"
# --variants: "all" times every formulation; "fast" only the default and its XLA-only fallback (the
# plain-XLA 3D formulations take tens of seconds a step on CPU), against PyTorch where present.
VARIANT_SETS = ("all", "fast")


def network_variants(dims: int, variants: str = "all") -> dict[str, tuple[str, str]]:
    """The variants worth timing: the depth_* convs equal xla below 3 spatial axes."""
    if variants == "fast":
        fallback = (
            XLA_ONLY_3D_VARIANT
            if dims == 3
            else {"xla conv + matmul upsample": NETWORK_VARIANTS["xla conv + matmul upsample"]}
        )
        return {"medseg-jax default": NETWORK_VARIANTS["medseg-jax default"], **fallback}
    return {**NETWORK_VARIANTS, **(ALTERNATIVE_3D_VARIANT if dims == 3 else {})}


def network_baseline(members: dict) -> str:
    """What a network group's ratios are against: PyTorch's nnU-Net where it is measured, else plain
    Flax, else the first member."""
    for name in (TORCH_MEMBER, NETWORK_BASELINE):
        if name in members:
            return name
    return next(iter(members))


def conv_candidates(dims: int) -> list[str]:
    return default_candidates("conv", dims)


@dataclasses.dataclass
class Group:
    """Members compared side by side (same inputs, round-robin timing); ratios are against ``baseline``."""

    name: str
    operation: str
    dims: int
    dtype: str
    shape: str
    baseline: str
    members: dict[str, Callable[[], Prepared]]
    flops_analytic: float | None = None


def conv_flops(case: OpCase) -> float:
    spatial = len(case.strides)
    taps, c_in, c_out = math.prod(case.kernel_shape[:spatial]), case.kernel_shape[-2], case.kernel_shape[-1]
    if case.operation == "upsample":
        return 2.0 * math.prod(case.input_shape[:-1]) * math.prod(case.strides) * c_in * c_out
    out = [conv_output_size(n, k, s) for n, k, s in zip(case.input_shape[1:-1], case.kernel_shape, case.strides)]
    return 2.0 * case.input_shape[0] * math.prod(out) * taps * c_in * c_out


def network_flops(topology: Topology) -> float:
    """Analytic forward FLOPs of the network's convs and upsamplings (1x1 heads included)."""
    model = topology.unet("float32")
    total = sum(conv_flops(c) for c in layer_cases(model, topology.input_shape()))
    heads = 0.0
    size = math.prod(topology.patch)
    for stage in range(len(topology.features) - 1):  # head of decoder stage at encoder stage `stage`
        heads += 2.0 * topology.batch * size * topology.features[stage] * topology.num_classes
        size //= math.prod(topology.strides[stage + 1])
    return total + heads


def describe(shape, kernel=None, strides=None) -> str:
    text = "x".join(map(str, shape))
    if kernel is not None:
        text += f" k{'x'.join(map(str, kernel[:-2]))}->{kernel[-1]}"
    if strides is not None and any(s != 1 for s in strides):
        text += f" s{'x'.join(map(str, strides))}"
    return text


def representative_cases(topology: Topology, dtype: str) -> list[OpCase]:
    """The op shapes that dominate the network: stage-0 conv, the stride-2 entry conv of stage 1,
    a stage-1 inner conv, and the last upsampling (stage 1 -> stage 0)."""
    d, f, b = topology.dims, topology.features, topology.batch
    full, half = topology.patch, tuple(p // s for p, s in zip(topology.patch, topology.strides[1]))
    return [
        OpCase("conv", (b, *full, f[0]), (3,) * d + (f[0], f[0]), (1,) * d, dtype),
        OpCase("conv", (b, *full, f[0]), (3,) * d + (f[0], f[1]), topology.strides[1], dtype),
        OpCase("conv", (b, *half, f[1]), (3,) * d + (f[1], f[1]), (1,) * d, dtype),
        OpCase("upsample", (b, *half, f[1]), topology.strides[1] + (f[1], f[0]), topology.strides[1], dtype),
    ]


def op_group(case: OpCase, backward: bool) -> Group:
    """Every implementation of ``case``'s operation on the same arguments, forward or forward + backward."""
    # Pallas runs interpreted on CPU: timed there only at toy sizes, to keep its path exercised.
    names = [
        n for n in sorted(implementations(case.operation)) if n in default_candidates(case.operation) or _tiny(case)
    ]
    if case.operation == "conv":
        names = conv_candidates(len(case.strides))
    baseline = "xla" if case.operation == "conv" else "conv_transpose"

    def member(name):
        def prepare():
            x, kernel, bias, cotangent = case_arguments(case)
            fn = implementations(case.operation)[name]
            if not backward:
                return prepare_jax(lambda x, k, b: fn(x, k, b, case.strides), x, kernel, bias)

            def forward_backward(x, k, b, ct):
                y, vjp = jax.vjp(lambda x, k: fn(x, k, b, case.strides), x, k)
                return (y, *vjp(ct))

            return prepare_jax(forward_backward, x, kernel, bias, cotangent)

        return prepare

    return Group(
        name=f"{case.operation} {'fwd+bwd' if backward else 'fwd'}",
        operation=case.operation,
        dims=len(case.strides),
        dtype=case.dtype,
        shape=describe(case.input_shape, case.kernel_shape, case.strides),
        baseline=baseline,
        members={n: member(n) for n in names},
        flops_analytic=conv_flops(case) * (3 if backward else 1),
    )


def _tiny(case: OpCase) -> bool:
    """Small enough to time Pallas in interpret mode (the smoke preset) without waiting minutes."""
    return math.prod(case.input_shape) <= 1 << 16


def conv_block_group(topology: Topology, dtype: str) -> Group:
    """ConvNormAct (conv -> instance norm (f32 statistics) -> leaky ReLU), forward + backward with
    respect to input and parameters, for every conv implementation."""
    d, f = topology.dims, topology.features
    shape = (topology.batch, *topology.patch, f[0])

    def member(name):
        def prepare():
            block = ConvNormAct(f[0], (3,) * d, (1,) * d, conv_implementation=name, dtype=jnp.dtype(dtype))
            x = jax.random.normal(jax.random.key(0), shape, jnp.dtype(dtype))
            params = block.init(jax.random.key(1), x)
            ct = jax.random.normal(jax.random.key(2), shape, jnp.dtype(dtype))

            def forward_backward(params, x, ct):
                y, vjp = jax.vjp(block.apply, params, x)
                return (y, *vjp(ct))

            return prepare_jax(forward_backward, params, x, ct)

        return prepare

    case = OpCase("conv", shape, (3,) * d + (f[0], f[0]), (1,) * d, dtype)
    return Group(
        "conv block fwd+bwd",
        "conv_block",
        d,
        dtype,
        describe(shape, case.kernel_shape),
        "xla",
        {n: member(n) for n in conv_candidates(d)},
        conv_flops(case) * 3,
    )


def resolved_variant(variant: tuple[str, str]) -> str:
    return f"conv={resolve('conv', variant[0])}, upsample={resolve('upsample', variant[1])}"


def random_batch(topology: Topology, dtype: str) -> dict:
    keys = jax.random.split(jax.random.key(3))
    image = jax.random.normal(keys[0], topology.input_shape(), jnp.float32)
    label = jax.random.randint(keys[1], topology.input_shape()[:-1], 0, topology.num_classes)
    return {"image": image, "label": label}


def forward_group(
    topology: Topology,
    dtype: str,
    torch_member: Callable[[], Prepared] | None = None,
    variants: str = "all",
    name: str = "U-Net forward",
) -> Group:
    def member(variant):
        def prepare():
            model = topology.unet(dtype, *variant, deep_supervision=False)
            x = random_batch(topology, dtype)["image"]
            params = jax.jit(model.init)(jax.random.key(0), x)
            return prepare_jax(model.apply, params, x)

        return prepare

    members = {label: member(v) for label, v in network_variants(topology.dims, variants).items()}
    if torch_member is not None:
        members[TORCH_MEMBER] = torch_member
    return Group(
        name,
        "unet_forward",
        topology.dims,
        dtype,
        describe(topology.input_shape()) + f" stages={len(topology.features)}",
        network_baseline(members),
        members,
        network_flops(topology),
    )


def train_setup(topology: Topology, dtype: str):
    """``(optimizer, state, batch)`` shared by every variant (the parameter tree does not depend on the
    implementations): nnU-Net's optimiser (SGD Nesterov 0.99, lr 1e-2, weight decay 3e-5, gradient
    clip 12) and a random batch."""
    from medseg_jax.config import TrainConfig
    from medseg_jax.train.optim import make_optimizer
    from medseg_jax.train.state import create_train_state

    model = topology.unet(dtype)
    optimizer = make_optimizer(TrainConfig(steps=1000))
    batch = random_batch(topology, dtype)
    state = jax.jit(lambda key, x: create_train_state(model, optimizer, key, x))(jax.random.key(0), batch["image"])
    return optimizer, state, batch


def train_step_group(
    topology: Topology, dtype: str, torch_member: Callable[[], Prepared] | None, variants: str = "all"
) -> Group:
    """The library's pure train step (Dice + CE deep-supervision loss) per network variant."""
    from medseg_jax.config import LossConfig
    from medseg_jax.train.step import make_train_step

    setup: list = []  # built on first use, then shared

    def member(variant):
        def prepare():
            if not setup:
                setup.extend(train_setup(topology, dtype))
            optimizer, state, batch = setup
            step = make_train_step(topology.unet(dtype, *variant), optimizer, LossConfig())
            return prepare_jax(step, state, batch)

        return prepare

    members = {name: member(v) for name, v in network_variants(topology.dims, variants).items()}
    if torch_member is not None:
        members[TORCH_MEMBER] = torch_member
    return Group(
        "train step",
        "train_step",
        topology.dims,
        dtype,
        describe(topology.input_shape()) + f" stages={len(topology.features)}",
        network_baseline(members),
        members,
        3 * network_flops(topology),
    )


def sliding_window_group(topology: Topology, dtype: str) -> Group | None:
    """Sliding-window inference (Gaussian blending, step 0.5, no mirroring, 2 windows per batch) over
    one image of 1.5x the patch per axis. The first call includes compilation (``compile_s`` is the
    first call's seconds minus the median)."""
    try:
        from medseg_jax.inference.sliding_window import sliding_window
    except ImportError:
        return None
    image_shape = tuple(int(p * 1.5) for p in topology.patch) + (topology.in_channels,)

    def member(variant):
        def prepare():
            model = topology.unet(dtype, *variant, deep_supervision=False)
            image = jax.random.normal(jax.random.key(0), image_shape, jnp.float32)
            params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, *topology.patch, topology.in_channels)))
            run = lambda: jax.block_until_ready(
                sliding_window(
                    model.apply, image, topology.patch, params=params, mirror_axes=(), num_classes=topology.num_classes
                )
            )
            return Prepared(run, {})

        return prepare

    return Group(
        "sliding window",
        "sliding_window",
        topology.dims,
        dtype,
        describe(image_shape) + f" patch={'x'.join(map(str, topology.patch))}",
        NETWORK_BASELINE,
        {name: member(v) for name, v in network_variants(topology.dims).items()},
    )


def layer_profile(topology: Topology, dtype: str, variant: tuple[str, str], runs: int) -> list[dict]:
    """Where a training step's time goes: every distinct conv / upsampling layer shape of the network,
    forward + backward with the variant's implementation, times its number of layers."""
    import collections

    model = topology.unet(dtype, *variant)
    rows = []
    for case, count in collections.Counter(layer_cases(model, topology.input_shape(), dtype)).items():
        name = resolve(case.operation, variant[0] if case.operation == "conv" else variant[1])
        seconds = time_case(case, [name], runs)[name]
        rows.append(
            {
                "operation": case.operation,
                "implementation": name,
                "count": count,
                "shape": describe(case.input_shape, case.kernel_shape, case.strides),
                "seconds_each": seconds,
                "seconds_total": count * seconds,
                "flops_analytic": 3 * conv_flops(case) * count,
            }
        )
    return rows
