"""The two array backends the augmentation pipeline is written against: JAX (on the accelerator, inside
the jitted step) and NumPy/SciPy (on the host, in loader workers, for comparison).

The pipeline code (:mod:`medseg_jax.augment.pipeline`) is written once against a :class:`Backend`
(an array namespace ``xp`` plus the few operations that differ) and a source of random draws
(:class:`KeyDraws` for JAX, :class:`GeneratorDraws` for NumPy). The two backends differ in one
respect besides the arrays: JAX computes every transform for every sample and selects with
``where`` (static shapes, no data-dependent branches under ``jit``/``vmap``), while NumPy skips the
work of transforms that were not drawn, as a CPU worker should.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import operator
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage


@dataclasses.dataclass(frozen=True)
class Backend:
    """``xp``: the array namespace; ``map_coordinates(array (*in, ...), coords (D, *out), order)`` ->
    ``(*out, ...)``: sampling of the ``D`` leading axes (trailing axes such as channels ride along),
    order 0 (nearest, half rounded up) or 1 (linear), zero outside the array with the value
    interpolating towards zero over the last voxel (SciPy's ``grid-constant``); ``skips_unapplied``:
    whether ``maybe`` may skip work (host) or must compute and select (device)."""

    name: str
    xp: Any
    map_coordinates: Callable
    skips_unapplied: bool

    def maybe(self, flag, transform: Callable, x):
        """``transform(x)`` where ``flag`` (a scalar boolean) holds, else ``x``."""
        if self.skips_unapplied:
            return transform(x) if bool(flag) else x
        return self.xp.where(flag, transform(x), x)

    def along_axis(self, x, axis: int, indices, weights):
        """The 1D linear operator ``y[.., i, ..] = sum_t weights[i, t] * x[.., indices[i, t], ..]`` along
        ``axis`` (``indices``, ``weights``: ``(n, taps)``).

        Host: ``taps`` gathers (cheap for a few taps). Device: one ``(n, n)`` matrix product at full
        float32 precision. A product is what accelerators do best, and XLA does not fuse the producer of
        a matmul operand into it; with gathers or shifted slices instead, XLA's CPU backend fused the
        gather-heavy resampling into every tap and recomputed it for each read (see
        ``benchmarks/bench_augment.py`` for the cost of the whole pipeline).
        """
        xp = self.xp
        if self.skips_unapplied:
            shape = [1] * x.ndim
            shape[axis] = x.shape[axis]
            return sum(
                weights[:, t].reshape(shape) * xp.take(x, indices[:, t], axis=axis) for t in range(indices.shape[1])
            )
        size = x.shape[axis]
        matrix = sum(
            weights[:, t, None] * jax.nn.one_hot(indices[:, t], size, dtype=jnp.float32)
            for t in range(indices.shape[1])
        )
        product = jnp.tensordot(matrix, x, axes=([1], [axis]), precision=jax.lax.Precision.HIGHEST)
        return jnp.moveaxis(product, 0, axis)


def _jax_map_coordinates(array, coordinates, order: int):
    """Like ``jax.scipy.ndimage.map_coordinates(mode="constant")`` but with trailing axes: the indices and
    weights of the ``2^D`` neighbours are computed once and each gather fetches all channels, which
    makes fewer, wider gathers (and a smaller program) than one call per channel."""
    ndim = coordinates.shape[0]
    sizes = array.shape[:ndim]
    trailing = (None,) * (array.ndim - ndim)
    if order == 0:
        index = jnp.floor(coordinates + 0.5).astype(jnp.int32)
        valid = functools.reduce(operator.and_, [(index[d] >= 0) & (index[d] < sizes[d]) for d in range(ndim)])
        values = array[tuple(jnp.clip(index[d], 0, sizes[d] - 1) for d in range(ndim))]
        return jnp.where(valid[(...,) + trailing], values, jnp.zeros((), array.dtype))
    lower = jnp.floor(coordinates)
    fraction = coordinates - lower
    lower = lower.astype(jnp.int32)
    result = 0.0
    for corner in itertools.product((0, 1), repeat=ndim):
        corner_index = [lower[d] + corner[d] for d in range(ndim)]
        valid = functools.reduce(
            operator.and_, [(corner_index[d] >= 0) & (corner_index[d] < sizes[d]) for d in range(ndim)]
        )
        weight = functools.reduce(operator.mul, [fraction[d] if corner[d] else 1 - fraction[d] for d in range(ndim)])
        values = array[tuple(jnp.clip(corner_index[d], 0, sizes[d] - 1) for d in range(ndim))]
        result = result + jnp.where(valid, weight, 0.0)[(...,) + trailing] * values
    # result is an array after the first corner (ndim >= 1); asarray only tells the type checker so.
    return jnp.asarray(result).astype(array.dtype)


def _numpy_map_coordinates(array, coordinates, order: int):
    # 'grid-constant' interpolates towards cval beyond the edge exactly like the JAX version (SciPy's own
    # 'constant' does not); prefilter is a no-op for orders 0 and 1. Order 0: rounded here, half up, so
    # that ties go the same way as on the device.
    ndim = coordinates.shape[0]
    if order == 0:
        coordinates = np.floor(coordinates + 0.5)
    flat = array.reshape(array.shape[:ndim] + (-1,))
    channels = [
        scipy.ndimage.map_coordinates(
            flat[..., k], coordinates, order=order, mode="grid-constant", cval=0, prefilter=False
        )
        for k in range(flat.shape[-1])
    ]
    return np.stack(channels, -1).reshape(coordinates.shape[1:] + array.shape[ndim:])


JAX = Backend("jax", jnp, _jax_map_coordinates, skips_unapplied=False)
NUMPY = Backend("numpy", np, _numpy_map_coordinates, skips_unapplied=True)


class KeyDraws:
    """Random draws from one JAX key, deterministic for the key (no Python-side randomness).

    Small draws (flags, angles, factors) are served from blocks of ``BLOCK`` uniforms, one
    ``uniform(fold_in(key, i))`` per block, and every large field (noise) gets its own ``fold_in(key, i)``;
    the counter ``i`` advances at trace time in the fixed order of the pipeline code. One random-number
    kernel per block instead of one per scalar keeps the compiled step small (each call is a full
    Threefry instance) without changing the distribution. Under ``vmap`` each sample has its own key.
    """

    BLOCK = 64

    def __init__(self, key):
        self._key = key
        self._count = 0
        self._block = None
        self._used = 0

    def _next_key(self):
        key = jax.random.fold_in(self._key, self._count)
        self._count += 1
        return key

    def _unit(self, shape):
        """Uniform [0, 1) values of ``shape``."""
        size = math.prod(shape)
        if size > self.BLOCK:
            return jax.random.uniform(self._next_key(), shape, jnp.float32)
        if self._block is None or self._used + size > self.BLOCK:
            self._block = jax.random.uniform(self._next_key(), (self.BLOCK,), jnp.float32)
            self._used = 0
        values = self._block[self._used : self._used + size].reshape(shape)
        self._used += size
        return values

    def uniform(self, low: float, high: float, shape=()):
        return low + (high - low) * self._unit(shape)

    def bernoulli(self, probability: float, shape=()):
        return self._unit(shape) < probability

    def normal(self, shape, needed=True):
        """A standard normal field; ``needed`` is ignored (static shapes: always drawn)."""
        return jax.random.normal(self._next_key(), shape, jnp.float32)


class GeneratorDraws:
    """Random draws from a ``numpy.random.Generator``, in float32 like :class:`KeyDraws`."""

    def __init__(self, rng: np.random.Generator):
        self._rng = rng

    def uniform(self, low: float, high: float, shape=()):
        return np.asarray(self._rng.uniform(low, high, shape), np.float32)

    def bernoulli(self, probability: float, shape=()):
        return np.asarray(self._rng.uniform(size=shape) < probability)

    def normal(self, shape, needed=True):
        """A standard normal field, or a scalar zero when ``needed`` is False (the caller scales it by
        zero then, and a CPU worker should not pay for millions of unused draws)."""
        if not bool(needed):
            return np.float32(0.0)
        return self._rng.standard_normal(shape, dtype=np.float32)
