"""Training batches from a :class:`~medseg_jax.data.store.CaseStore`: a deterministic grain pipeline.

Pipeline (grain ``MapDataset``)::

    case ids -> shuffle(seed) -> repeat forever (reshuffled each epoch) -> this host's share
      -> PatchSampler (one patch per element) -> batch(drop_remainder) -> IterDataset (threads / processes)

Every element of the infinite stream has a fixed global index ``g``; its patch is drawn with
``np.random.default_rng([seed, g])``, so the stream depends only on the seed (not on thread or
worker scheduling), and grain's iterator state (``it.get_state()`` / ``it.set_state(state)``, a
small JSON-able dict, saved with the model checkpoint) restores the exact continuation.

Foreground oversampling follows nnU-Net v2: within each batch the sample at position ``i`` is forced
to contain foreground when ``not i < round(batch_size * (1 - foreground_fraction))`` (the last third
of each batch by default). The position is known because the sampler runs right before ``batch`` and
the element's index within this host's stream gives ``i = index % batch_size``.

Multi-host: each host passes ``shard_index=jax.process_index()``, ``shard_count=jax.process_count()``
(or a grain ``ShardOptions`` such as ``grain.sharding.ShardByJaxProcess()``); host ``k`` takes the
elements ``k, k + count, ...`` of the common shuffled stream, so hosts never see the same element and
each builds its own part of the global batch. This module does not import JAX.

Batches are ``{"image": float32 (B, *patch, C) channels-last, "label": int32 (B, *patch)}``, cut at
``crop_size`` when that is larger than the patch. Augmentation runs on the accelerator inside the
training step by default (the loader then delivers the larger crops it needs); with
``augment.mode: cpu`` the loader's ``batch_transform`` augments each batch here and delivers patches.
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
import numpy as np

from medseg_jax.data.store import CaseStore
from medseg_jax.errors import DataError


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


class PatchSampler(grain.transforms.MapWithIndex):
    """Maps (index in this host's stream, case id) to one patch ``{"image": (*patch, C), "label": (*patch)}``.

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
        shard_index: int = 0,
        shard_count: int = 1,
        crop_size: Sequence[int] | None = None,
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
        self.shard_index, self.shard_count = int(shard_index), int(shard_count)

    def map_with_index(self, index: int, case_id: str) -> dict[str, np.ndarray]:
        # The global index is the element's position in the unsharded stream: distinct per host.
        rng = np.random.default_rng([self.seed, index * self.shard_count + self.shard_index])
        forced = is_foreground_forced(index % self.batch_size, self.batch_size, self.foreground_fraction)
        return self.sample(case_id, rng, forced)

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


class BatchTransform(grain.transforms.MapWithIndex):
    """Applies ``transform(rng, batch)`` with a generator seeded by (seed, batch index, shard)."""

    def __init__(self, transform, seed: int, shard_index: int):
        self.transform, self.seed, self.shard_index = transform, int(seed), int(shard_index)

    def map_with_index(self, index: int, batch: dict) -> dict:
        return self.transform(np.random.default_rng([self.seed, index, self.shard_index, 1]), batch)


def make_train_loader(
    store: CaseStore,
    case_ids: Sequence[str],
    patch_size: Sequence[int],
    batch_size: int,
    foreground_fraction: float = 0.33,
    seed: int = 0,
    num_workers: int = 0,
    shard_index: int = 0,
    shard_count: int = 1,
    shard_options: grain.sharding.ShardOptions | None = None,
    num_threads: int = 2,
    prefetch_batches: int = 4,
    crop_size: Sequence[int] | None = None,
    batch_transform=None,
) -> grain.IterDataset:
    """The infinite stream of training batches of this host, as a grain ``IterDataset``.

    Args:
      store: the preprocessed cases.
      case_ids: the training cases (e.g. one fold's ``"train"`` list); each must be in ``store``.
      patch_size: spatial patch size; one axis fewer than the cases means 2D slices along z.
      batch_size: this host's batch size (per-host share of the global batch).
      foreground_fraction: fraction of each batch forced to contain foreground (nnU-Net: 0.33).
      seed: determines the whole stream.
      num_workers: worker processes (grain ``mp_prefetch``); 0 reads in this process with threads.
      shard_index, shard_count: this host's share; the training loop passes ``jax.process_index()``
        and ``jax.process_count()``. ``shard_options`` (e.g. ``grain.sharding.ShardByJaxProcess()``)
        overrides both when given.
      num_threads: reader threads per process, each producing whole batches.
      prefetch_batches: batches buffered ahead per process (bounds memory: a 2x128^3 batch is 16 MB).
      crop_size: read this larger crop around each patch position (room for rotation / scaling done
        later, see :func:`medseg_jax.augment.loader_crop_size`); default: the patch itself.
      batch_transform: ``f(rng, batch) -> batch`` run on each batch in the loader (CPU-side
        augmentation), with ``rng = default_rng([seed, batch index, shard, 1])``: deterministic and
        restored with the iterator state like everything else.

    Returns:
      ``grain.IterDataset``; ``it = iter(loader)`` yields batch dicts (see the module docstring),
      ``it.get_state()`` / ``it.set_state(state)`` checkpoint and restore the position.
    """
    if shard_options is not None:
        shard_index, shard_count = shard_options.shard_index, shard_options.shard_count
    _check_arguments(store, case_ids, patch_size, batch_size, foreground_fraction, seed, shard_index, shard_count)
    sampler = PatchSampler(
        store, patch_size, batch_size, foreground_fraction, seed, shard_index, shard_count, crop_size=crop_size
    )
    dataset = (
        grain.MapDataset.source(list(case_ids))
        .shuffle(seed=seed)
        .repeat(None)  # reseeds the shuffle each epoch
        .slice(slice(shard_index, None, shard_count))
        .map_with_index(sampler)
        .batch(batch_size, drop_remainder=True)
    )
    if batch_transform is not None:
        dataset = dataset.map_with_index(BatchTransform(batch_transform, seed, shard_index))
    read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_batches)
    loader = dataset.to_iter_dataset(read_options)
    if num_workers > 0:
        _mark_absl_flags_parsed()
        loader = loader.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return loader


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
