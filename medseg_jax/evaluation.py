"""Folder-versus-folder evaluation: predicted label maps against reference label maps (NIfTI).

:func:`evaluate_folders` matches cases by file name (``{case}.nii.gz`` or ``{case}.nii`` directly in each
folder), checks that every reference has a prediction of the same shape and affine, and computes the
metrics of :func:`medseg_jax.metrics.segmentation_metrics` for every case and class (in a process pool
when ``num_workers > 1``), with ``tn`` (voxels in neither mask) next to ``tp``, ``fp``, ``fn``.
:func:`write_evaluation` writes ``metrics.csv`` (one row per case x class) and ``summary.json``;
:func:`format_table` renders the summary for a terminal.

nnU-Net v2's ``summary.json`` (``nnUNetv2_evaluate_folder``; :func:`nnunet_summary`) can be written
instead, ours then going to ``summary_medseg.json``: ``metric_per_case`` (per case ``prediction_file``,
``reference_file`` and ``metrics``: per label value, as a string, ``Dice``, ``IoU``, ``FP``, ``TP``,
``FN``, ``TN``, ``n_pred``, ``n_ref``), ``mean`` (per label, each metric's NaN-skipping mean over the
cases) and ``foreground_mean`` (the mean of the labels' means, NaN if one is NaN). Dice and IoU there
follow nnU-Net whatever ``empty`` says: NaN only when both masks are empty. The file is written as
nnU-Net writes it (sorted keys, indent 4, NaN as the bare token ``NaN``, which Python's and nnU-Net's
JSON readers accept), so scripts that parse nnU-Net's results read ours.

Spacing comes from the reference's affine (column norms, mm) in the file's voxel order; a 3D file with
a single slice (nnU-Net's 2D layout) is evaluated as 2D (contours, areas in mm^2).

Aggregation over cases, per class and metric (stated in ``summary.json``): ``mean``, ``median`` and
``std`` (population, ddof 0) are taken over the cases whose value is not NaN, as nnU-Net's nanmean;
``count`` is the number of such cases, ``count_nan`` the others. An inf (one mask empty under the
surface-distance conventions) is kept: it makes the mean inf and the std NaN, the median is robust to it,
and ``count_inf`` says how many there are. ``foreground_mean`` is the mean of the class means (NaN-skipping).
``dice_global`` pools the voxels of every case, ``2 sum(TP) / (2 sum(TP) + sum(FP) + sum(FN))`` (the LiTS
challenge's "Dice global", next to its "Dice per case" = ``dice.mean``): big structures weigh more, and a
case whose small lesion is missed does not drag it to 0 as it does the per-case mean; NaN when no case has
the class in the reference or the prediction. ``unmatched_predictions`` lists predictions without a
reference (not evaluated).

Lesion-level detection (:func:`medseg_jax.metrics.lesions.lesion_detection`: a reference component counts
as detected when any predicted voxel of the class overlaps it, a predicted component overlapping no
reference component is a false positive; full connectivity) is counted per case and class
(:data:`LESION_COLUMNS` in ``metrics.csv``) and pooled per class in ``summary.json`` under ``lesions``:
``reference_lesions``, ``detected``, ``predicted_lesions``, ``false_positives``, ``sensitivity`` (detected /
reference lesions of all cases) and ``precision`` (predicted components that overlap a reference lesion /
all predicted components), NaN (null) where the denominator is 0.

References and predictions must be label maps: non-negative integers, and with ``labels`` given only
the declared values (background 0 included). Anything else, such as a CT image given as a reference, is a
:class:`DataError` naming the file.

``inf_distance`` replaces the inf HD95 / ASSD of a case whose prediction or reference is empty (but
not both) by a finite worst value before aggregating, so that means stay finite and a miss still costs:
a distance in mm (BraTS uses 373.13 mm) or ``"diagonal"``, the physical diagonal of that case's image
(the largest distance two of its voxels can have, as Metrics Reloaded recommends). Default None: inf is
kept, as nnU-Net and MONAI do. In our ``summary.json`` NaN is
written as null and inf as the string "inf"; ``metrics.csv`` writes "nan" / "inf".
"""

from __future__ import annotations

import csv
import io
import json
import os
import warnings
from pathlib import Path

import numpy as np

from medseg_jax.atomic import json_safe, write_json_atomic, write_text_atomic
from medseg_jax.data.case_files import find_label_files
from medseg_jax.data.image_io import read_nifti, read_nifti_header
from medseg_jax.errors import ConfigError, DataError
from medseg_jax.metrics.conventions import check_convention
from medseg_jax.metrics.lesions import lesion_detection
from medseg_jax.metrics.overlap import dice_iou_from_counts
from medseg_jax.metrics.per_class import (
    DEFAULT_NSD_TOLERANCE_MM,
    METRIC_NAMES,
    empty_case_metrics,
    segmentation_metrics,
)
from medseg_jax.metrics.surface import SURFACE_DEFINITIONS
from medseg_jax.process_pool import map_in_processes

# Per case and class, after the voxel metrics: connected components (:mod:`medseg_jax.metrics.lesions`).
LESION_COLUMNS = ("reference_lesions", "detected_lesions", "predicted_lesions", "false_positive_lesions")
COLUMNS = ("case", "class", "label", *METRIC_NAMES, "tn", *LESION_COLUMNS)
# Also in every row, not in metrics.csv (machine paths would make equal evaluations' files differ).
FILE_COLUMNS = ("prediction_file", "reference_file")
AGGREGATED = ("dice", "iou", "hd95", "assd", "nsd", "volume_ref", "volume_pred", "volume_diff")
SCORES = ("dice", "iou", "hd95", "assd", "nsd")
# What write_evaluation's summary.json holds: ours, or nnU-Net v2's layout (ours then in summary_medseg.json).
SUMMARY_FORMATS = ("medseg", "nnunet")
# The per-label metrics of nnU-Net v2's summary.json (nnunetv2/evaluation/evaluate_predictions.py).
NNUNET_METRICS = ("Dice", "IoU", "FP", "TP", "FN", "TN", "n_pred", "n_ref")


def read_labels(path: str | os.PathLike) -> dict[str, int]:
    """Foreground labels ``{name: value}`` from a dataset.json (nnU-Net ``{name: int}`` or MSD ``{"1": name}``).

    Background (value 0) is left out. The rules are those of training
    (:func:`medseg_jax.data.dataset.parse_labels`): a missing or malformed ``labels``, region-based labels,
    ``regions_class_order`` and nnU-Net's ``ignore`` label raise ConfigError naming the file and the field.
    """
    from medseg_jax.data.dataset import parse_labels

    path = Path(path)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read labels ({exc})") from exc
    if not isinstance(meta, dict):
        raise ConfigError(f"{path}: expected a JSON object with a field 'labels'")
    labels, problems = parse_labels(meta)
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    return check_labels(labels, where=str(path))


def check_labels(labels: dict, where: str = "labels") -> dict[str, int]:
    """``labels`` as ``{str name: int value}`` without background (0); ConfigError if malformed."""
    bad = {
        name: v for name, v in labels.items() if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0
    }
    if bad:
        raise ConfigError(f"{where}: label values must be non-negative integers (one per name), got {bad}")
    out = {str(name): int(v) for name, v in labels.items() if int(v) != 0}
    if len(set(out.values())) != len(out):
        raise ConfigError(f"{where}: two labels share a value ({out})")
    if not out:
        raise ConfigError(f"{where}: no foreground label (every value is 0)")
    return out


def evaluate_folders(
    pred_dir,
    ref_dir,
    labels: dict[str, int] | None = None,
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
    num_workers: int = 1,
    progress: bool = True,
    empty: str = "nnunet",
    surface: str = "element",
    affine_tolerance: float = 1e-3,
    inf_distance: float | str | None = None,
) -> tuple[list[dict], dict]:
    """Evaluate every reference in ``ref_dir`` against the prediction of the same name in ``pred_dir``.

    ``labels``: ``{name: value}`` of the classes (background 0 ignored); a reference or prediction holding
    another value is an error naming the file. Default: every non-zero value found in the references, named
    by its value (values found only in predictions are then not evaluated). ``empty`` / ``surface``: see
    :func:`medseg_jax.metrics.segmentation_metrics`.
    Affines must agree entry-wise within ``affine_tolerance`` (mm). ``inf_distance``: see the module
    docstring (None, a distance in mm, or ``"diagonal"``).

    Returns ``(rows, summary)``: one row per case x class (keys :data:`COLUMNS` and :data:`FILE_COLUMNS`,
    cases sorted) and the summary described in the module docstring. Raises DataError listing the references without a
    prediction, or naming every case whose shape or affine differ, before any metric is computed, and
    naming the first file that is no label map (see the module docstring); nothing is written.
    """
    check_settings(empty, surface, nsd_tolerance_mm)  # every setting before reading anything
    labels = None if labels is None else check_labels(labels)
    inf_distance = check_inf_distance(inf_distance)
    refs, preds = find_label_files(ref_dir), find_label_files(pred_dir)
    if not refs:
        raise DataError(f"{ref_dir}: no reference NIfTI files (.nii.gz / .nii)")
    missing = sorted(set(refs) - set(preds))
    if missing:
        raise DataError(f"{pred_dir}: no prediction for {len(missing)} reference case(s): {', '.join(missing)}")
    return evaluate_pairs(
        preds,
        refs,
        labels,
        nsd_tolerance_mm=nsd_tolerance_mm,
        num_workers=num_workers,
        progress=progress,
        empty=empty,
        surface=surface,
        affine_tolerance=affine_tolerance,
        inf_distance=inf_distance,
        ref_where=str(ref_dir),
    )


def check_settings(empty: str, surface: str, nsd_tolerance_mm: float) -> None:
    """ConfigError for an unknown empty-mask convention or surface definition, or a negative NSD tolerance."""
    check_convention(empty)
    if surface not in SURFACE_DEFINITIONS:
        raise ConfigError(f"surface must be one of {SURFACE_DEFINITIONS}, got {surface!r}")
    if not nsd_tolerance_mm >= 0:
        raise ConfigError(f"NSD tolerance must be >= 0 mm, got {nsd_tolerance_mm}")


def evaluate_pairs(
    preds: dict[str, Path],
    refs: dict[str, Path],
    labels: dict[str, int] | None = None,
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
    num_workers: int = 1,
    progress: bool = True,
    empty: str = "nnunet",
    surface: str = "element",
    affine_tolerance: float = 1e-3,
    inf_distance: float | str | None = None,
    ref_where: str = "the references",
    distances: bool = True,
) -> tuple[list[dict], dict]:
    """:func:`evaluate_folders` for explicit files: ``refs`` and ``preds`` map case ids to label files
    (every reference needs a prediction; predictions without a reference are listed as unmatched).
    ``distances=False``: overlap and volume metrics only (HD95, ASSD and NSD NaN; as ``find-best`` compares)."""
    from tqdm.auto import tqdm

    check_settings(empty, surface, nsd_tolerance_mm)
    labels = None if labels is None else check_labels(labels)
    inf_distance = check_inf_distance(inf_distance)
    missing = sorted(set(refs) - set(preds))
    if missing:
        raise DataError(f"no prediction for {len(missing)} reference case(s): {', '.join(missing)}")
    _check_geometry(refs, preds, affine_tolerance)
    classes = None if labels is None else sorted(labels.values())
    jobs = [
        (case, str(preds[case]), str(refs[case]), classes, nsd_tolerance_mm, empty, surface, inf_distance, distances)
        for case in refs
    ]
    results = []
    with tqdm(total=len(jobs), desc="evaluate", unit="case", disable=not progress) as bar:
        for result in map_in_processes(_evaluate_case, jobs, num_workers):
            results.append(result)
            bar.update(1)
    if labels is None:
        found = sorted(set().union(*(result["present"] for result in results)))
        if not found:
            raise DataError(f"{ref_where}: no reference contains a foreground label; pass the labels to evaluate")
        labels = {str(k): k for k in found}
    rows = []
    for result in results:
        case = result["case"]
        files = {"prediction_file": str(preds[case]), "reference_file": str(refs[case])}
        for name, value in labels.items():
            metrics = result["metrics"].get(value) or {
                **empty_case_metrics(empty),
                **dict.fromkeys(LESION_COLUMNS, 0),
            }
            tn = result["voxels"] - metrics["tp"] - metrics["fp"] - metrics["fn"]
            rows.append({"case": case, "class": name, "label": value, **metrics, "tn": tn, **files})
    settings = {
        "nsd_tolerance_mm": nsd_tolerance_mm,
        "empty": empty,
        "surface": surface,
        "inf_distance": inf_distance,
        "dims": sorted({result["dim"] for result in results}),
        "distances": distances,
    }
    summary = summarize(rows, labels, settings)
    summary["unmatched_predictions"] = sorted(set(preds) - set(refs))
    return rows, summary


def summarize(rows: list[dict], labels: dict[str, int], settings: dict) -> dict:
    """Per-class aggregation of ``rows`` (see the module docstring for the convention)."""
    per_class = {}
    for name, value in labels.items():
        entry: dict = {"label": value}
        for metric in AGGREGATED:
            entry[metric] = _aggregate([r[metric] for r in rows if r["label"] == value])
        entry["dice_global"] = pooled_dice([r for r in rows if r["label"] == value])
        entry["lesions"] = pooled_lesions([r for r in rows if r["label"] == value])
        per_class[name] = entry
    foreground = {}
    for metric in SCORES:
        means = np.array([per_class[n][metric]["mean"] for n in per_class], dtype=float)
        foreground[metric] = float(np.mean(means[~np.isnan(means)])) if (~np.isnan(means)).any() else float("nan")
    dims = settings.get("dims", [3])
    units = sorted({"mL" if d == 3 else "mm^2" for d in dims})
    return {
        "num_cases": len({r["case"] for r in rows}),
        "conventions": {
            "empty": settings["empty"],
            "empty_description": _EMPTY_DESCRIPTIONS[settings["empty"]],
            "surface": settings["surface"],
            "inf_distance": settings.get("inf_distance"),
            "nsd_tolerance_mm": settings["nsd_tolerance_mm"],
            "surface_distances": (
                "computed" if settings.get("distances", True) else "not computed (HD95, ASSD and NSD are NaN)"
            ),
            "hd_percentile": 95,
            "volume_unit": " / ".join(units),
            "aggregation": (
                "mean, median and std (ddof 0) over the cases whose value is not NaN; inf values are "
                "kept (mean inf, std NaN); count = cases not NaN"
            ),
        },
        "classes": per_class,
        "foreground_mean": foreground,
    }


def pooled_dice(rows: list[dict]) -> float:
    """Dice of the voxels of all ``rows`` together (their ``tp``, ``fp``, ``fn`` counts); NaN if all empty."""
    tp, fp, fn = (sum(int(r[k]) for r in rows) for k in ("tp", "fp", "fn"))
    return float(dice_iou_from_counts(tp, fp, fn, empty="nnunet")[0])


def pooled_lesions(rows: list[dict]) -> dict:
    """Lesion detection of all ``rows`` together (:data:`LESION_COLUMNS` summed; see the module docstring)."""
    reference, detected, predicted, false_positives = (sum(int(r[k]) for r in rows) for k in LESION_COLUMNS)
    return {
        "reference_lesions": reference,
        "detected": detected,
        "predicted_lesions": predicted,
        "false_positives": false_positives,
        "sensitivity": detected / reference if reference else float("nan"),
        "precision": (predicted - false_positives) / predicted if predicted else float("nan"),
    }


def write_evaluation(
    out_dir: str | os.PathLike, rows: list[dict], summary: dict, summary_format: str = "medseg"
) -> dict[str, Path]:
    """Write ``metrics.csv`` and the summary into ``out_dir``, each file atomically; returns their paths.

    ``summary_format`` "medseg": ``summary.json`` is ours (path ``"summary"``). "nnunet": ``summary.json``
    is nnU-Net v2's (:func:`nnunet_summary`, path ``"nnunet"``) and ours is ``summary_medseg.json``.
    """
    if summary_format not in SUMMARY_FORMATS:
        raise ConfigError(f"summary format must be one of {SUMMARY_FORMATS}, got {summary_format!r}")
    out_dir = Path(out_dir)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: row[c] for c in COLUMNS} for row in rows)
    paths = {"metrics": out_dir / "metrics.csv", "summary": out_dir / "summary.json"}
    if summary_format == "nnunet":
        paths = {**paths, "summary": out_dir / "summary_medseg.json", "nnunet": out_dir / "summary.json"}
        write_text_atomic(paths["nnunet"], nnunet_json_text(nnunet_summary(rows)))
    write_text_atomic(paths["metrics"], buffer.getvalue())
    write_json_atomic(paths["summary"], json_safe(summary))
    return paths


def nnunet_summary(rows: list[dict]) -> dict:
    """nnU-Net v2's summary of ``rows`` (see the module docstring), computed from their voxel counts.

    ``rows``: one per case x class with ``case``, ``label``, ``tp``, ``fp``, ``fn``, ``tn`` and
    :data:`FILE_COLUMNS` (those of :func:`evaluate_folders`, or of several evaluations concatenated, as
    for a cross-validation summary); every case must have a row for every label. Cases keep the order of
    ``rows``.
    """
    if not rows:
        raise DataError("no evaluated case to summarise")
    per_case: dict[str, dict] = {}
    for row in rows:
        entry = per_case.setdefault(row["case"], {name: str(row[name]) for name in FILE_COLUMNS} | {"metrics": {}})
        counts = (int(row[k]) for k in ("tp", "fp", "fn", "tn"))
        entry["metrics"][str(row["label"])] = nnunet_case_metrics(*counts)
    keys = list(dict.fromkeys(str(row["label"]) for row in rows))
    incomplete = sorted(case for case, entry in per_case.items() if set(entry["metrics"]) != set(keys))
    if incomplete:
        raise DataError(f"cases {incomplete} lack a row for some of the labels {keys}")
    cases = list(per_case.values())
    mean = {key: {m: _nanmean([c["metrics"][key][m] for c in cases]) for m in NNUNET_METRICS} for key in keys}
    # nnU-Net leaves out a key "0" (background) and takes a plain mean: one NaN class mean makes it NaN.
    foreground = [key for key in keys if key != "0"]
    foreground_mean = {m: float(np.mean([mean[key][m] for key in foreground])) for m in NNUNET_METRICS}
    return {"metric_per_case": cases, "mean": mean, "foreground_mean": foreground_mean}


def nnunet_case_metrics(tp: int, fp: int, fn: int, tn: int) -> dict:
    """One case's metrics of one label as nnU-Net's ``compute_metrics`` gives them (Dice/IoU NaN if both empty)."""
    dice, iou = (float(v) for v in dice_iou_from_counts(tp, fp, fn, empty="nnunet"))
    return {"Dice": dice, "IoU": iou, "FP": fp, "TP": tp, "FN": fn, "TN": tn, "n_pred": tp + fp, "n_ref": tp + fn}


def nnunet_json_text(summary: dict) -> str:
    """``summary`` as nnU-Net's ``save_summary_json`` writes it: sorted keys, indent 4, NaN as ``NaN``."""
    return json.dumps(summary, sort_keys=True, indent=4)


def _nanmean(values: list) -> float:
    """numpy's nanmean, as nnU-Net takes it, without the warning it gives when every value is NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(np.asarray(values, dtype=float)))


def format_table(summary: dict) -> str:
    """A plain-text table of the class means (+- std) of every score and the mean volume difference."""
    conventions = summary["conventions"]
    headers = [
        "class",
        "cases",
        "Dice",
        "global Dice",
        "IoU",
        "HD95 mm",
        "ASSD mm",
        f"NSD@{conventions['nsd_tolerance_mm']:g}mm",
        f"dVol {conventions['volume_unit']}",
        "lesions found",
    ]
    lines = []
    for name, entry in summary["classes"].items():
        nan = entry["dice"]["count_nan"]
        cases = f"{entry['dice']['count']}" + (f" (+{nan} NaN)" if nan else "")
        scores = [_mean_std(entry[m]) for m in (*SCORES, "volume_diff")]
        lesions = entry["lesions"]
        found = f"{lesions['detected']}/{lesions['reference_lesions']}, {lesions['false_positives']} FP"
        lines.append([name, cases, scores[0], f"{entry['dice_global']:.4f}", *scores[1:], found])
    fg = summary["foreground_mean"]
    fg_scores = [f"{fg[m]:.4g}" for m in SCORES]
    lines.append(["mean", "", fg_scores[0], "", *fg_scores[1:], "", ""])
    widths = [max(len(str(row[i])) for row in [headers] + lines) for i in range(len(headers))]
    text = [" ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [headers] + lines]
    worst = conventions.get("inf_distance")
    replaced = (
        ""
        if worst is None
        else "; inf HD95/ASSD replaced by " + ("each image's diagonal" if worst == "diagonal" else f"{worst:g} mm")
    )
    text.append(
        f"empty masks: {conventions['empty']} ({conventions['empty_description']}); "
        f"surface: {conventions['surface']}{replaced}; lesions: connected components, found when "
        "overlapped, FP = predicted components touching none"
    )
    return "\n".join(text)


_EMPTY_DESCRIPTIONS = {
    "nnunet": "both empty -> NaN; one empty -> Dice/IoU/NSD 0, HD95/ASSD inf",
    "monai": "reference empty -> NaN; prediction empty -> Dice/IoU/NSD 0, HD95/ASSD inf",
}


def _check_geometry(refs: dict[str, Path], preds: dict[str, Path], tolerance: float) -> None:
    """Raise one DataError naming every case whose prediction's shape or affine differs from its reference."""
    problems = []
    for case, ref_path in refs.items():
        ref_shape, ref_affine = read_nifti_header(ref_path)
        pred_shape, pred_affine = read_nifti_header(preds[case])
        if ref_shape != pred_shape:
            problems.append(f"case {case}: prediction shape {pred_shape} != reference shape {ref_shape}")
        elif not np.allclose(ref_affine, pred_affine, rtol=0.0, atol=tolerance):
            problems.append(
                f"case {case}: prediction affine differs from the reference affine "
                f"(max difference {np.max(np.abs(ref_affine - pred_affine)):.4g} mm)"
            )
    if problems:
        raise DataError(
            "geometry mismatch between predictions and references:\n" + "\n".join(f"  - {p}" for p in problems)
        )


def check_inf_distance(value) -> float | str | None:
    """``None``, ``"diagonal"`` or a distance in mm > 0 (numbers given as text are converted)."""
    if value is None or value == "diagonal":
        return value
    try:
        distance = float(value)
    except (TypeError, ValueError):
        distance = float("nan")
    if not (np.isfinite(distance) and distance > 0):
        raise ConfigError(f"inf_distance must be a distance in mm > 0 or 'diagonal', got {value!r}")
    return distance


def replace_infinite_distances(metrics: dict, worst_mm: float) -> dict:
    """A copy of one class's metrics with an inf HD95 / ASSD (one mask empty) set to ``worst_mm``."""
    return {k: (worst_mm if k in ("hd95", "assd") and v == float("inf") else v) for k, v in metrics.items()}


def image_diagonal_mm(shape, spacing) -> float:
    """The distance between the centres of an image's first and last voxels, in mm."""
    return float(np.linalg.norm((np.asarray(shape, float) - 1) * np.asarray(spacing, float)))


def _evaluate_case(
    case, pred_path, ref_path, classes, nsd_tolerance_mm, empty, surface, inf_distance=None, distances=True
) -> dict:
    """Worker: the ``case``, the labels ``present`` in the reference, its ``dim``, its number of ``voxels``
    and its ``metrics`` ({class: metrics and lesion counts})."""
    reference, prediction = read_nifti(ref_path), read_nifti(pred_path)
    declared = None if classes is None else {0, *classes}
    ref = label_map(reference.array, case, ref_path, declared)
    pred = label_map(prediction.array, case, pred_path, declared)
    spacing = reference.spacing
    if ref.ndim == 3 and 1 in ref.shape:  # a single-slice 3D file holds a 2D image
        keep = [a for a, n in enumerate(ref.shape) if n != 1]
        if len(keep) == 2:
            ref, pred = ref.squeeze(), pred.squeeze()
            spacing = tuple(spacing[a] for a in keep)
    present = {int(k) for k in np.unique(ref) if k != 0}
    todo = classes if classes is not None else sorted(present | {int(k) for k in np.unique(pred) if k != 0})
    metrics = segmentation_metrics(
        pred, ref, spacing, todo, nsd_tolerance_mm=nsd_tolerance_mm, empty=empty, surface=surface, distances=distances
    )
    if inf_distance is not None:
        worst = image_diagonal_mm(ref.shape, spacing) if inf_distance == "diagonal" else inf_distance
        metrics = {k: replace_infinite_distances(m, worst) for k, m in metrics.items()}
    metrics = {k: {**m, **lesion_counts(pred, ref, k)} for k, m in metrics.items()}
    return {"case": case, "present": present, "dim": ref.ndim, "voxels": int(ref.size), "metrics": metrics}


def lesion_counts(prediction: np.ndarray, reference: np.ndarray, class_id: int) -> dict:
    """One case's :data:`LESION_COLUMNS` for one class (:func:`~medseg_jax.metrics.lesions.lesion_detection`)."""
    found = lesion_detection(prediction, reference, class_id)
    return dict(
        zip(
            LESION_COLUMNS,
            (found["reference_lesions"], found["detected"], found["predicted_lesions"], found["false_positives"]),
        )
    )


def label_map(array: np.ndarray, case: str, path, declared: set[int] | None = None) -> np.ndarray:
    """``array`` as int64 labels; DataError naming the file if it is no label map (of ``declared`` values)."""
    from medseg_jax.data.dataset import label_value_problem

    values = np.unique(array)
    problem = label_value_problem(values, declared, source=f"the labels {sorted(declared or ())}")
    if problem is not None:
        raise DataError(f"case {case}: {path} is not a label map: it {problem}")
    return array.astype(np.int64, copy=False)


def _aggregate(values: list[float]) -> dict:
    array = np.asarray(values, dtype=float)
    kept = array[~np.isnan(array)]
    stats = {"mean": float("nan"), "median": float("nan"), "std": float("nan")}
    if kept.size:
        with np.errstate(invalid="ignore"):
            stats = {"mean": float(np.mean(kept)), "median": float(np.median(kept)), "std": float(np.std(kept))}
    return {
        **stats,
        "count": int(kept.size),
        "count_nan": int(array.size - kept.size),
        "count_inf": int(np.isinf(kept).sum()),
    }


def _mean_std(stats: dict) -> str:
    mean, std = stats["mean"], stats["std"]
    if np.isnan(mean):
        return "nan"
    if np.isinf(mean):  # some case had an empty mask: the median still says something
        return f"{mean:.4g} (median {stats['median']:.4g})"
    return f"{mean:.4g}" if np.isnan(std) else f"{mean:.4g} +- {std:.2g}"
