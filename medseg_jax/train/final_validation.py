"""The validation at the end of a fold, as nnU-Net's ``perform_actual_validation``.

When training finishes, every validation case of the fold is predicted as ``medseg-jax predict`` predicts
a scan (sliding window with the run's inference settings, mirroring included, probabilities mapped back
to the scan's own grid) from the preprocessed case in the store, and compared with the case's reference
label on that grid. ``RUN/validation/`` then holds:

- ``{case}.nii.gz`` (label map) and ``{case}.npz`` (probabilities, affine, labels: the format of
  ``predict --save-probabilities``), what ``medseg-jax find-best`` ensembles and postprocesses;
- ``metrics.csv`` and ``summary.json`` (:mod:`medseg_jax.evaluation`; ``summary.json`` adds ``references``,
  the reference file of each case, ``step``, the checkpoint's step, and ``inference``). ``summary.json``
  is written last: a fold whose validation is complete has it.

The reference is the label file the case was preprocessed from (the store records it), as nnU-Net compares
with its ``gt_segmentations``; where that file is gone (the dataset moved), the store's label mapped back
to the scan's grid is written to ``validation/references/`` and used instead (``reference_source`` says
which). A validation killed midway continues with the cases not yet written; one of an earlier
checkpoint (the run was trained further) is started again.

Three stages, which ``train.loop`` runs (on several processes: the first and last on process 0, the cases
shared): :func:`start_validation`, :func:`predict_validation_cases`, :func:`write_validation_summary`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from medseg_jax.atomic import read_json, write_json_atomic
from medseg_jax.data.image_io import read_nifti_header, write_nifti
from medseg_jax.data.preprocess import restore_geometry

VALIDATION_DIR = "validation"
SUMMARY_NAME = "summary.json"
STATE_NAME = "state.json"
REFERENCES_DIR = "references"


def validation_summary(run_dir) -> dict | None:
    """The fold's final-validation ``summary.json``, or None when its validation is not complete."""
    path = Path(run_dir) / VALIDATION_DIR / SUMMARY_NAME
    return read_json(path) if path.is_file() else None


def reference_file(store, case_id: str, properties: dict, out: Path) -> tuple[Path, str]:
    """``(reference label file on the scan's grid, "dataset" | "store")`` of one validation case."""
    recorded = properties.get("label_file")
    if recorded and Path(recorded).is_file():
        shape, _ = read_nifti_header(recorded)
        if list(shape) == list(properties["original_shape"]):
            return Path(recorded), "dataset"
    _, label = store.read_case(case_id)
    restored = restore_geometry(label, properties, kind="label")
    return write_nifti(restored, out / REFERENCES_DIR / f"{case_id}.nii.gz", dtype=np.uint8), "store"


def start_validation(run_dir, step: int) -> None:
    """Start (or continue) the validation of checkpoint ``step``; one of another step is removed (one
    process does this before any predicts)."""
    out = Path(run_dir) / VALIDATION_DIR
    state = read_json(out / STATE_NAME) if (out / STATE_NAME).is_file() else None
    if state is not None and state.get("step") != step:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / STATE_NAME, {"step": step})


def predict_validation_cases(
    run_dir, store, case_ids, model, params, plan: dict, inference_config, *, mesh=None, progress: bool = True
) -> int:
    """Predict each of ``case_ids`` not yet in ``RUN/validation`` (label map and probabilities, each file
    atomic); returns how many were predicted. Processes of a cluster each call it with their own cases."""
    from tqdm.auto import tqdm

    from medseg_jax.inference.predict import Predictor, write_outputs

    out = Path(run_dir) / VALIDATION_DIR
    predictor = Predictor(model, params, plan, inference_config, mesh=mesh)
    predicted = 0
    for case_id in tqdm(case_ids, desc="final validation", unit="case", disable=not progress):
        target = out / f"{case_id}.nii.gz"
        if target.is_file() and target.with_name(f"{case_id}.npz").is_file():
            continue  # written before a kill: each file is complete (atomic)
        image, _ = store.read_case(case_id)
        logits = predictor.window_logits(image)
        properties = store.read_properties(case_id)
        prediction = predictor.finish(logits, properties, case_id, return_probabilities=True, case_id=case_id)
        write_outputs(prediction, target, labels=plan["labels"])
        predicted += 1
    return predicted


def write_validation_summary(run_dir, store, case_ids, plan: dict, inference_config, step: int) -> dict:
    """Evaluate the predicted validation cases against their references into ``RUN/validation`` (metrics.csv,
    then summary.json, last); returns the summary."""
    from medseg_jax.evaluation import evaluate_pairs, write_evaluation

    out = Path(run_dir) / VALIDATION_DIR
    predictions, references, sources = {}, {}, {}
    for case_id in case_ids:
        properties = store.read_properties(case_id)
        references[case_id], sources[case_id] = reference_file(store, case_id, properties, out)
        predictions[case_id] = out / f"{case_id}.nii.gz"
    rows, summary = evaluate_pairs(predictions, references, plan["labels"], progress=False)
    summary.update(
        step=step,
        references={case: str(path) for case, path in references.items()},
        reference_source=sources,
        inference={"step_size": inference_config.step_size, "mirror_axes": inference_config.mirror_axes},
    )
    write_evaluation(out, rows, summary)
    return summary
