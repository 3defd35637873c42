"""The ``onednn`` convolution: oneDNN's CPU convolutions (the ones PyTorch runs) as XLA custom calls.

XLA:CPU's own 3D convolutions, and above all their gradients, are several times slower than oneDNN's
on x86 (``benchmarks/RESULTS.md``). This implementation calls oneDNN through ``jax.ffi``: three
handlers (forward, input gradient, weight gradient; ``native/onednn_conv.cc``) tied together by a
``custom_vjp``, channels-last in and out like every other implementation, bias added by XLA (so it
fuses with what follows).

Optional: it needs oneDNN's library and headers (``pip install "medseg-jax[onednn]"``, the PyPI
packages ``onednn-cpu-gomp`` and ``onednn-devel-cpu-gomp``; or ``$MEDSEG_ONEDNN_ROOT`` pointing at a
prefix with ``include/oneapi/dnnl/dnnl.hpp`` and ``lib/libdnnl.so``) and a C++ compiler (``$CXX``,
else ``g++``). The extension is compiled on first use against the running jaxlib's FFI headers and
kept in the cache folder (``$MEDSEG_JAX_CACHE`` or ``~/.cache/medseg_jax``), one build per source,
jaxlib and oneDNN; nothing is built at install time, so installing medseg-jax never needs a compiler.
:func:`unavailable_reason` says why it cannot be used where it cannot, and ``"auto"`` then keeps the
XLA path (:mod:`medseg_jax.kernels.select`).

CPU only, float32 and bfloat16 (oneDNN accumulates in float32); other dtypes take ``conv_xla``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from medseg_jax.cache import cache_dir
from medseg_jax.kernels.conv import add_bias, conv_output_size, conv_xla
from medseg_jax.kernels.select import backend_name

SOURCE = Path(__file__).parent / "native" / "onednn_conv.cc"
LIBRARY_NAME = "libmedseg_onednn_conv.so"
# The PyPI distributions that carry oneDNN's headers, in order of preference (CPU-only GNU OpenMP
# builds first: no SYCL or Intel compiler runtime to drag in).
DEVEL_DISTRIBUTIONS = ("onednn-devel-cpu-gomp", "onednn-devel-cpu-tbb", "onednn-devel")
TARGETS = {
    "forward": "MedsegOnednnConvForward",
    "backward_data": "MedsegOnednnConvBackwardData",
    "backward_weights": "MedsegOnednnConvBackwardWeights",
}
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


class OnednnUnavailable(RuntimeError):
    """oneDNN's library, its headers or a compiler is missing, or the build failed (the message says
    which, and what to install)."""


def installed_prefix() -> Path:
    """The prefix holding ``include/oneapi/dnnl/dnnl.hpp`` and ``lib/libdnnl.so``."""
    if os.environ.get("MEDSEG_ONEDNN_ROOT"):
        root = Path(os.environ["MEDSEG_ONEDNN_ROOT"])
        if not (root / "include" / "oneapi" / "dnnl" / "dnnl.hpp").is_file():
            raise OnednnUnavailable(f"MEDSEG_ONEDNN_ROOT={root} has no include/oneapi/dnnl/dnnl.hpp")
        return root
    for name in DEVEL_DISTRIBUTIONS:
        try:
            files = importlib.metadata.distribution(name).files or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for file in files:
            if str(file).replace("\\", "/").endswith("include/oneapi/dnnl/dnnl.hpp"):
                header = Path(str(file.locate())).resolve()
                return header.parents[3]
    raise OnednnUnavailable(
        'oneDNN is not installed: pip install "medseg-jax[onednn]" (or set MEDSEG_ONEDNN_ROOT to a prefix '
        "with include/oneapi/dnnl/dnnl.hpp and lib/libdnnl.so)"
    )


def build_key(prefix: Path) -> str:
    """What a build depends on: the source, the FFI headers of this jaxlib and the oneDNN library."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(jax.ffi.include_dir().encode())
    digest.update(importlib.metadata.version("jaxlib").encode())
    library = prefix / "lib" / "libdnnl.so"
    digest.update(f"{library.resolve()}:{library.stat().st_size if library.exists() else 0}".encode())
    return digest.hexdigest()[:16]


def compile_command(prefix: Path, output: Path) -> list[str]:
    compiler = os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None:
        raise OnednnUnavailable(f"no C++ compiler {compiler!r} on PATH to build the oneDNN convolution (set CXX)")
    library_dir = prefix / "lib"
    return [
        compiler,
        "-O2",
        "-std=c++17",
        "-shared",
        "-fPIC",
        "-w",  # the FFI headers warn under -Wreturn-type; nothing of ours to see
        f"-I{jax.ffi.include_dir()}",
        f"-I{prefix / 'include'}",
        str(SOURCE),
        "-o",
        str(output),
        f"-L{library_dir}",
        "-ldnnl",
        f"-Wl,-rpath,{library_dir}",
    ]


def build() -> Path:
    """The compiled extension, built now unless a build for this source, jaxlib and oneDNN exists.
    Compiled to a temporary name and renamed, so concurrent first uses never load half a file."""
    prefix = installed_prefix()
    if not (prefix / "lib" / "libdnnl.so").exists():
        raise OnednnUnavailable(
            f"oneDNN's headers are in {prefix} but lib/libdnnl.so is not: pip install onednn-cpu-gomp"
        )
    target = cache_dir() / "onednn" / build_key(prefix) / LIBRARY_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        partial = Path(scratch) / LIBRARY_NAME
        result = subprocess.run(compile_command(prefix, partial), capture_output=True, text=True)
        if result.returncode != 0:
            tail = "\n".join(result.stderr.strip().splitlines()[-15:])
            raise OnednnUnavailable(f"building the oneDNN convolution failed:\n{tail}")
        os.replace(partial, target)
    return target


@functools.cache
def load() -> ctypes.CDLL:
    """Build (first time) and load the extension and register its handlers with XLA:CPU."""
    library = ctypes.CDLL(str(build()))
    for name, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(f"medseg_onednn_conv_{name}", jax.ffi.pycapsule(getattr(library, symbol)), "cpu")
    library.MedsegOnednnVersion.restype = ctypes.c_char_p
    return library


@functools.cache
def unavailable_reason() -> str | None:
    """``None`` when the oneDNN convolution can run here, else why not (one line or a build log).
    Installed but unusable (no compiler, a failed build) is also said once as a warning: whoever
    installed the extra expects it to run, and ``"auto"`` quietly falls back to XLA."""
    try:
        installed_prefix()
    except OnednnUnavailable as error:
        return str(error)  # not installed: nothing to warn about
    try:
        load()
    except (OnednnUnavailable, OSError) as error:
        warnings.warn(
            f"oneDNN is installed but its convolution cannot be used; XLA's runs instead: {error}", stacklevel=2
        )
        return str(error)
    return None


def available() -> bool:
    return unavailable_reason() is None


def version() -> str:
    """oneDNN's version and commit, as the loaded library reports it."""
    return load().MedsegOnednnVersion().decode()


def padding(size: Sequence[int], kernel: Sequence[int], strides: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """``k // 2`` before each axis and what is left after it for the output size of the U-Net's conv
    (less than ``k // 2`` where a stride leaves the last voxels unread)."""
    low = [k // 2 for k in kernel]
    high = [(conv_output_size(n, k, s) - 1) * s + k - n - lo for n, k, s, lo in zip(size, kernel, strides, low)]
    return np.asarray(low, np.int64), np.asarray(high, np.int64)


def result_shape(pass_name: str, first_shape, second_shape, strides, spatial_size, kernel_size) -> tuple[int, ...]:
    """The shape one pass returns for operands of the given (possibly per-device) shapes."""
    if pass_name == "forward":  # (x, kernel) -> y
        sizes = [conv_output_size(n, k, s) for n, k, s in zip(first_shape[1:-1], kernel_size, strides)]
        return (first_shape[0], *sizes, second_shape[-1])
    if pass_name == "backward_data":  # (dy, kernel) -> dx
        return (first_shape[0], *spatial_size, second_shape[-2])
    return (*kernel_size, first_shape[-1], second_shape[-1])  # backward_weights: (x, dy) -> dkernel


def ffi_pass(pass_name: str, first, second, strides, spatial_size, kernel_size):
    """One pass as one custom call on whole (unsharded, or per-device) operands."""
    load()
    low, high = padding(spatial_size, kernel_size, strides)
    shape = result_shape(pass_name, first.shape, second.shape, strides, spatial_size, kernel_size)
    return jax.ffi.ffi_call(
        f"medseg_onednn_conv_{pass_name}", jax.ShapeDtypeStruct(shape, first.dtype), vmap_method="sequential"
    )(first, second, strides=np.asarray(strides, np.int64), padding_low=low, padding_high=high)


def sharding_rule(pass_name: str, spatial: int) -> tuple[str, dict]:
    """Shardy's einsum-like rule for a pass: the batch may be sharded, nothing else (a conv needs its
    whole window and every channel); the weight gradient sums over the batch."""
    axes = lambda prefix: " ".join(f"{prefix}{i}" for i in range(spatial))
    x, y, k = f"b {axes('i')} c", f"b {axes('j')} o", f"{axes('k')} c o"
    rule = {"forward": f"{x}, {k} -> {y}", "backward_data": f"{y}, {k} -> {x}", "backward_weights": f"{x}, {y} -> {k}"}
    # Every factor but the batch, in order of first appearance (Shardy wants them sorted so).
    factors = dict.fromkeys(rule[pass_name].replace(",", " ").replace("->", " ").split())
    options: dict = {"need_replication_factors": tuple(f for f in factors if f != "b")}
    if pass_name == "backward_weights":
        options["reduction_factors"] = ("b",)
    return rule[pass_name], options


@functools.cache
def sharded_pass(pass_name: str, strides: tuple, spatial_size: tuple, kernel_size: tuple):
    """The pass under ``jit`` with sharded operands: split over the batch like the rest of a data-parallel
    step (a plain custom call would be gathered onto every device and computed whole on each).
    Batch-sharded activations stay so; anything else sharded (a spatial axis) is gathered first; the
    weight gradient is summed over the batch shards."""
    from jax.experimental.custom_partitioning import custom_partitioning
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    local = functools.partial(ffi_pass, pass_name, strides=strides, spatial_size=spatial_size, kernel_size=kernel_size)
    weights_gradient = pass_name == "backward_weights"

    def shardings(mesh, arg_shapes):
        spec = arg_shapes[0].sharding.spec
        batch = spec[0] if len(spec) else None
        by_batch, replicated = NamedSharding(mesh, P(batch)), NamedSharding(mesh, P())
        arguments = (by_batch, by_batch) if weights_gradient else (by_batch, replicated)
        return batch, arguments, replicated if weights_gradient else by_batch

    def infer_sharding_from_operands(mesh, arg_shapes, shape):
        return shardings(mesh, arg_shapes)[2]

    def partition(mesh, arg_shapes, shape):
        batch, arguments, result = shardings(mesh, arg_shapes)

        def per_device(first, second):
            out = local(first, second)
            return jax.lax.psum(out, batch) if weights_gradient and batch is not None else out

        return mesh, per_device, result, arguments

    fn = custom_partitioning(lambda first, second: local(first, second))
    rule, options = sharding_rule(pass_name, len(strides))
    fn.def_partition(
        partition=partition, infer_sharding_from_operands=infer_sharding_from_operands, sharding_rule=rule, **options
    )
    return fn


def call(pass_name: str, first, second, strides, spatial_size, kernel_size):
    fn = sharded_pass(pass_name, tuple(strides), tuple(spatial_size), tuple(kernel_size))
    return fn(first, second)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_no_bias(x, kernel, strides: tuple[int, ...]):
    return call("forward", x, kernel, strides, x.shape[1:-1], kernel.shape[: x.ndim - 2])


def conv_no_bias_forward(x, kernel, strides):
    return conv_no_bias(x, kernel, strides), (x, kernel)


def conv_no_bias_backward(strides, residuals, dy):
    x, kernel = residuals
    spatial = x.ndim - 2
    taps = kernel.shape[:spatial]
    dy = dy.astype(x.dtype)
    dx = call("backward_data", dy, kernel, strides, x.shape[1:-1], taps)
    dk = call("backward_weights", x, dy, strides, x.shape[1:-1], taps)
    return dx, dk


conv_no_bias.defvjp(conv_no_bias_forward, conv_no_bias_backward)


def conv(x, kernel, bias, strides: Sequence[int]):
    """The U-Net's conv (see :mod:`medseg_jax.kernels.conv`) through oneDNN; dtypes oneDNN does not
    take (anything but float32 and bfloat16) run as ``conv_xla``."""
    if backend_name() != "cpu":
        raise OnednnUnavailable(f"the onednn convolution runs on CPU only (JAX's backend is {jax.default_backend()})")
    reason = unavailable_reason()
    if reason is not None:
        raise OnednnUnavailable(reason)
    if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
        return conv_xla(x, kernel, bias, strides)
    y = conv_no_bias(x, kernel.astype(x.dtype), tuple(int(s) for s in strides))
    return add_bias(y, bias)
