"""Which implementation of an operation runs: explicit names, and what ``"auto"`` means per backend.

``"auto"`` resolves at trace time to a fixed per-backend default (no timing, no file I/O, so models
stay pure and every trace of the same model gives the same program). The defaults below are the
fastest implementations measured for the U-Net's shapes (``benchmarks/RESULTS.md``); for a measured
choice on the machine at hand, :func:`medseg_jax.bench.model_tuning.autotune_model` times the
candidates for a model's own layer shapes (per-op timings and their cache:
:mod:`medseg_jax.kernels.autotune`), and returns the model with explicit implementation names.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from medseg_jax.kernels.conv import CONV_IMPLEMENTATIONS
from medseg_jax.kernels.upsample import UPSAMPLE_IMPLEMENTATIONS

OPERATIONS: dict[str, dict[str, Callable]] = {
    "conv": CONV_IMPLEMENTATIONS,
    "upsample": UPSAMPLE_IMPLEMENTATIONS,
}

# What "auto" resolves to. CPU: XLA's 3D conv gradients are several times slower than its 2D ones
# (a strided 3D conv's input gradient ~16x), so 3D convs run as 2D convs over depth-stacked channels
# (depth_stack: fastest in the nnU-Net 3D training step, ahead of depth_sum); lax.conv_transpose's
# gradient is slow everywhere (lhs dilation), so upsampling is a matmul. GPU / TPU: the vendor
# convolutions are used as they are; the Pallas upsampling is a candidate for autotuning there, not a
# default, until it is measured.
BACKEND_DEFAULTS: dict[str, dict[str, str]] = {
    "cpu": {"conv": "depth_stack", "upsample": "matmul"},
    "gpu": {"conv": "xla", "upsample": "matmul"},
    "tpu": {"conv": "xla", "upsample": "matmul"},
}
FALLBACK_DEFAULTS: dict[str, str] = {"conv": "xla", "upsample": "matmul"}


def backend_name(backend: str | None = None) -> str:
    """``"cpu"``, ``"gpu"`` (CUDA or ROCm) or ``"tpu"``; others are returned as JAX names them."""
    name = backend or jax.default_backend()
    return "gpu" if name in ("cuda", "rocm") else name


def pallas_interpreted(backend: str | None = None) -> bool:
    """Pallas compiles for TPU and GPU only; on any other backend its kernels run interpreted
    (correct, orders of magnitude slower: for tests, never worth timing)."""
    return backend_name(backend) not in ("tpu", "gpu")


def implementations(operation: str) -> dict[str, Callable]:
    """The registry of ``operation`` (``"conv"`` or ``"upsample"``)."""
    try:
        return OPERATIONS[operation]
    except KeyError:
        raise ValueError(f"unknown operation {operation!r}; choose one of {sorted(OPERATIONS)}") from None


def default_implementation(operation: str, backend: str | None = None) -> str:
    """What ``"auto"`` means for ``operation`` on ``backend`` (default: JAX's default backend)."""
    implementations(operation)
    return BACKEND_DEFAULTS.get(backend_name(backend), FALLBACK_DEFAULTS)[operation]


def resolve(operation: str, implementation: str, backend: str | None = None) -> str:
    """An explicit implementation name for ``operation``: ``implementation`` itself when it names a
    registered one, the backend's default when it is ``"auto"``; a ValueError naming the choices
    otherwise."""
    registry = implementations(operation)
    if implementation == "auto":
        return default_implementation(operation, backend)
    if implementation not in registry:
        raise ValueError(
            f"unknown {operation} implementation {implementation!r}; choose 'auto' or one of {sorted(registry)}"
        )
    return implementation
