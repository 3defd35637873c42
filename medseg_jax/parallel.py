"""Device mesh, shardings and multi-host set-up.

The mesh has two named axes: ``data`` (the batch is split over it) and ``spatial`` (the leading spatial
axis of each patch is split over it, for volumes too large for one device). Both axes are *Auto*
(``jax.sharding.AxisType.Auto``): we rely on XLA's SPMD partitioner to insert the halo exchanges a
convolution needs across a spatially split axis and the all-reduces of instance-norm statistics, so the
model code is the same on one device and on a pod. Parameters and optimiser state are replicated by
default; with ``fsdp`` large parameters are split over ``data`` (XLA gathers them where used).

Multi-host: :func:`initialize_distributed` must run before any device query; each host then loads its
own part of the global batch and :func:`global_batch` assembles the global array.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from medseg_jax.config import MeshConfig
from medseg_jax.errors import ConfigError

DATA_AXIS = "data"
SPATIAL_AXIS = "spatial"


def initialize_distributed(distributed_config) -> None:
    """Start ``jax.distributed`` when configured: ``auto`` lets JAX detect Cloud TPU / SLURM / MPI;
    otherwise the coordinator address, process count and id are taken from the config."""
    c = distributed_config
    if not c.enabled:
        return
    # A lost host is noticed by the coordination service after this many seconds without its heartbeat;
    # every other process then stops with an error instead of waiting in a collective forever.
    heartbeat, shutdown = int(c.heartbeat_timeout_seconds), int(c.shutdown_timeout_seconds)
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") in (None, "", "none"):
        # CPU devices of several processes need a collectives library (GPUs and TPUs bring their own)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if c.coordinator_address is None:
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat, shutdown_timeout_seconds=shutdown)
    else:
        jax.distributed.initialize(
            coordinator_address=c.coordinator_address,
            num_processes=c.num_processes,
            process_id=c.process_id,
            heartbeat_timeout_seconds=heartbeat,
            shutdown_timeout_seconds=shutdown,
        )


def mesh_shape(mesh_config, device_count: int) -> tuple[int, int]:
    """(data, spatial) sizes; one of them may be -1 meaning "the remaining devices"."""
    data, spatial = mesh_config.data, mesh_config.spatial
    if data == -1 and spatial == -1:
        raise ConfigError("mesh.data and mesh.spatial cannot both be -1")
    if data == -1:
        data = device_count // spatial if spatial > 0 else 0
    if spatial == -1:
        spatial = device_count // data if data > 0 else 0
    if data < 1 or spatial < 1 or data * spatial != device_count:
        raise ConfigError(
            f"mesh.data={mesh_config.data} x mesh.spatial={mesh_config.spatial} does not cover the "
            f"{device_count} available device(s)"
        )
    return data, spatial


def make_mesh(mesh_config, devices=None) -> Mesh:
    """A ``(data, spatial)`` mesh with Auto axes over ``devices`` (default: all, in JAX's order, which
    keeps neighbouring devices of one host together)."""
    devices = list(jax.devices() if devices is None else devices)
    data, spatial = mesh_shape(mesh_config, len(devices))
    grid = np.asarray(devices, dtype=object).reshape(data, spatial)
    axis_type = getattr(jax.sharding, "AxisType", None)
    if axis_type is None:  # older jax: every mesh axis is Auto
        return Mesh(grid, (DATA_AXIS, SPATIAL_AXIS))
    return Mesh(grid, (DATA_AXIS, SPATIAL_AXIS), axis_types=(axis_type.Auto, axis_type.Auto))


def batch_shardings(mesh: Mesh, spatial_dims: int) -> dict:
    """Shardings of ``{"image": (B, *spatial, C), "label": (B, *spatial)}``: batch over ``data``, the
    first spatial axis over ``spatial``."""
    rest = (None,) * (spatial_dims - 1)
    return {
        "image": NamedSharding(mesh, P(DATA_AXIS, SPATIAL_AXIS, *rest, None)),
        "label": NamedSharding(mesh, P(DATA_AXIS, SPATIAL_AXIS, *rest)),
    }


def param_spec(shape, data_size: int, fsdp_min_size: int | None) -> P:
    """Replicated, or (FSDP) split along the largest axis divisible by the data-axis size when the
    array has at least ``fsdp_min_size`` elements."""
    if fsdp_min_size is None or data_size == 1 or math.prod(shape) < fsdp_min_size:
        return P()
    candidates = [a for a in np.argsort(shape)[::-1] if shape[a] % data_size == 0]
    if not candidates:
        return P()
    spec: list[str | None] = [None] * len(shape)
    spec[int(candidates[0])] = DATA_AXIS
    return P(*spec)


def state_shardings(mesh: Mesh, abstract_state, fsdp_min_size: int | None = None):
    """A sharding for every leaf of ``abstract_state`` (arrays or ShapeDtypeStructs)."""
    data_size = mesh.shape[DATA_AXIS]

    def leaf_sharding(leaf):
        shape = getattr(leaf, "shape", ())
        return NamedSharding(mesh, param_spec(tuple(shape), data_size, fsdp_min_size))

    return jax.tree_util.tree_map(leaf_sharding, abstract_state)


def global_batch(local_batch: dict, shardings: dict) -> dict:
    """Build global arrays from this process's part of the batch (the leading ``B / process_count``
    samples that it loaded); on one process this is a plain sharded ``device_put``."""
    if jax.process_count() == 1:
        return {k: jax.device_put(np.asarray(v), shardings[k]) for k, v in local_batch.items()}
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v)) for k, v in local_batch.items()}


def is_main_process() -> bool:
    """Only process 0 writes logs, metrics files and reports."""
    return jax.process_index() == 0


def local_mesh() -> Mesh:
    """A data-only mesh over this process's own devices: for work each process does on its own share
    (whole-case validation), with arrays it can read back without a collective."""
    return make_mesh(MeshConfig(data=-1, spatial=1), devices=jax.local_devices())


def host_local_tree(tree, mesh: Mesh):
    """``tree``'s global arrays replicated over ``mesh``, a mesh of this process's own devices (for
    per-process work such as validation). Replicated arrays are copied from a local shard; split ones
    (FSDP) are gathered from every process, so all processes must call this together then."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    replicated = NamedSharding(mesh, P())

    def local(leaf):
        if not isinstance(leaf, jax.Array):
            return leaf
        if leaf.is_fully_replicated:
            return jax.device_put(leaf.addressable_data(0), replicated)
        return jax.device_put(np.asarray(multihost_utils.process_allgather(leaf, tiled=True)), replicated)

    return jax.tree_util.tree_map(local, tree)


def gather_from_processes(value) -> np.ndarray:
    """``(process_count, *shape)``: every process's host value, on every process (all must call it
    together). int64 values travel as pairs of int32 so that counts larger than 2^31 survive JAX's
    default 32-bit mode."""
    value = np.asarray(value)
    if jax.process_count() == 1:
        return value[None]
    from jax.experimental import multihost_utils

    wide = value.dtype == np.int64
    sent = np.ascontiguousarray(value).view(np.int32) if wide else value
    gathered = np.asarray(multihost_utils.process_allgather(sent, tiled=False))
    return np.ascontiguousarray(gathered).view(np.int64) if wide else gathered


def sum_over_processes(counts) -> np.ndarray:
    """The element-wise sum of every process's ``counts`` (int64 on the host)."""
    return gather_from_processes(np.asarray(counts, dtype=np.int64)).sum(axis=0)


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is True on any (all must call it at the same point)."""
    return bool(gather_from_processes(np.asarray([int(flag)], dtype=np.int32)).any())


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (no-op on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
