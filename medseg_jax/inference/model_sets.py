"""What ``medseg-jax predict --model`` names: one training run, several (an ensemble), or a model folder.

- one run folder (``medseg-jax train`` / ``import-nnunet``): a :class:`~medseg_jax.inference.predict.Predictor`;
- several run folders (the folds of a cross-validation, or runs of several configurations such as 2D and
  3D): an :class:`~medseg_jax.inference.predict.EnsemblePredictor` averaging their probabilities on the
  scan's grid, as ``nnUNetv2_predict -f 0 1 2 3 4`` and ``nnUNetv2_ensemble`` do;
- a model folder written by ``medseg-jax find-best``: its ``model.json`` lists the runs (paths relative to
  the folder, or absolute) and the postprocessing chosen on the cross-validation.

A 3d_cascade_fullres run brings its first stage: the 3d_lowres runs its plan names predict each scan first
(one predictor for every cascade run of the same 3d_lowres cross-validation).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from medseg_jax.atomic import read_json
from medseg_jax.cascade import is_cascade, previous_stage_runs
from medseg_jax.errors import ConfigError, DataError

MODEL_SET_NAME = "model.json"


def is_model_set(path: Path) -> bool:
    return (Path(path) / MODEL_SET_NAME).is_file()


def read_model_set(folder: Path) -> tuple[list[Path], list[list[int]]]:
    """``(run folders, postprocessing groups)`` of a model folder's ``model.json``."""
    path = Path(folder) / MODEL_SET_NAME
    record = read_json(path)
    runs = record.get("runs") if isinstance(record, dict) else None
    if not isinstance(runs, list) or not runs or not all(isinstance(r, str) for r in runs):
        raise DataError(f"{path}: 'runs' must be a non-empty list of run folders")
    steps = record.get("postprocessing", [])
    if not isinstance(steps, list):
        raise DataError(f"{path}: 'postprocessing' must be a list of class groups")
    resolved = [(Path(folder) / run).resolve() if not Path(run).is_absolute() else Path(run) for run in runs]
    return resolved, steps


def expand_models(paths) -> tuple[list[Path], list[list[int]]]:
    """The run folders ``--model`` names (model folders expanded) and the postprocessing they carry."""
    runs: list[Path] = []
    steps: list[list[int]] = []
    for path in map(Path, paths):
        if is_model_set(path):
            if len(paths) > 1:
                raise ConfigError(f"{path} is a model folder (it lists its own runs); give it alone to --model")
            runs, steps = read_model_set(path)
        else:
            runs.append(path)
    if len(set(runs)) != len(runs):
        raise ConfigError(f"--model names a run twice: {', '.join(map(str, runs))}")
    return runs, steps


def build_predictor(
    model_paths,
    checkpoint: str = "latest",
    inference_changes: dict | None = None,
    *,
    postprocessing=None,
    autotune: bool = False,
    log=print,
    previous_stage_predictions=None,
    **predictor_options,
):
    """A :class:`Predictor` for one run, an :class:`EnsemblePredictor` for several (or a model folder).

    ``inference_changes`` (e.g. ``step_size``, ``mirror_axes``) replace fields of each run's own inference
    config; ``postprocessing`` (class groups) replaces what a model folder carries; ``autotune`` times the
    implementations left at ``auto`` for each run's network before anything is compiled. Other options go to
    every member (``accumulate``, ``mesh``) and ``largest_component`` to the ensemble.
    ``previous_stage_predictions``: a folder of 3d_lowres label maps (``{case}.nii.gz``, as ``predict`` writes
    them) that cascade runs read instead of running their 3d_lowres runs (nnU-Net's ``-prev_stage_predictions``).
    """
    from medseg_jax.inference.predict import EnsemblePredictor, Predictor
    from medseg_jax.inference.run_folder import load_run

    runs, carried = expand_models(model_paths)
    steps = carried if postprocessing is None else postprocessing
    largest_component = predictor_options.pop("largest_component", False)
    first_stages: dict[tuple[Path, ...], object] = {}  # cascade runs of one 3d_lowres CV share its predictor
    saved = None if previous_stage_predictions is None else SavedFirstStage(previous_stage_predictions)

    def first_stage(plan: dict):
        if not is_cascade(plan):
            return None
        if saved is not None:
            return saved
        key = tuple(previous_stage_runs(plan))
        if key not in first_stages:
            log(f"3d_cascade_fullres: first stage {', '.join(map(str, key))}")
            first_stages[key] = build_predictor(
                key, checkpoint, inference_changes, postprocessing=[], autotune=autotune, log=log, **predictor_options
            )
        return first_stages[key]

    loaded = []
    for run in runs:
        model, params, plan, config = load_run(run, checkpoint)
        inference = dataclasses.replace(config.inference, **(inference_changes or {}))
        if autotune:
            model = _tuned(model, plan, inference, config.model.in_channels, log)
        loaded.append((model, params, plan, inference))
    if saved is not None and not any(is_cascade(member[2]) for member in loaded):
        raise ConfigError(
            "--previous-stage-predictions is for 3d_cascade_fullres runs; none of the --model runs is one"
        )
    if len(loaded) == 1:
        model, params, plan, inference = loaded[0]
        return Predictor(
            model,
            params,
            plan,
            inference,
            largest_component=largest_component,
            postprocessing=steps,
            previous_stage=first_stage(plan),
            **predictor_options,
        )
    members = [Predictor(*member, previous_stage=first_stage(member[2]), **predictor_options) for member in loaded]
    return EnsemblePredictor(
        members, largest_component=largest_component, postprocessing=steps, names=[str(r) for r in runs]
    )


class SavedFirstStage:
    """A cascade's first stage read from a folder of label maps instead of predicted: for a scan read from
    ``case_0000.nii.gz`` (or a DICOM folder ``case/``), ``FOLDER/case.nii.gz``."""

    def __init__(self, folder):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ConfigError(f"--previous-stage-predictions {folder}: not a folder")

    def predict_volume(self, images):
        from medseg_jax.data.image_io import read_nifti
        from medseg_jax.inference.predict import Prediction, _case_name

        source = images[0].metadata.get("source")
        if source is None:
            raise DataError("a saved first stage needs scans read from files (their names name the case)")
        path = self.folder / f"{_case_name(Path(source))}.nii.gz"
        if not path.is_file():
            raise DataError(f"no 3d_lowres prediction {path} for the scan {source}")
        return Prediction(read_nifti(path), None, {})


def _tuned(model, plan: dict, inference, in_channels: int, log):
    """``model`` with the implementations left at ``auto`` replaced by the fastest for one window batch."""
    from medseg_jax.models.ensemble import Ensemble
    from medseg_jax.tuning import inference_input_shape, tune_model

    shape = inference_input_shape(plan, inference, in_channels)
    if isinstance(model, Ensemble):  # every member has the same layers: tune one, use it for all
        return model.clone(network=tune_model(model.network, shape, backward=False, log=log)[0])
    return tune_model(model, shape, backward=False, log=log)[0]
