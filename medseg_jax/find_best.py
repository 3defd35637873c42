"""The best configuration, ensemble and postprocessing from cross-validations, as nnU-Net's
``nnUNetv2_find_best_configuration``.

``medseg-jax find-best CV_A CV_B ... --out DIR`` compares, on the cross-validation predictions of the same
cases (each case predicted by the fold that did not train on it, ``medseg-jax cv``):

1. every configuration: its cross-validation summary (``CV/crossval/summary.json``);
2. every pair of configurations: the mean of their saved probabilities per case (equal weights,
   :mod:`medseg_jax.inference.ensemble_probabilities`), evaluated the same way (``DIR/ensembles/A+B/``);

and chooses the highest mean foreground Dice (the mean over foreground classes of the per-class mean over
cases), the first on a tie (single configurations come before ensembles), as nnU-Net does. Then, on the
chosen option's predictions, nnU-Net's postprocessing rule (``determine_postprocessing``):

- keep only the largest connected component of the foreground (all foreground classes as one mask) if
  that raises the mean foreground Dice and lowers no class's mean Dice;
- then, with more than one foreground class, for each class in turn: keep only its largest component if
  that raises that class's mean Dice.

Written into ``DIR`` (a new folder, complete or not at all): ``find_best.json`` (every option's Dice, the
choice, the postprocessing with the Dice before and after), ``postprocessing.json`` (the steps, for
``predict --postprocessing``), ``model/model.json`` (a model folder: ``predict --model DIR/model`` predicts
with the chosen runs and postprocessing), ``inference_instructions.txt`` (the exact commands),
``ensembles/`` and ``postprocessed/`` (the evaluated predictions, with their ``summary.json``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path

import numpy as np

from medseg_jax.atomic import json_safe, read_json, staged_folder, write_json_atomic, write_text_atomic
from medseg_jax.errors import DataError
from medseg_jax.process_pool import map_in_processes

CV_PREFERENCE = "single configurations are compared before ensembles; the first of equal scores wins"


@dataclasses.dataclass(frozen=True)
class CrossValidation:
    """One ``medseg-jax cv`` folder: its name, folder, labels, folds and ``{case: (label, reference)}``."""

    name: str
    folder: Path
    labels: dict[str, int]
    folds: int
    cases: dict[str, tuple[Path, Path]]


def load_cross_validations(cv_dirs) -> list[CrossValidation]:
    """The cross-validations, checked to be complete and of the same cases and classes (else DataError)."""
    from medseg_jax.train.cross_validation import read_record, validation_cases

    if not cv_dirs:
        raise DataError("find-best needs at least one cross-validation folder (from `medseg-jax cv`)")
    loaded = []
    for folder in map(Path, cv_dirs):
        record = read_record(folder)
        loaded.append(
            CrossValidation("", folder.resolve(), record["labels"], record["folds"], validation_cases(folder))
        )
    names = _unique_names([cv.folder for cv in loaded])
    loaded = [dataclasses.replace(cv, name=name) for cv, name in zip(loaded, names)]
    first = loaded[0]
    for other in loaded[1:]:
        if other.labels != first.labels:
            raise DataError(
                f"{other.folder} predicts the classes {other.labels}, {first.folder} {first.labels}: "
                "cross-validations of one dataset have the same labels"
            )
        if set(other.cases) != set(first.cases):
            only = sorted(set(other.cases) ^ set(first.cases))[:5]
            raise DataError(
                f"{other.folder} and {first.folder} validate different cases (e.g. {', '.join(only)}): "
                "cross-validations of one dataset cover the same cases"
            )
    return loaded


def _unique_names(folders: list[Path]) -> list[str]:
    if len({f.resolve() for f in folders}) != len(folders):
        raise DataError(f"a cross-validation folder is given twice: {', '.join(map(str, folders))}")
    names = [f.name for f in folders]
    return [name if names.count(name) == 1 else f"{name}_{i}" for i, name in enumerate(names)]


def _evaluate(
    predictions: dict[str, Path], references: dict[str, Path], labels: dict, out: Path | None, workers: int = 1
) -> dict:
    from medseg_jax.evaluation import evaluate_pairs, write_evaluation

    # Dice decides, as in nnU-Net's find_best: no surface distances (the costly part on large scans)
    rows, summary = evaluate_pairs(
        predictions, references, labels, num_workers=workers, progress=False, distances=False
    )
    if out is not None:
        write_evaluation(out, rows, summary)
    return summary


def foreground_dice(summary: dict) -> float:
    return float(summary["foreground_mean"]["dice"])


def class_dice(summary: dict, name: str) -> float:
    return float(summary["classes"][name]["dice"]["mean"])


def _ensemble_case(probability_files: list[Path], label_path: Path) -> Path:
    """Worker: one case's probabilities averaged into ``label_path``."""
    from medseg_jax.inference.ensemble_probabilities import check_same_case, ensemble_case, read_probability_file

    files = [read_probability_file(path) for path in probability_files]
    check_same_case(files)
    ensemble_case(files, label_path)
    return label_path


def _ensemble_pair(pair: tuple[CrossValidation, ...], out: Path, workers: int = 1) -> dict[str, Path]:
    """Average the pair's saved validation probabilities per case into ``out``; returns the label files."""
    out.mkdir(parents=True)
    cases = sorted(pair[0].cases)
    jobs = [([cv.cases[case][0].with_name(f"{case}.npz") for cv in pair], out / f"{case}.nii.gz") for case in cases]
    return dict(zip(cases, map_in_processes(_ensemble_case, jobs, workers)))


def _keep_largest(path: Path, group: list[int], target: Path) -> Path:
    """Worker: the label map ``path`` with only the largest component of ``group`` kept, written to ``target``."""
    from medseg_jax.data.image_io import read_nifti, write_nifti
    from medseg_jax.postprocess import keep_largest_component_of

    volume = read_nifti(path)
    kept = keep_largest_component_of(np.asarray(volume.array), group)
    return write_nifti(volume.with_array(kept.astype(np.uint8)), target, dtype=np.uint8)


def _postprocessed(predictions: dict[str, Path], group: list[int], out: Path, workers: int = 1) -> dict[str, Path]:
    """Every prediction with only the largest component of ``group`` kept, written into ``out``."""
    out.mkdir(parents=True)
    jobs = [(path, group, out / f"{case}.nii.gz") for case, path in predictions.items()]
    return dict(zip(predictions, map_in_processes(_keep_largest, jobs, workers)))


def determine_postprocessing(
    predictions: dict[str, Path],
    references: dict[str, Path],
    labels: dict[str, int],
    work: Path,
    log=print,
    workers: int = 1,
) -> dict:
    """nnU-Net's postprocessing choice on ``predictions`` (see the module docstring); candidate predictions
    are written under ``work``. Returns ``steps`` (class groups), ``before`` / ``after`` (mean foreground
    Dice and per-class mean Dice) and ``decisions`` (each candidate's scores and whether it was kept)."""
    names = {value: name for name, value in labels.items() if value > 0}
    foreground = sorted(names)
    current, current_summary = predictions, _evaluate(predictions, references, labels, None, workers)
    before = _scores(current_summary, names)
    steps: list[list[int]] = []
    decisions = []
    candidates = [(foreground, "foreground")] + ([([k], names[k]) for k in foreground] if len(foreground) > 1 else [])
    for index, (group, what) in enumerate(candidates):
        folder = work / f"candidate_{index}_{what}"
        trial = _postprocessed(current, group, folder, workers)
        summary = _evaluate(trial, references, labels, folder, workers)
        if len(group) > 1:  # the whole foreground: better on average, and no class worse
            keep = foreground_dice(summary) > foreground_dice(current_summary) and all(
                not class_dice(summary, name) < class_dice(current_summary, name) for name in names.values()
            )
        else:
            keep = class_dice(summary, what) > class_dice(current_summary, what)
        decisions.append({"largest_component_of": group, "kept": keep, "scores": _scores(summary, names)})
        log(f"largest component of {what}: {'kept' if keep else 'not kept'} ({_format(summary, names)})")
        if keep:
            steps.append(group)
            current, current_summary = trial, summary
    return {
        "steps": steps,
        "before": before,
        "after": _scores(current_summary, names),
        "decisions": decisions,
        "predictions": current,
    }


def _scores(summary: dict, names: dict[int, str]) -> dict:
    return {"foreground_dice": foreground_dice(summary), **{name: class_dice(summary, name) for name in names.values()}}


def _format(summary: dict, names: dict[int, str]) -> str:
    per_class = ", ".join(f"{name} {class_dice(summary, name):.4f}" for name in names.values())
    return f"mean foreground Dice {foreground_dice(summary):.4f}; {per_class}"


def find_best(cv_dirs, out_dir, *, allow_ensembles: bool = True, log=print, workers: int = 1) -> dict:
    """Compare, choose and write ``out_dir`` (see the module docstring); returns the ``find_best.json`` record.
    ``workers``: processes that ensemble, postprocess and evaluate the cases (the choice does not depend on it)."""
    from medseg_jax.train.cross_validation import CROSSVAL_DIR, fold_dir, summarize

    cvs = load_cross_validations(cv_dirs)
    labels = cvs[0].labels
    references = {case: paths[1] for case, paths in cvs[0].cases.items()}
    out_dir = Path(out_dir)
    with staged_folder(out_dir, "find-best folder") as staging:
        options: list[dict] = []
        for cv in cvs:
            summary_path = cv.folder / CROSSVAL_DIR / "summary.json"
            summary = read_json(summary_path) if summary_path.is_file() else summarize(cv.folder)
            predictions = {case: paths[0] for case, paths in cv.cases.items()}
            options.append({"name": cv.name, "members": [cv], "dice": foreground_dice(summary), "labels": predictions})

            log(f"{cv.name}: mean foreground Dice {options[-1]['dice']:.4f}")
        if allow_ensembles:
            for pair in itertools.combinations(cvs, 2):
                name = "+".join(cv.name for cv in pair)
                predictions = _ensemble_pair(pair, staging / "ensembles" / name, workers)
                summary = _evaluate(predictions, references, labels, staging / "ensembles" / name, workers)
                options.append(
                    {"name": name, "members": list(pair), "dice": foreground_dice(summary), "labels": predictions}
                )
                log(f"{name}: mean foreground Dice {options[-1]['dice']:.4f}")
        scores = [option["dice"] for option in options]
        if all(math.isnan(score) for score in scores):
            raise DataError("no option has a mean foreground Dice (every reference and prediction is empty)")
        best = options[int(np.nanargmax(scores))]  # the first of equal maxima
        log(f"best: {best['name']} (mean foreground Dice {best['dice']:.4f})")
        postprocessing = determine_postprocessing(
            best["labels"], references, labels, staging / "postprocessing", log, workers
        )
        final = postprocessing.pop("predictions")
        (staging / "postprocessed").mkdir()
        for path in final.values():
            (staging / "postprocessed" / path.name).write_bytes(Path(path).read_bytes())
        _evaluate(
            {case: staging / "postprocessed" / path.name for case, path in final.items()},
            references,
            labels,
            staging / "postprocessed",
            workers,
        )
        runs = [str(fold_dir(cv.folder, fold).resolve()) for cv in best["members"] for fold in range(cv.folds)]
        (staging / "model").mkdir()
        write_json_atomic(staging / "model" / "model.json", {"runs": runs, "postprocessing": postprocessing["steps"]})
        write_json_atomic(staging / "postprocessing.json", {"postprocessing": postprocessing["steps"]})
        instructions = inference_instructions(out_dir, runs)
        write_text_atomic(staging / "inference_instructions.txt", instructions)
        record = {
            "options": {option["name"]: option["dice"] for option in options},
            "criterion": "mean foreground Dice on the cross-validation; " + CV_PREFERENCE,
            "best": {
                "name": best["name"],
                "configurations": [str(cv.folder) for cv in best["members"]],
                "dice": best["dice"],
            },
            "postprocessing": postprocessing,
            "inference_instructions": instructions,
        }
        write_json_atomic(staging / "find_best.json", json_safe(record))
    return record


def inference_instructions(out_dir: Path, runs: list[str]) -> str:
    """The commands that predict new scans with the chosen option (the model folder, and its runs spelled out)."""
    model = Path(out_dir).resolve() / "model"
    spelled = " ".join(runs)
    return (
        "# the chosen configuration(s), every fold, with the chosen postprocessing:\n"
        f"medseg-jax predict --model {model} -i INPUT_FOLDER -o OUTPUT_FOLDER\n"
        "# the same, spelled out:\n"
        f"medseg-jax predict --model {spelled} --postprocessing {Path(out_dir).resolve() / 'postprocessing.json'} "
        "-i INPUT_FOLDER -o OUTPUT_FOLDER\n"
    )
