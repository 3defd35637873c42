"""Training batches from a :class:`~medseg_jax.data.store.CaseStore`: a deterministic grain pipeline.

Pipeline (grain ``MapDataset``)::

    case ids -> EpochShuffle (repeated forever, a new order each epoch) -> HostRows (this host's rows)
      -> PatchSampler (one patch per element) -> batch(drop_remainder) -> IterDataset (threads / processes)

The global batch and its rows do not depend on the number of processes. The shuffled stream of case ids
is cut into global batches of ``B = batch_size * shard_count`` elements: element ``g`` of the stream is
row ``r = g % B`` of global batch ``b = g // B``. Host ``k`` of ``P`` reads rows ``[k * L, (k + 1) * L)``
(``L = batch_size``) of every global batch, exactly the rows of the global array it holds when the batch
is assembled across processes, so its ``i``-th element is ``g = (i // L) * B + k * L + i % L``. The
patch of element ``g`` is drawn with ``np.random.default_rng([seed, g])``, and foreground oversampling
follows nnU-Net v2 on the global batch: row ``r`` is forced to contain foreground when
``not r < round(B * (1 - foreground_fraction))`` (the last third of each global batch by default). So
the concatenation of the hosts' batches is, image for image, the batch one process would build, and a
run can move between topologies (tested with 1, 2 and 4 shards).

The iterator state is the number of batches this host has taken, ``{"next_index": n}``: batch ``n`` is
global batch ``n`` on every host, whatever the process count, and the pipeline is random-access, so
:meth:`BatchIterator.set_state` restarts it at batch ``n`` (with threads or with any number of worker
processes; grain's own state for worker processes would tie a checkpoint to one worker count).

Batches are ``{"image": float32 (B, *patch, C) channels-last, "label": int32 (B, *patch)}``, cut at
``crop_size`` when that is larger than the patch. Augmentation runs on the accelerator inside the
training step by default (the loader then delivers the larger crops it needs); with
``augment.mode: cpu`` the loader's ``batch_transform`` augments each sample here and delivers patches.
This module does not import JAX.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any, Literal

import grain
import numpy as np

from medseg_jax.data.store import CaseStore
from medseg_jax.errors import DataError

MAX_AUTO_WORKERS = 4
CORES_KEPT_FREE = 2  # the training process and the accelerator's host-side work keep these


def resolve_num_workers(setting: int | Literal["auto"], cpu_count: int | None = None) -> int:
    """The loader's worker processes for ``data.num_workers``: an int is taken as is, ``"auto"`` is
    ``min(4, cores - 2)`` where that is at least 1, else 0 (read in the training process: on a 2-core
    machine, worker processes would only compete with it). ``cpu_count`` defaults to the cores this
    process may run on."""
    if setting == "auto":
        if cpu_count is None:
            cpu_count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(0, min(MAX_AUTO_WORKERS, cpu_count - CORES_KEPT_FREE))
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
        raise DataError(f"num_workers must be an integer >= 0 or 'auto', got {setting!r}")
    return setting


def host_element_index(index: int, batch_size: int, shard_index: int, shard_count: int) -> int:
    """The global stream index ``g`` of element ``index`` of host ``shard_index``'s stream: that host
    holds rows ``[shard_index * batch_size, (shard_index + 1) * batch_size)`` of every global batch of
    ``batch_size * shard_count`` rows."""
    batch, row = divmod(index, batch_size)
    return batch * batch_size * shard_count + shard_index * batch_size + row


def is_foreground_forced(position_in_batch: int, batch_size: int, foreground_fraction: float) -> bool:
    """nnU-Net's ``get_do_oversample``: the last ``~fraction`` of each batch must contain foreground."""
    return not position_in_batch < round(batch_size * (1 - foreground_fraction))


def patch_start_bounds(case_shape: Sequence[int], patch_size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive (lowest, highest) patch start per axis, as in nnU-Net's ``get_bbox``.

    Where the case is at least as large as the patch, the patch stays inside: ``[0, shape - patch]``.
    Where it is smaller, the case sits roughly centred in the patch and the rest is padding.
    """
    shape, patch = np.asarray(case_shape), np.asarray(patch_size)
    pad = np.maximum(patch - shape, 0)
    return -((pad + 1) // 2), shape - patch + (pad + 1) // 2


def random_patch_start(rng: np.random.Generator, case_shape, patch_size) -> np.ndarray:
    """A uniformly random patch start within :func:`patch_start_bounds`."""
    low, high = patch_start_bounds(case_shape, patch_size)
    return rng.integers(low, high + 1)


def foreground_patch_start(rng: np.random.Generator, case_shape, patch_size, voxel) -> np.ndarray:
    """A random patch start, within :func:`patch_start_bounds`, whose patch contains ``voxel``.

    nnU-Net centres the patch on the voxel and relies on its spatial augmentation around the patch
    centre for variety; augmentation here runs after cropping, so the voxel is instead placed at a
    uniformly random position inside the patch (so foreground is not always at the centre).
    """
    low, high = patch_start_bounds(case_shape, patch_size)
    voxel, patch = np.asarray(voxel), np.asarray(patch_size)
    return rng.integers(np.maximum(low, voxel - patch + 1), np.minimum(high, voxel) + 1)


class EpochShuffle(grain.MapDataset):
    """The case ids repeated forever, each epoch in its own random order: element ``g`` is case
    ``permutation(epoch)[g % n]`` with ``epoch = g // n`` and the permutation drawn with
    ``np.random.default_rng([seed, epoch])``. (grain's own ``shuffle`` computes every index with a
    cipher that costs milliseconds per element, most of the loader's time for small patches; a
    permutation per epoch, cached, costs microseconds.)"""

    def __init__(self, case_ids: Sequence[str], seed: int):
        super().__init__([])
        self.case_ids, self.seed = list(case_ids), int(seed)
        self._cached: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return sys.maxsize

    def permutation(self, epoch: int) -> np.ndarray:
        cached = self._cached
        if cached is None or cached[0] != epoch:
            cached = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.case_ids)))
            self._cached = cached
        return cached[1]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, position = divmod(int(index), len(self.case_ids))
        return self.case_ids[int(self.permutation(epoch)[position])]

    def __str__(self) -> str:
        return f"EpochShuffle({len(self.case_ids)} cases, seed {self.seed})"


class HostRows(grain.MapDataset):
    """This host's elements of the global stream: element ``i`` is ``(g, parent[g])`` with ``g`` from
    :func:`host_element_index`, so the sampler knows each element's global index and batch row."""

    _MUTATES_ELEMENT_SPEC = True

    def __init__(self, parent: grain.MapDataset, batch_size: int, shard_index: int, shard_count: int):
        super().__init__(parent)
        self.batch_size, self.shard_index, self.shard_count = int(batch_size), int(shard_index), int(shard_count)
        global_batch = self.batch_size * self.shard_count
        parent_length = len(parent)
        # An infinite parent (repeat forever) stays infinite; a finite one keeps its whole global batches.
        self._length = sys.maxsize if parent_length >= sys.maxsize else parent_length // global_batch * self.batch_size

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        g = host_element_index(index, self.batch_size, self.shard_index, self.shard_count)
        return g, self._parent[g]

    def __str__(self) -> str:
        return f"HostRows(rows {self.shard_index * self.batch_size}+{self.batch_size} of {self.shard_count})"


class PatchSampler(grain.transforms.Map):
    """Maps ``(global index g, case id)`` to one patch ``{"image": (*patch, C), "label": (*patch)}``.

    ``batch_size`` is the GLOBAL batch size: it decides the row ``g % batch_size`` and so nnU-Net's
    foreground forcing. ``transform(rng, batch) -> batch`` (CPU-side augmentation), when given, runs on
    the sample as a batch of one with ``rng = default_rng([seed, g, 1])``: per element, so that it does
    not depend on how the global batch is split over processes.

    For a 3D case and a patch with one axis fewer, a 2D patch is taken from one z slice (the last
    axis): a random slice, or for a foreground-forced sample the slice of the chosen voxel.
    """

    def __init__(
        self,
        store: CaseStore,
        patch_size: Sequence[int],
        batch_size: int,
        foreground_fraction: float = 0.33,
        seed: int = 0,
        crop_size: Sequence[int] | None = None,
        transform=None,
    ):
        self.store = store
        self.patch_size = tuple(int(p) for p in patch_size)
        # The loader reads ``crop_size`` (>= patch) centred on where a patch would be: augmentation
        # rotates / scales that crop down to the patch, so the patch's own window decides the placement
        # (and holds the forced foreground voxel) and the margin around it is real data.
        self.crop_size = self.patch_size if crop_size is None else tuple(int(c) for c in crop_size)
        if len(self.crop_size) != len(self.patch_size) or any(c < p for c, p in zip(self.crop_size, self.patch_size)):
            raise DataError(
                f"crop size {self.crop_size} must have one entry >= the patch size per axis {self.patch_size}"
            )
        self.batch_size = int(batch_size)
        self.foreground_fraction = float(foreground_fraction)
        self.seed = int(seed)
        self.transform = transform

    def map(self, element: tuple[int, str]) -> dict[str, np.ndarray]:
        g, case_id = element
        forced = is_foreground_forced(g % self.batch_size, self.batch_size, self.foreground_fraction)
        sample = self.sample(case_id, np.random.default_rng([self.seed, g]), forced)
        if self.transform is None:
            return sample
        one = self.transform(np.random.default_rng([self.seed, g, 1]), {k: v[None] for k, v in sample.items()})
        return {k: v[0] for k, v in one.items()}

    def sample(self, case_id: str, rng: np.random.Generator, force_foreground: bool) -> dict[str, np.ndarray]:
        """Draw one patch of ``case_id``; with ``force_foreground`` it contains a foreground voxel
        whenever the case has any (else the patch is random, as in nnU-Net)."""
        shape = self.store.case_shape(case_id)
        slice_mode = len(shape) == len(self.patch_size) + 1
        if not slice_mode and len(shape) != len(self.patch_size):
            raise DataError(
                f"case {case_id!r} in case store {self.store.path}: patch size {self.patch_size} "
                f"does not fit a case of shape {shape}"
            )
        # In slice mode the patch is (*patch_size, 1) along the case's axes, then squeezed.
        patch = (*self.patch_size, 1) if slice_mode else self.patch_size
        crop = (*self.crop_size, 1) if slice_mode else self.crop_size
        voxel = self._foreground_voxel(case_id, rng) if force_foreground else None
        if voxel is None:
            start = random_patch_start(rng, shape, patch)
        else:
            start = foreground_patch_start(rng, shape, patch, voxel)
        start = np.asarray(start) - (np.asarray(crop) - np.asarray(patch)) // 2
        image, label = self.store.read_patch(case_id, start, crop)
        if slice_mode:
            image, label = image[..., 0], label[..., 0]
        return {"image": np.ascontiguousarray(np.moveaxis(image, 0, -1)), "label": label.astype(np.int32)}

    def _foreground_voxel(self, case_id: str, rng: np.random.Generator) -> np.ndarray | None:
        """A stored location of a class picked uniformly among the classes present, or None."""
        locations = {c: v for c, v in self.store.class_locations(case_id).items() if len(v)}
        if not locations:
            return None
        classes = sorted(locations)
        points = locations[classes[rng.integers(len(classes))]]
        return points[rng.integers(len(points))]


def batches_taken(state: dict[str, Any]) -> int:
    """The number of batches a saved iterator state has taken: ``{"next_index": n}`` (this module's
    state, and grain's for a loader without worker processes), or grain's state of a loader with worker
    processes (saved by earlier versions), where each worker's state counts the batches taken from it."""
    if "next_index" in state:
        return int(state["next_index"])
    if "iterators_in_use_states" in state:
        return sum(int(s["next_index"]) for s in state["iterators_in_use_states"])
    raise DataError(f"training loader: unrecognised iterator state with keys {sorted(state)}")


class TrainBatches(grain.IterDataset):
    """The batches of one host; ``iter()`` gives a :class:`BatchIterator` with a portable state."""

    def __init__(self, batches: grain.MapDataset, read_options: grain.ReadOptions, num_workers: int):
        super().__init__()
        self.batches, self.read_options, self.num_workers = batches, read_options, int(num_workers)

    def __iter__(self) -> BatchIterator:
        return BatchIterator(self.batches, self.read_options, self.num_workers)

    def __str__(self) -> str:
        return f"TrainBatches(num_workers={self.num_workers})"


class BatchIterator(grain.DatasetIterator):
    """Batches ``n, n + 1, ...`` of a random-access pipeline, read by grain (threads, or worker
    processes through ``mp_prefetch``). The state ``{"next_index": n}`` restores the exact continuation
    with any number of worker processes; restoring restarts the reading at batch ``n`` (workers start
    on the next batch, not before)."""

    def __init__(self, batches: grain.MapDataset, read_options: grain.ReadOptions, num_workers: int):
        super().__init__()
        self._batches, self._read_options, self._num_workers = batches, read_options, num_workers
        self._next_index = 0
        self._reader: Any = None

    def _open(self):
        dataset = self._batches[self._next_index :].to_iter_dataset(self._read_options)
        if self._num_workers > 0:
            _mark_absl_flags_parsed()
            dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._num_workers))
        return iter(dataset)

    def __next__(self) -> dict[str, np.ndarray]:
        if self._reader is None:
            self._reader = self._open()
        batch = next(self._reader)
        self._next_index += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"next_index": self._next_index}

    def set_state(self, state: dict[str, Any]) -> None:
        next_index = batches_taken(state)
        if next_index != self._next_index:  # else the open reader already continues from there
            self._close_reader()
            self._next_index = next_index

    def _close_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None and hasattr(reader, "close"):
            reader.close()

    def close(self) -> None:
        """Stop the reader's threads and worker processes (also done when the iterator is collected)."""
        self._close_reader()
        super().close()


def make_train_loader(
    store: CaseStore,
    case_ids: Sequence[str],
    patch_size: Sequence[int],
    batch_size: int,
    foreground_fraction: float = 0.33,
    seed: int = 0,
    num_workers: int | Literal["auto"] = 0,
    shard_index: int = 0,
    shard_count: int = 1,
    shard_options: grain.sharding.ShardOptions | None = None,
    num_threads: int = 2,
    prefetch_batches: int = 4,
    crop_size: Sequence[int] | None = None,
    batch_transform=None,
) -> TrainBatches:
    """The infinite stream of training batches of this host, as a grain ``IterDataset``.

    Args:
      store: the preprocessed cases.
      case_ids: the training cases (e.g. one fold's ``"train"`` list); each must be in ``store``.
      patch_size: spatial patch size; one axis fewer than the cases means 2D slices along z.
      batch_size: this host's batch size (its rows of the global batch of ``batch_size * shard_count``).
      foreground_fraction: fraction of each global batch forced to contain foreground (nnU-Net: 0.33).
      seed: determines the whole stream.
      num_workers: worker processes (grain ``mp_prefetch``), or ``"auto"`` (:func:`resolve_num_workers`);
        0 reads in this process with threads. The batches do not depend on it.
      shard_index, shard_count: this host's share; the training loop passes ``jax.process_index()``
        and ``jax.process_count()``. ``shard_options`` (e.g. ``grain.sharding.ShardByJaxProcess()``)
        overrides both when given. Host ``k`` gets rows ``[k * batch_size, (k + 1) * batch_size)`` of
        the global batch that one process with ``batch_size * shard_count`` would build.
      num_threads: reader threads per process, each producing whole batches.
      prefetch_batches: batches buffered ahead per process (bounds memory: a 2x128^3 batch is 16 MB).
      crop_size: read this larger crop around each patch position (room for rotation / scaling done
        later, see :func:`medseg_jax.augment.loader_crop_size`); default: the patch itself.
      batch_transform: ``f(rng, batch) -> batch`` run in the loader on each sample as a batch of one
        (CPU-side augmentation), with ``rng = default_rng([seed, g, 1])`` for the sample's global index
        ``g``: the same whatever the process count, and restored with the iterator state.

    Returns:
      ``grain.IterDataset``; ``it = iter(loader)`` yields batch dicts (see the module docstring),
      ``it.get_state()`` / ``it.set_state(state)`` checkpoint and restore the position, ``it.close()``
      stops worker processes.
    """
    if shard_options is not None:
        shard_index, shard_count = shard_options.shard_index, shard_options.shard_count
    _check_arguments(store, case_ids, patch_size, batch_size, foreground_fraction, seed, shard_index, shard_count)
    workers = resolve_num_workers(num_workers)
    sampler = PatchSampler(
        store,
        patch_size,
        batch_size * shard_count,
        foreground_fraction,
        seed,
        crop_size=crop_size,
        transform=batch_transform,
    )
    batches = (
        HostRows(
            EpochShuffle(case_ids, seed),  # every epoch in a new order
            batch_size,
            shard_index,
            shard_count,
        )
        .map(sampler)
        .batch(batch_size, drop_remainder=True)
    )
    read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_batches)
    return TrainBatches(batches, read_options, workers)


def _mark_absl_flags_parsed() -> None:
    """Let grain's multiprocessing read its absl flags in programs that never parse absl flags.

    With a recent jaxlib, grain 0.2.x reads ``--grain_enable_multiprocess_worker_profiling`` when
    worker processes start and fails with ``UnparsedFlagAccessError`` unless the flags were parsed.
    Marking them parsed keeps every flag at its default (or at what the program already set).
    """
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _check_arguments(store, case_ids, patch_size, batch_size, foreground_fraction, seed, shard_index, shard_count):
    where = f"training loader over case store {store.path}"
    if not case_ids:
        raise DataError(f"{where}: no training cases given")
    missing = [c for c in case_ids if not store.has_case(c)]
    if missing:
        raise DataError(f"{where}: {len(missing)} case(s) not in the store: {', '.join(map(str, missing[:10]))}")
    if len(patch_size) not in (2, 3) or min(patch_size) < 1:
        raise DataError(f"{where}: patch_size must be 2 or 3 positive ints, got {tuple(patch_size)}")
    if batch_size < 1:
        raise DataError(f"{where}: batch_size must be >= 1, got {batch_size}")
    if not 0.0 <= foreground_fraction <= 1.0:
        raise DataError(f"{where}: foreground_fraction must lie in [0, 1], got {foreground_fraction}")
    if not 0 <= seed < 2**32:
        raise DataError(f"{where}: seed must lie in [0, 2**32), got {seed}")
    if not (shard_count >= 1 and 0 <= shard_index < shard_count):
        raise DataError(f"{where}: shard_index {shard_index} / shard_count {shard_count} is not a valid shard")
