"""Cross-validation splits of a dataset's cases, kept in ``splits.json`` in the dataset folder.

nnU-Net's ``splits_final.json`` (``nnUNet_preprocessed/DatasetXXX/``) has the same shape; copied next to
where ``splits.json`` would be, it gives exactly nnU-Net's folds (:func:`read_existing_splits`).

The folds are the ones nnU-Net v2 makes (scikit-learn ``KFold(n_folds, shuffle=True,
random_state=seed)`` over the sorted case ids), so users moving between the two compare like with like.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from medseg_jax.atomic import read_json, write_json_atomic
from medseg_jax.errors import DataError

SPLITS_JSON = "splits.json"
NNUNET_SPLITS_JSON = "splits_final.json"  # nnU-Net v2's name for the same list of folds


def make_splits(case_ids, n_folds: int = 5, seed: int = 12345) -> list[dict[str, list[str]]]:
    """Deterministic k-fold cross-validation splits: ``[{"train": [...], "val": [...]}, ...]``.

    Same folds as nnU-Net v2 (scikit-learn ``KFold(n_folds, shuffle=True, random_state=seed)`` on the
    sorted case ids): the sorted ids are shuffled by numpy's legacy ``RandomState(seed)``, whose stream
    numpy keeps frozen, and cut into consecutive folds, the first ``n % n_folds`` one case larger. Every
    case is in exactly one validation fold; training lists are sorted.
    """
    ids = sorted(str(case_id) for case_id in case_ids)
    if len(set(ids)) != len(ids):
        duplicated = sorted({i for i in ids if ids.count(i) > 1})
        raise DataError(f"cannot make splits: duplicated case ids {duplicated}")
    if isinstance(n_folds, bool) or not isinstance(n_folds, (int, np.integer)) or n_folds < 2:
        raise DataError(f"n_folds must be an integer >= 2, got {n_folds!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise DataError(f"split seed must be an integer in [0, 2**32), got {seed!r}")
    if len(ids) < n_folds:
        raise DataError(
            f"cannot make {n_folds} folds from {len(ids)} case(s): every fold needs a validation "
            f"case; use n_folds <= {len(ids)} or add cases"
        )
    order = np.arange(len(ids))
    np.random.RandomState(seed).shuffle(order)
    splits = []
    for fold in np.array_split(order, n_folds):
        in_val = set(fold.tolist())
        splits.append({"train": [ids[i] for i in range(len(ids)) if i not in in_val], "val": [ids[i] for i in fold]})
    return splits


def load_or_create_splits(dataset, n_folds: int = 5, seed: int = 12345) -> list[dict[str, list[str]]]:
    """The splits in ``dataset.root/splits.json``; made by :func:`make_splits` and written if absent.

    ``dataset`` is a :class:`medseg_jax.data.dataset.Dataset` (its ``root`` and ``case_ids`` are used).

    An existing file is used as it is (its fold count wins over ``n_folds``) after checking that it is
    a list of {"train": [...], "val": [...]} naming known cases, with no case both training and
    validation in a fold. nnU-Net's ``splits_final.json`` there is used the same way (see
    :func:`read_existing_splits`); nothing is written then.
    """

    def read(name: str) -> Any:
        path = dataset.root / name
        return read_json(path) if path.exists() else None

    existing = read_existing_splits(read, lambda name: str(dataset.root / name), set(dataset.case_ids))
    if existing is not None:
        return existing[0]
    splits = make_splits(dataset.case_ids, n_folds=n_folds, seed=seed)
    write_json_atomic(dataset.root / SPLITS_JSON, splits)
    return splits


def read_existing_splits(
    read: Callable[[str], Any], locate: Callable[[str], str], known: set[str]
) -> tuple[list[dict[str, list[str]]], str] | None:
    """``(folds, file name)`` of ``splits.json``, or of nnU-Net's ``splits_final.json`` when only that exists.

    ``read(name)`` gives the parsed JSON document ``name`` or None when it is absent, ``locate(name)``
    where it is (for messages): the same rule serves a dataset folder and a store, which may be a bucket.
    None when neither file exists. Each present file must be valid folds of ``known`` cases (DataError
    naming the file); when both are present they must hold the same folds (the order of the ids within a
    list aside), else a DataError names both: neither is silently preferred.
    """
    found = {}
    for name in (SPLITS_JSON, NNUNET_SPLITS_JSON):
        splits = read(name)
        if splits is None:
            continue
        problems = _splits_problems(splits, known)
        if problems:
            raise DataError(f"{locate(name)}: " + "; ".join(problems))
        found[name] = [{"train": list(fold["train"]), "val": list(fold["val"])} for fold in splits]
    if len(found) == 2 and _as_sets(found[SPLITS_JSON]) != _as_sets(found[NNUNET_SPLITS_JSON]):
        raise DataError(
            f"{locate(SPLITS_JSON)} and {locate(NNUNET_SPLITS_JSON)} hold different folds: keep the one to "
            "train with and remove the other"
        )
    chosen = next(iter(found), None)  # splits.json first: when both are present they are equal
    return None if chosen is None else (found[chosen], chosen)


def _as_sets(splits: list[dict[str, list[str]]]) -> list[tuple[frozenset[str], frozenset[str]]]:
    return [(frozenset(fold["train"]), frozenset(fold["val"])) for fold in splits]


def _splits_problems(splits: Any, known: set[str]) -> list[str]:
    if not isinstance(splits, list) or not splits:
        return ['expected a non-empty list of {"train": [...], "val": [...]} folds']
    problems = []
    for index, fold in enumerate(splits):
        if not (
            isinstance(fold, dict)
            and all(isinstance(fold.get(k), list) for k in ("train", "val"))
            and all(isinstance(c, str) for k in ("train", "val") for c in fold[k])
        ):
            problems.append(f'fold {index}: expected {{"train": [case ids], "val": [case ids]}}')
            continue
        unknown = sorted((set(fold["train"]) | set(fold["val"])) - known)
        if unknown:
            problems.append(f"fold {index}: unknown case id(s) {unknown}")
        both = sorted(set(fold["train"]) & set(fold["val"]))
        if both:
            problems.append(f"fold {index}: case(s) {both} are in both train and val")
    return problems
