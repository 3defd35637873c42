"""Which implementation of an operation runs: explicit names, and what ``"auto"`` means per backend.

``"auto"`` resolves at trace time to a fixed choice per backend and jax line (no timing, so models stay
pure and every trace of the same model on one machine gives the same program): the fastest
implementations measured for the U-Net's shapes (``benchmarks/RESULTS.md``) that can run here (the
optional oneDNN convolution only where it is installed; its first use may build it). For a measured
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

# What "auto" resolves to: per backend and jax line (major.minor), the implementations fastest first;
# the first that can run here is taken. Measured on both CPU lines (benchmarks/RESULTS.md, "Kernels"):
# - CPU: oneDNN's convolutions (custom calls, optional extra) beat every XLA formulation, 2D and 3D,
#   forward and gradients (3-6x in 3D). Without them, XLA's 3D conv gradients are several times slower
#   than its 2D ones (a strided 3D conv's input gradient ~16x), so 3D convs run as 2D convs over
#   depth-stacked channels (depth_stack, ahead of depth_sum on both lines). lax.conv_transpose's
#   gradient is slow everywhere (lhs dilation), so upsampling is a matmul.
# - GPU / TPU: the vendor convolutions as they are; the Pallas upsampling is a candidate for
#   autotuning there, not a default, until it is measured (benchmarks/accelerator.sh).
# A jax line with no entry of its own takes the nearest measured line's.
AUTO_PREFERENCES: dict[str, dict[str, dict[str, tuple[str, ...]]]] = {
    "cpu": {
        "0.10": {"conv": ("onednn", "depth_stack"), "upsample": ("matmul",)},
        "0.12": {"conv": ("onednn", "depth_stack"), "upsample": ("matmul",)},
    },
    "gpu": {"0.10": {"conv": ("xla",), "upsample": ("matmul",)}},
    "tpu": {"0.10": {"conv": ("xla",), "upsample": ("matmul",)}},
}
FALLBACK_PREFERENCES: dict[str, tuple[str, ...]] = {"conv": ("xla",), "upsample": ("matmul",)}


def jax_line(version: str | None = None) -> tuple[int, int]:
    """``(major, minor)`` of a jax version string (default: the running jax's)."""
    major, minor = (version or jax.__version__).split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def preferences(operation: str, backend: str | None = None, version: str | None = None) -> tuple[str, ...]:
    """The implementations ``"auto"`` tries for ``operation``, fastest first, on ``backend`` and the
    jax line of ``version`` (defaults: JAX's default backend, the running jax)."""
    implementations(operation)
    by_line = AUTO_PREFERENCES.get(backend_name(backend))
    if not by_line:
        return FALLBACK_PREFERENCES[operation]
    major, minor = jax_line(version)
    distance = lambda measured: abs((jax_line(measured)[0] - major) * 1000 + jax_line(measured)[1] - minor)
    nearest = min(by_line, key=lambda measured: (distance(measured), measured))
    return by_line[nearest][operation]


def unavailable_reason(operation: str, implementation: str, backend: str | None = None) -> str | None:
    """Why ``implementation`` cannot run here (``None`` when it can). Only the optional oneDNN
    convolution can be missing (it is imported, and built on first use, only when asked about)."""
    if operation == "conv" and implementation == "onednn":
        if backend_name(backend) != "cpu":
            return "the onednn convolution runs on CPU only"
        from medseg_jax.kernels import onednn

        return onednn.unavailable_reason()
    return None


def cpu_has_bfloat16(cpuinfo: str | None = None) -> bool:
    """Whether this x86 CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX), from
    ``/proc/cpuinfo``'s flags (False where that file does not exist)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as file:
                cpuinfo = file.read()
        except OSError:
            return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_compute_dtype(backend: str | None = None) -> str:
    """What ``model.dtype: auto`` means: ``"bfloat16"`` (float32 parameters, statistics and loss) where
    it was measured faster at the same accuracy -- a CPU with native bfloat16 running the oneDNN
    convolution (``benchmarks/RESULTS.md``) -- else ``"float32"``. GPU / TPU stay float32 until the
    accelerator campaign has measured them."""
    if backend_name(backend) != "cpu" or not cpu_has_bfloat16():
        return "float32"
    return "bfloat16" if unavailable_reason("conv", "onednn", backend) is None else "float32"


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
    """What ``"auto"`` means for ``operation`` on ``backend`` (default: JAX's default backend): the
    first of :func:`preferences` that can run here."""
    choices = preferences(operation, backend)
    for name in choices:
        if unavailable_reason(operation, name, backend) is None:
            return name
    return FALLBACK_PREFERENCES[operation][0]


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
