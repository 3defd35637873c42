"""Cross-validation: every fold of the store's splits trained and validated, then one summary over all cases.

``medseg-jax cv --config C --data STORE --out CV_DIR`` is nnU-Net's ``nnUNetv2_train DATASET CONFIG FOLD``
for each fold followed by the summary ``nnUNetv2_find_best_configuration`` accumulates
(``crossval_results_folds_0_1_2_3_4``):

- ``CV_DIR/cv.json``: the store, the config and the number of folds; a CV folder serves one experiment,
  so another store or config is refused;
- ``CV_DIR/fold_K/``: the run folder of fold K (:func:`medseg_jax.train.loop.train`, resumable), its final
  validation in ``fold_K/validation/`` (:mod:`medseg_jax.train.final_validation`);
- ``CV_DIR/crossval/``: ``metrics.csv`` and ``summary.json`` over the validation cases of every fold
  (each case is validated by the one fold that did not train on it), written once all folds are complete.

Folds can be trained one after another (the default), or spread over machines or SLURM array tasks
(``--folds K`` each, the same ``--out`` on a shared file system); the task that completes the last fold
writes the summary, and ``--summarize`` writes it (or says which folds are missing) at any time.
"""

from __future__ import annotations

from pathlib import Path

from medseg_jax.atomic import read_json, write_json_atomic
from medseg_jax.errors import ConfigError, DataError

CV_RECORD = "cv.json"
CROSSVAL_DIR = "crossval"


def fold_dir(cv_dir, fold: int) -> Path:
    return Path(cv_dir) / f"fold_{fold}"


def _record(config, store_dir, n_folds: int, labels: dict) -> dict:
    from medseg_jax.config import to_dict

    return {"data": str(Path(store_dir).resolve()), "config": to_dict(config), "folds": n_folds, "labels": labels}


def check_or_write_record(cv_dir, record: dict) -> None:
    """Write ``cv.json``, or check that an existing one describes the same experiment."""
    path = Path(cv_dir) / CV_RECORD
    if not path.is_file():
        Path(cv_dir).mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, record)
        return
    existing = read_json(path)
    differing = sorted(k for k in record if existing.get(k) != record[k])
    if differing:
        raise ConfigError(
            f"{path}: this cross-validation folder was made with another {' and '.join(differing)}; "
            "give the same --config and --data, or another --out"
        )


def read_record(cv_dir) -> dict:
    path = Path(cv_dir) / CV_RECORD
    if not path.is_file():
        raise DataError(f"{cv_dir}: not a cross-validation folder (no {CV_RECORD}; made by `medseg-jax cv`)")
    record = read_json(path)
    if not isinstance(record, dict) or not isinstance(record.get("folds"), int) or "labels" not in record:
        raise DataError(f"{path}: expected 'data', 'config', 'folds' and 'labels' (written by `medseg-jax cv`)")
    return record


def missing_folds(cv_dir, n_folds: int) -> list[int]:
    """Folds whose final validation is not complete."""
    from medseg_jax.train.final_validation import validation_summary

    return [fold for fold in range(n_folds) if validation_summary(fold_dir(cv_dir, fold)) is None]


def validation_cases(cv_dir) -> dict[str, tuple[Path, Path]]:
    """``{case: (predicted label, reference label)}`` over every fold of a complete cross-validation; the
    predicted probabilities lie beside each label as ``{case}.npz``."""
    from medseg_jax.train.final_validation import VALIDATION_DIR, validation_summary

    record = read_record(cv_dir)
    missing = missing_folds(cv_dir, record["folds"])
    if missing:
        raise DataError(
            f"{cv_dir}: fold(s) {', '.join(map(str, missing))} of {record['folds']} have no complete final "
            f"validation ({fold_dir(cv_dir, missing[0]) / VALIDATION_DIR / 'summary.json'} is missing); train them "
            "with `medseg-jax cv ... --folds " + " ".join(map(str, missing)) + "`"
        )
    cases: dict[str, tuple[Path, Path]] = {}
    for fold in range(record["folds"]):
        summary = validation_summary(fold_dir(cv_dir, fold))
        assert summary is not None
        for case, reference in summary["references"].items():
            if case in cases:
                raise DataError(f"{cv_dir}: case {case} is validated by two folds; the splits overlap")
            predicted = fold_dir(cv_dir, fold) / VALIDATION_DIR / f"{case}.nii.gz"
            cases[case] = (predicted, Path(reference))
    return cases


def summarize(cv_dir, progress: bool = False) -> dict:
    """Evaluate every fold's validation cases together into ``CV_DIR/crossval`` (metrics.csv, summary.json)."""
    from medseg_jax.evaluation import evaluate_pairs, write_evaluation
    from medseg_jax.train.final_validation import validation_summary

    record = read_record(cv_dir)
    cases = validation_cases(cv_dir)
    predictions = {case: paths[0] for case, paths in cases.items()}
    references = {case: paths[1] for case, paths in cases.items()}
    rows, summary = evaluate_pairs(predictions, references, record["labels"], progress=progress)
    summary["folds"] = {
        str(fold): validation_summary(fold_dir(cv_dir, fold))["foreground_mean"]["dice"]  # type: ignore[index]
        for fold in range(record["folds"])
    }
    write_evaluation(Path(cv_dir) / CROSSVAL_DIR, rows, summary)
    return summary


def cross_validate(
    config,
    store_dir,
    cv_dir,
    folds=None,
    *,
    progress: bool = True,
    log=print,
    autotune: bool = False,
) -> dict | None:
    """Train and validate ``folds`` (default: every fold of the store's splits) into ``cv_dir``; returns the
    cross-validation summary once every fold is complete (None while some are missing, which are logged)."""
    from medseg_jax.data.store import CaseStore
    from medseg_jax.train.loop import train
    from medseg_jax.train.setup import store_splits

    store = CaseStore(store_dir)
    splits, _ = store_splits(store)
    n_folds = len(splits)
    folds = list(range(n_folds)) if folds is None else [int(f) for f in folds]
    bad = [f for f in folds if not 0 <= f < n_folds]
    if bad:
        raise ConfigError(f"fold(s) {bad} do not exist: the store's splits have folds 0..{n_folds - 1}")
    check_or_write_record(cv_dir, _record(config, store_dir, n_folds, store.read_plan()["labels"]))
    for fold in folds:
        log(f"fold {fold} of {n_folds} -> {fold_dir(cv_dir, fold)}")
        train(config, store_dir, fold_dir(cv_dir, fold), fold=fold, progress=progress, log=log, autotune=autotune)
    missing = missing_folds(cv_dir, n_folds)
    if missing:
        log(f"folds {', '.join(map(str, missing))} are not complete yet; the summary is written once they are")
        return None
    return summarize(cv_dir, progress=progress)
