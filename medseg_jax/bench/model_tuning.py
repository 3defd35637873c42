"""A model's own layers: the conv / upsampling calls it makes, and the implementations that run them
fastest on the machine at hand.

This sits above both :mod:`medseg_jax.models` and :mod:`medseg_jax.kernels`: it reads a model's
layers, and times them with the per-op autotuner (:mod:`medseg_jax.kernels.autotune`, timings cached
on disk). Kernels never import models, and importing a model never imports this.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from medseg_jax.kernels.autotune import OpCase, autotune_case, default_candidates
from medseg_jax.kernels.select import resolve
from medseg_jax.models.blocks import Conv, Upsample

# The model field that chooses each operation's implementation.
IMPLEMENTATION_FIELDS = {"conv": "conv_implementation", "upsample": "upsample_implementation"}


def layer_cases(model, input_shape: Sequence[int], dtype: str = "float32", backward: bool = True) -> list[OpCase]:
    """Every conv and upsampling call the model makes on an input of ``input_shape`` (one entry per
    call, so repeated shapes count once per layer), to be timed with gradients (``backward``, for
    training) or forward only (inference). Found by intercepting module calls during an abstract
    ``init``: nothing is computed."""
    found: list[OpCase] = []

    def record(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, (Conv, Upsample)):
            x_shape = tuple(args[0].shape)
            if isinstance(module, Conv):
                found.append(
                    OpCase(
                        "conv",
                        x_shape,
                        (*module.kernel_size, x_shape[-1], module.features),
                        tuple(module.strides),
                        dtype,
                        backward,
                    )
                )
            else:
                found.append(
                    OpCase(
                        "upsample",
                        x_shape,
                        (*module.strides, x_shape[-1], module.features),
                        tuple(module.strides),
                        dtype,
                        backward,
                    )
                )
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32))
    return found


def autotune_model(
    model,
    input_shape: Sequence[int],
    *,
    candidates: dict[str, Sequence[str]] | None = None,
    cache: str | os.PathLike | None = None,
    runs: int = 3,
    refresh: bool = False,
    backward: bool = True,
):
    """``model`` (a :class:`medseg_jax.models.UNet`) with ``conv_implementation`` and
    ``upsample_implementation`` set to the candidates with the least total time over the model's own
    layers at ``input_shape`` (forward + backward, or the forward pass alone with ``backward=False``
    for inference; see :func:`medseg_jax.kernels.autotune.time_case`), and a report
    ``{operation: {"chosen": name, "total_seconds": {name: s}, "cases": n}}``.

    Only operations whose model field is ``"auto"`` are tuned; explicit choices are kept.
    """
    dtype = jnp.dtype(model.dtype).name
    report, changes = {}, {}
    cases = layer_cases(model, input_shape, dtype, backward)
    for operation, field_name in IMPLEMENTATION_FIELDS.items():
        if getattr(model, field_name) != "auto":
            continue
        names = list((candidates or {}).get(operation) or default_candidates(operation, len(input_shape) - 2))
        totals = dict.fromkeys(names, 0.0)
        op_cases = [c for c in cases if c.operation == operation]
        for case, count in collections.Counter(op_cases).items():  # each distinct shape timed once
            _, seconds = autotune_case(case, names, cache=cache, runs=runs, refresh=refresh)
            for name in names:
                totals[name] += count * seconds[name]
        chosen = min(totals, key=totals.__getitem__) if op_cases else resolve(operation, "auto")
        changes[field_name] = chosen
        report[operation] = {"chosen": chosen, "total_seconds": totals, "cases": len(op_cases)}
    return model.clone(**changes), report
