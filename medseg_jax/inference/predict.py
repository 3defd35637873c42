"""Scan -> mask prediction: preprocessing, sliding window, inverse geometry, postprocessing, files.

Per case (:meth:`Predictor.predict_volume`):

1. ``preprocess_case(images, None, plan)``: RAS, crop to non-zero, resample, normalise (the plan's steps);
2. sliding window on the preprocessed grid (:func:`~medseg_jax.inference.sliding_window.sliding_window`):
   3D plans predict the whole volume; 2D plans (``plan["dim"] == 2``) predict every slice along the last
   (RAS z) axis, all slices batched through one 2D sliding window;
3. softmax over classes, ``restore_geometry(kind="probabilities")`` (order-1 resampling back, background
   probability 1 outside the crop box, original orientation), then the arg-max: nnU-Net resamples
   class scores, not labels, so boundaries are interpolated before the decision. Plans imported from
   nnU-Net (``resampling.resample_logits``) resample the logits and take the softmax after, exactly as
   nnU-Net's export does. Without probabilities to return, the softmax, resampling and arg-max run one
   class at a time (:mod:`medseg_jax.inference.restore`, the same labels; for resampled logits the
   arg-max over the logits, which the softmax does not change): host memory does not grow with
   classes x voxels;
4. optionally only the largest connected component of each foreground class is kept.

The three stages are separate methods (:meth:`Predictor.prepare`, :meth:`Predictor.window_logits`,
:meth:`Predictor.finish`) so that a folder of cases is a pipeline (:func:`predict_cases`): the next case
is read and preprocessed, and the previous one mapped back and written, while the device works on the
current one, as nnU-Net's predictor overlaps its preprocessing and export workers with the network.

The label map has exactly the input's shape and affine. File-level functions read NIfTI files or a DICOM
series folder (or a folder of series folders) and write NIfTI or a DICOM-SEG referencing the input series
(:mod:`medseg_jax.inference.dicom_seg`) atomically; probabilities go to ``{case}.npz`` (``probabilities`` float32
``(K, *original shape)``, ``affine`` and ``labels``, the plan's ``{name: value}`` as JSON text), per-class
statistics to ``{case}.statistics.json`` (:mod:`medseg_jax.inference.statistics`), both written before the
label and removed again if the label fails.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from medseg_jax.atomic import write_json_atomic
from medseg_jax.cascade import is_cascade
from medseg_jax.config import InferenceConfig
from medseg_jax.data.case_files import CHANNEL_FILE, find_image_cases, nifti_stem
from medseg_jax.data.image_io import check_finite, is_nifti, read_image, read_nifti_header, write_nifti
from medseg_jax.data.preprocess import preprocess_case, restore_geometry
from medseg_jax.data.volume import Volume
from medseg_jax.errors import ConfigError, DataError, MedsegError
from medseg_jax.inference.dicom_seg import (
    NO_SOURCE_SERIES,
    OUTPUT_FORMATS,
    SEG_SUFFIX,
    require_series_source,
    seg_target,
    series_folders,
)
from medseg_jax.inference.ensemble_probabilities import probability_writer
from medseg_jax.inference.restore import argmax_on_file_grid, class_probabilities
from medseg_jax.inference.sliding_window import sliding_window
from medseg_jax.inference.statistics import STATISTICS_SUFFIX, case_statistics
from medseg_jax.postprocess import apply_postprocessing, check_postprocessing, keep_largest_component


class Prediction(NamedTuple):
    """One case's result: ``label`` (uint8 Volume in the input's geometry), ``probabilities`` (one float32
    Volume per class, or None) and ``summary`` (``seconds``, ``volume_ml`` per foreground class, ...)."""

    label: Volume
    probabilities: list[Volume] | None
    summary: dict


class PreparedCase(NamedTuple):
    """A case after :meth:`Predictor.prepare`: the preprocessed ``image`` ``(C, *spatial)`` and the
    ``properties`` that map a prediction back to the scan's grid."""

    image: np.ndarray
    properties: dict


@dataclasses.dataclass(frozen=True)
class _FullResolution:
    """``model.apply`` returning only the full-resolution logits (deep supervision returns a list).

    A frozen dataclass, so it hashes by the model's fields and the compiled sliding-window program is
    found again for the same model whatever wrapper object a call builds.
    """

    model: Any

    def __call__(self, params, windows):
        out = self.model.apply(params, windows)
        return out[0] if isinstance(out, (list, tuple)) else out


def _voxel_volume_ml(volume: Volume) -> float:
    """Volume of one voxel in millilitres (|det| of the affine's 3x3 part in mm^3; 2D: pixel area)."""
    if volume.array.ndim == 3:
        return float(abs(np.linalg.det(volume.affine[:3, :3]))) / 1000.0
    return float(np.prod(volume.spacing)) / 1000.0


class Predictor:
    """Predicts cases with one model, parameters, plan and inference settings.

    ``model`` is a Flax module whose ``apply(params, x)`` maps ``(N, *patch, C)`` to logits (or a list of
    them, highest resolution first); ``plan`` is the training run's plan; ``inference_config`` an
    :class:`~medseg_jax.config.InferenceConfig` (``mirror_axes`` null = every axis of the network,
    ``()`` = no mirroring). Compiled programs are reused for every case of the same preprocessed shape
    (with ``accumulate="host"``: for every case). ``largest_component``: True keeps only the largest connected
    component of every foreground class, a sequence of class ids only of those (e.g. ``[1]`` for a
    single organ whose lesions may be many); ``postprocessing``: then, in order, groups of classes each
    taken as one mask that keeps its largest component (:func:`~medseg_jax.postprocess.apply_postprocessing`,
    as ``medseg-jax find-best`` chooses them); ``mesh`` splits window batches over its ``data`` axis.
    ``previous_stage``: for a cascade run (:mod:`medseg_jax.cascade`), the predictor of its 3d_lowres runs,
    which predicts each scan first unless :meth:`prepare` is given that label map.

    A case runs in three stages, which a folder pipelines (:func:`predict_cases`): :meth:`prepare` (host),
    :meth:`infer` (device) and :meth:`finish_case` (host).
    """

    def __init__(
        self,
        model,
        params,
        plan: dict,
        inference_config: InferenceConfig | None = None,
        *,
        accumulate: str = "device",
        largest_component=False,
        postprocessing=(),
        mesh=None,
        previous_stage=None,
    ):
        if mesh is not None:  # every device needs the parameters: replicate them over the mesh once
            from jax.sharding import NamedSharding, PartitionSpec

            params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
        self.params = params
        self.plan = plan
        self.config = inference_config or InferenceConfig()
        self.accumulate = accumulate
        self.largest_component = largest_component
        self.postprocessing = check_postprocessing(list(postprocessing), int(plan["num_classes"]))
        self.mesh = mesh
        self.previous_stage = previous_stage
        self.dim = int(plan["dim"])
        self.patch_size = tuple(int(p) for p in plan["patch_size"])
        self.apply_fn = _FullResolution(model)
        axes = self.config.mirror_axes
        if axes is not None and any(not 0 <= int(a) < self.dim for a in axes):
            raise ConfigError(f"inference.mirror_axes {tuple(axes)}: a {self.dim}D network has axes 0..{self.dim - 1}")

    def probabilities(self, image: np.ndarray) -> np.ndarray:
        """Softmax of the blended logits, ``(K, *spatial)`` float32, for a preprocessed ``(C, *spatial)``.

        Formed one class at a time (:func:`~medseg_jax.inference.restore.class_probabilities`), so the device
        never holds a K x voxels softmax besides the logits (none at all with ``accumulate="host"``).
        """
        return self._probabilities_of(self.window_logits(image))

    def logits(self, image: np.ndarray) -> np.ndarray:
        """The blended logits, ``(K, *spatial)`` float32, for a preprocessed ``(C, *spatial)``."""
        return self._channels_first(self.window_logits(image))

    def _slices_first(self, logits) -> bool:
        """True for a 2D network's logits of a volume: ``(Z, X, Y, K)``, the slices first."""
        return logits.ndim - 1 != self.dim

    def _channels_first(self, logits) -> np.ndarray:
        """``window_logits`` output as float32 ``(K, *spatial)`` in the image's axis order."""
        logits = np.asarray(logits, dtype=np.float32)
        if not self._slices_first(logits):
            return np.moveaxis(logits, -1, 0)
        return np.moveaxis(logits, (-1, 0), (0, logits.ndim - 1))

    def _probabilities_of(self, logits) -> np.ndarray:
        spatial = logits.shape[1:-1] + logits.shape[:1] if self._slices_first(logits) else logits.shape[:-1]
        out = np.empty((int(logits.shape[-1]), *spatial), np.float32)
        for k, probability in enumerate(class_probabilities(logits)):
            out[k] = np.moveaxis(probability, 0, -1) if self._slices_first(logits) else probability
        return out

    def window_logits(self, image: np.ndarray):
        """The sliding window's blended logits, class axis last and left where they were accumulated (a
        ``jax.Array`` on the device, or the host accumulator): ``(*spatial, K)`` for a network of the image's
        dimension, ``(Z, X, Y, K)`` (slices first) for a 2D network on a volume."""
        extra = image.ndim - 1 - self.dim
        if extra == 0:
            windows_input = np.moveaxis(image, 0, -1)
        elif extra == 1:  # 2D network on a volume: the slices along the last axis form the image batch
            windows_input = np.moveaxis(image, (0, image.ndim - 1), (-1, 0))
        else:
            raise DataError(f"a {image.ndim - 1}D image cannot be predicted with a {self.dim}D plan")
        c = self.config
        logits = sliding_window(
            self.apply_fn,
            windows_input,
            self.patch_size,
            step=c.step_size,
            sigma_scale=c.sigma_scale,
            batch_size=c.batch_size,
            mirror_axes=c.mirror_axes,
            params=self.params,
            accumulate=self.accumulate,
            mesh=self.mesh,
        )
        if logits.shape[-1] != int(self.plan["num_classes"]):
            raise ConfigError(f"the model predicts {logits.shape[-1]} classes, the plan has {self.plan['num_classes']}")
        return logits

    def restored_labels(self, image: np.ndarray, properties: dict) -> tuple[np.ndarray, np.ndarray]:
        """``(uint8 label map, affine)`` on the file's grid, one class at a time (memory bounded).

        The same labels as the arg-max over ``restore_geometry(self.probabilities(image), ...)``, without
        ever holding K probability volumes (:mod:`medseg_jax.inference.restore`).
        """
        return self._restored_labels_of(self.window_logits(image), properties)

    def _restored_labels_of(self, logits, properties: dict) -> tuple[np.ndarray, np.ndarray]:
        slices_first = self._slices_first(logits)  # 2D network: (Z, X, Y, K) -> class maps (X, Y, Z)
        kind = "logits" if self.plan.get("resampling", {}).get("resample_logits") else "probabilities"
        affine: list[np.ndarray] = []

        def to_file_grid(class_map, k):
            spatial = np.moveaxis(class_map, 0, -1) if slices_first else class_map
            volume = restore_geometry(spatial[None], properties, kind=kind, background=k == 0)[0]
            affine[:] = [volume.affine]
            return volume.array

        # nnU-Net's export resamples the logits and takes the softmax on the file's grid; the softmax keeps the
        # order of the classes at each voxel, so the arg-max over the resampled logits is the same label
        labels = argmax_on_file_grid(logits, to_file_grid, over="logits" if kind == "logits" else "probabilities")
        return labels, affine[0]

    def previous_stage_label(self, images: list[Volume]) -> Volume:
        """A cascade's first stage: the 3d_lowres runs' label map of the scan, on the scan's grid."""
        if self.previous_stage is None:
            raise ConfigError(
                "this 3d_cascade_fullres run reads the 3d_lowres prediction of each scan, and no 3d_lowres runs "
                "were given to predict it"
            )
        return self.previous_stage.predict_volume(images).label

    def prepare(self, images: list[Volume], previous_stage: Volume | None = None) -> PreparedCase:
        """Stage 1 (host): the case preprocessed with the plan's steps (a cascade's: with ``previous_stage``,
        the first stage's label map, predicted here when not given)."""
        for volume in images:  # NaN would flow through normalisation into a plausible-looking but wrong mask
            check_finite(volume, "scan")
        if is_cascade(self.plan) and previous_stage is None:
            previous_stage = self.previous_stage_label(images)
        image, _, properties = preprocess_case(images, None, self.plan, previous_stage)
        return PreparedCase(image, properties)

    def infer(self, prepared: PreparedCase):
        """Stage 2 (device): the sliding window's logits (:meth:`window_logits`), computed."""
        return jax.block_until_ready(self.window_logits(prepared.image))

    def finish_case(
        self,
        logits,
        prepared: PreparedCase,
        source: str | None = None,
        return_probabilities: bool = False,
        case_id: str | None = None,
    ) -> Prediction:
        """Stage 3 (host): :meth:`finish` of the case :meth:`prepare` made."""
        return self.finish(logits, prepared.properties, source, return_probabilities, case_id)

    def file_probabilities(self, logits, properties: dict) -> list[Volume]:
        """The class probabilities on the file's grid, one Volume per class (K x voxels of the scan)."""
        if self.plan.get("resampling", {}).get("resample_logits"):
            # nnU-Net's export (plans imported from it): logits back on the file's grid, then the softmax
            back = restore_geometry(self._channels_first(logits), properties, kind="logits")
            softmax = np.asarray(jax.nn.softmax(np.stack([v.array for v in back]), axis=0), dtype=np.float32)
            return [volume.with_array(p) for volume, p in zip(back, softmax)]
        probabilities = self._probabilities_of(logits)  # (K, *preprocessed spatial)
        return restore_geometry(probabilities, properties, kind="probabilities")

    def finish(
        self,
        logits,
        properties: dict,
        source: str | None = None,
        return_probabilities: bool = False,
        case_id: str | None = None,
    ) -> Prediction:
        """The case's :class:`Prediction` from its ``window_logits`` and the ``properties`` its preprocessing
        recorded: back on the file's grid, the arg-max, the postprocessing, the summary (``seconds`` is
        filled in by the caller). ``source``: the scan's file, recorded in the label's metadata."""
        if return_probabilities:
            restored = self.file_probabilities(logits, properties)
            label_array = np.argmax(np.stack([v.array for v in restored]), axis=0).astype(np.uint8)
            affine = restored[0].affine
        else:  # labels only: never K class volumes at once
            restored = None
            label_array, affine = self._restored_labels_of(logits, properties)
        return case_prediction(label_array, affine, restored, self, source, case_id, properties)

    def postprocess(self, label_array: np.ndarray) -> np.ndarray:
        """``largest_component``, then the ``postprocessing`` groups (uint8)."""
        if self.largest_component is True:
            label_array = keep_largest_component(label_array)
        elif self.largest_component:  # a list of class ids
            label_array = keep_largest_component(label_array, classes=list(self.largest_component))
        return apply_postprocessing(label_array, self.postprocessing).astype(np.uint8)

    def predict_volume(
        self, images: list[Volume], return_probabilities: bool = False, case_id: str | None = None
    ) -> Prediction:
        """Predict one case given one :class:`~medseg_jax.data.volume.Volume` per channel (plan order)."""
        started = time.perf_counter()
        prepared = self.prepare(images)
        source = images[0].metadata.get("source")
        prediction = self.finish_case(self.infer(prepared), prepared, source, return_probabilities, case_id)
        prediction.summary["seconds"] = round(time.perf_counter() - started, 3)
        return prediction


def case_prediction(
    label_array: np.ndarray,
    affine: np.ndarray,
    probabilities: list[Volume] | None,
    predictor,
    source: str | None,
    case_id: str | None,
    properties: dict,
) -> Prediction:
    """The :class:`Prediction` of a label map before postprocessing (``predictor.postprocess``), with its summary."""
    label_array = predictor.postprocess(label_array)
    label = Volume(label_array, affine, {"source": source})
    voxel_ml = _voxel_volume_ml(label)
    plan = predictor.plan
    counts = np.bincount(label_array.ravel(), minlength=int(plan["num_classes"]))
    largest = predictor.largest_component
    summary = {
        "case": case_id or source or "<in-memory volume>",
        "shape": list(label.shape),
        "spacing_mm": [round(s, 4) for s in label.spacing],
        "preprocessed_shape": list(properties["shape_after_resample"]),
        "volume_ml": {name: float(counts[value] * voxel_ml) for name, value in plan["labels"].items() if value > 0},
        "largest_component": largest if isinstance(largest, bool) else list(largest),
    }
    if predictor.postprocessing:
        summary["postprocessing"] = predictor.postprocessing
    return Prediction(label, probabilities, summary)


class EnsemblePredictor:
    """Several trained runs (folds, or configurations such as 2D and 3D) whose class probabilities are
    averaged on the scan's own grid, as ``nnUNetv2_predict`` averages folds and ``nnUNetv2_ensemble``
    configurations: each member preprocesses the scan with its own plan, predicts, and maps its
    probabilities back to the file's grid; the mean's arg-max is the label. The members must predict the
    same classes (the same ``labels``). Postprocessing options apply to the averaged label map.

    Host memory holds the K x voxels probabilities of one member and the running sum (the single-run
    labels-only path is bounded more tightly: :mod:`medseg_jax.inference.restore`).
    """

    def __init__(self, members: list[Predictor], *, largest_component=False, postprocessing=(), names=None):
        if not members:
            raise ConfigError("an ensemble needs at least one predictor")
        names = list(names) if names is not None else [f"member {i}" for i in range(len(members))]
        first = members[0].plan
        for name, member in zip(names[1:], members[1:]):
            if member.plan["labels"] != first["labels"]:
                raise DataError(
                    f"{name} predicts the classes {member.plan['labels']}, {names[0]} {first['labels']}: "
                    "an ensemble averages the same classes"
                )
            if member.plan["channel_names"] != first["channel_names"]:
                raise DataError(
                    f"{name} reads the channels {member.plan['channel_names']}, {names[0]} "
                    f"{first['channel_names']}: an ensemble's members read the same scans"
                )
        self.members, self.names = members, names
        self.plan = first
        self.largest_component = largest_component
        self.postprocessing = check_postprocessing(list(postprocessing), int(first["num_classes"]))

    postprocess = Predictor.postprocess
    predict_volume = Predictor.predict_volume  # the same three stages

    def prepare(self, images: list[Volume]) -> list[PreparedCase]:
        first_stages: dict[int, Volume] = {}  # cascade members of one first stage share its prediction
        prepared = []
        for member in self.members:
            previous = None
            if is_cascade(member.plan) and member.previous_stage is not None:
                key = id(member.previous_stage)
                if key not in first_stages:
                    first_stages[key] = member.previous_stage_label(images)
                previous = first_stages[key]
            prepared.append(member.prepare(images, previous))
        return prepared

    def infer(self, prepared: list[PreparedCase]) -> list:
        return [member.infer(case) for member, case in zip(self.members, prepared)]

    def finish_case(
        self,
        logits: list,
        prepared: list[PreparedCase],
        source: str | None = None,
        return_probabilities: bool = False,
        case_id: str | None = None,
    ) -> Prediction:
        total: np.ndarray | None = None
        template: list[Volume] = []
        for member, member_logits, case in zip(self.members, logits, prepared):
            volumes = member.file_probabilities(member_logits, case.properties)
            stacked = np.stack([v.array for v in volumes])
            total = stacked if total is None else total + stacked
            template = volumes
            del volumes, stacked
        assert total is not None
        mean = total / len(self.members)
        label_array = np.argmax(mean, axis=0).astype(np.uint8)
        probabilities = [v.with_array(p) for v, p in zip(template, mean)] if return_probabilities else None
        affine = template[0].affine
        return case_prediction(label_array, affine, probabilities, self, source, case_id, prepared[0].properties)


def prediction_mesh(devices: int | None = None):
    """A mesh whose ``data`` axis spans the first ``devices`` local devices (None: all of them), for
    :class:`Predictor`'s ``mesh``; None when that is one device, so one device runs the unsharded program.

    The backend is JAX's (``JAX_PLATFORMS=cpu`` / ``cuda`` / ``tpu`` chooses it); windows of one batch are
    split over the devices, so the window batch size is rounded up to a multiple of ``devices``.
    """
    available = jax.local_devices()
    count = len(available) if devices is None else devices
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= len(available):
        raise ConfigError(
            f"devices={devices!r}: this process sees {len(available)} local {available[0].platform} device(s); "
            f"choose 1..{len(available)} (JAX_PLATFORMS selects the backend)"
        )
    if count == 1:
        return None
    from medseg_jax.config import MeshConfig
    from medseg_jax.parallel import make_mesh

    return make_mesh(MeshConfig(data=count, spatial=1), devices=available[:count])


def predict_volume(
    model,
    params,
    plan: dict,
    images: list[Volume],
    inference_config=None,
    return_probabilities: bool = False,
    **predictor_options,
) -> Prediction:
    """One-call form of :meth:`Predictor.predict_volume` (options as :class:`Predictor`)."""
    predictor = Predictor(model, params, plan, inference_config, **predictor_options)
    return predictor.predict_volume(images, return_probabilities=return_probabilities)


# --- files ------------------------------------------------------------------------------------------------


def _beside_label(label_path: Path, suffix: str) -> Path:
    """``{case}{suffix}`` in the label's folder (``{case}.nii.gz`` / ``{case}.dcm`` -> ``{case}.npz``)."""
    is_seg = label_path.suffix.lower() == SEG_SUFFIX and len(label_path.name) > len(SEG_SUFFIX)
    stem = label_path.name[: -len(SEG_SUFFIX)] if is_seg else nifti_stem(label_path.name)
    if stem is None:  # a bare ".nii.gz": no case name to put before the suffix
        raise DataError(f"{label_path}: the mask file needs a name before .nii.gz / .nii")
    return label_path.with_name(stem + suffix)


def write_outputs(
    prediction: Prediction,
    label_path: Path,
    statistics: dict | None = None,
    write_label=None,
    labels: dict[str, int] | None = None,
) -> list[Path]:
    """Write the label (and probabilities / statistics beside it); on failure remove what this call wrote.

    ``write_label(label, path)`` writes the label (default: a uint8 NIfTI; a DICOM-SEG writer for DICOM output).
    ``labels`` (the plan's ``{name: value}``) is stored in the probabilities file as JSON text, so that saved
    probabilities of different models can be checked to describe the same classes before they are averaged.
    """
    written: list[Path] = []
    try:
        if statistics is not None:
            written.append(write_json_atomic(_beside_label(label_path, STATISTICS_SUFFIX), statistics))
        if prediction.probabilities is not None:
            probs_path = _beside_label(label_path, ".npz")
            classes = prediction.probabilities
            shape = (len(classes), *classes[0].shape)
            # the one writer of the format (what `ensemble` reads); class by class, never a K x voxels stack
            with probability_writer(probs_path, shape, prediction.label.affine, labels) as write_class:
                for volume in classes:
                    write_class(volume.array)
            written.append(probs_path)
        if write_label is None:
            written.append(write_nifti(prediction.label, label_path, dtype=np.uint8))
        else:
            written.append(write_label(prediction.label, label_path))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written


def refuse_overwriting_inputs(targets, inputs) -> None:
    """Raise DataError if writing any of ``targets`` would replace one of the ``inputs`` files.

    Paths are compared after resolving symbolic links and relative parts, so ``-o ./scan.nii.gz`` for
    ``scan.nii.gz``, an output folder that is the input folder seen through a link, or an output name
    equal to an input's name in the same folder are all caught before anything is computed.
    """
    resolved = {Path(path).resolve(): Path(path) for path in inputs}
    for target in targets:
        source = resolved.get(Path(target).resolve())
        if source is not None:
            raise DataError(
                f"{target}: writing the prediction there would replace the input scan {source}; "
                "choose another output (-o)"
            )


def label_target(inputs: list[Path], output_path, output_format: str = "nifti") -> Path:
    """Where one case's label goes: ``output_path`` if it names a NIfTI file, else ``output_path/{case}.nii.gz``
    (``output_format="dicom-seg"``: a ``.dcm`` file or ``output_path/{case}.dcm``)."""
    if output_format == "dicom-seg":
        return seg_target(_case_name(Path(inputs[0])), output_path)
    output_path = Path(output_path)
    return output_path if is_nifti(output_path) else output_path / f"{_case_name(inputs[0])}.nii.gz"


def prediction_targets(input_path, output_path, num_channels: int) -> list[tuple[Path, list[Path]]]:
    """``(label file, input files in channel order)`` of every case :func:`predict_input` predicts.

    A folder of NIfTI files holds the cases of :func:`~medseg_jax.data.case_files.find_image_cases`; anything
    else is one case.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    if not _is_nifti_folder(input_path):
        return [(label_target([input_path], output_path), [input_path])]
    cases = find_image_cases(input_path, num_channels)
    return [(output_path / f"{case}.nii.gz", paths) for case, paths in cases.items()]


def _is_nifti_folder(path: Path) -> bool:
    return path.is_dir() and any(is_nifti(p) for p in path.iterdir())


def _case_name(path: Path) -> str:
    """``case`` from ``case_0000.nii.gz`` / ``case.nii.gz`` / a DICOM folder ``case/``."""
    match = CHANNEL_FILE.match(path.name)
    if match:
        return match["case"]
    return nifti_stem(path.name) or path.name


class CaseJob(NamedTuple):
    """One case to predict: its ``name``, its ``inputs`` (channel files in plan order, or one DICOM series
    folder) and ``target``, the label file to write."""

    name: str
    inputs: list[Path]
    target: Path


@dataclasses.dataclass(frozen=True)
class OutputOptions:
    """What each case writes besides its label (see :func:`predict_path`)."""

    save_probabilities: bool = False
    statistics: bool = False
    output_format: str = "nifti"
    series_uid: str | None = None

    def __post_init__(self):
        if self.output_format not in OUTPUT_FORMATS:
            raise ConfigError(f"output format {self.output_format!r}: expected one of {', '.join(OUTPUT_FORMATS)}")


class _ReadCase(NamedTuple):
    job: CaseJob
    images: list[Volume]
    prepared: Any  # what the predictor's prepare made (a PreparedCase; a list of them for an ensemble)
    seconds: float


def _case_error(job: CaseJob, exc: MedsegError) -> DataError:
    return DataError(f"case {job.name} ({', '.join(str(p) for p in job.inputs)}): {exc}")


def _read_case(job: CaseJob, predictor, options: OutputOptions) -> _ReadCase:
    """Stage 1 (host): read the case's files and preprocess them with the predictor's plan."""
    started = time.perf_counter()
    try:
        images = [read_image(p, options.series_uid) for p in job.inputs]
        if len({v.shape for v in images}) != 1:
            raise DataError(f"channel shapes differ: {[v.shape for v in images]}")
        if options.output_format == "dicom-seg":  # before predicting: a NIfTI input has no series to reference
            require_series_source(images[0], job.inputs[0])
        prepared = predictor.prepare(images)
    except MedsegError as exc:
        raise _case_error(job, exc) from exc
    return _ReadCase(job, images, prepared, time.perf_counter() - started)


def _run_network(case: _ReadCase, predictor):
    """Stage 2 (device): the sliding window; returns ``(logits, seconds)``, the logits computed."""
    started = time.perf_counter()
    try:
        logits = predictor.infer(case.prepared)
    except MedsegError as exc:
        raise _case_error(case.job, exc) from exc
    return logits, time.perf_counter() - started


def _write_case(case: _ReadCase, logits, device_seconds: float, predictor, options: OutputOptions) -> dict:
    """Stage 3 (host): back on the file's grid, postprocessing, statistics, files; returns the case summary."""
    started = time.perf_counter()
    job = case.job
    try:
        source = case.images[0].metadata.get("source")
        prediction = predictor.finish_case(logits, case.prepared, source, options.save_probabilities, job.name)
    except MedsegError as exc:
        raise _case_error(job, exc) from exc
    stats = None
    if options.statistics:
        voxel_ml = _voxel_volume_ml(prediction.label)
        stats = {"case": job.name, **case_statistics(prediction.label.array, case.images, predictor.plan, voxel_ml)}
    write_label = None
    if options.output_format == "dicom-seg":
        from medseg_jax.inference.dicom_seg import write_dicom_seg

        write_label = functools.partial(write_dicom_seg, source=case.images[0], labels=predictor.plan["labels"])
    write_outputs(prediction, job.target, stats, write_label, labels=predictor.plan["labels"])
    write_seconds = time.perf_counter() - started
    summary = {
        **prediction.summary,
        "output": str(job.target),
        "seconds": round(case.seconds + device_seconds + write_seconds, 3),
        "read_seconds": round(case.seconds, 3),
        "device_seconds": round(device_seconds, 3),
        "write_seconds": round(write_seconds, 3),
    }
    if stats is not None:
        summary["statistics"] = str(_beside_label(job.target, STATISTICS_SUFFIX))
    return summary


class _InlineExecutor:
    """``concurrent.futures`` executor that runs each call at once in the caller's thread (no pipeline)."""

    def submit(self, function, *args):
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            future.set_result(function(*args))
        except BaseException as exc:
            future.set_exception(exc)
        return future

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False


def predict_cases(
    jobs: list[CaseJob],
    predictor: Predictor | EnsemblePredictor,
    options: OutputOptions | None = None,
    *,
    pipeline: bool = True,
    progress: bool = False,
    unit: str = "case",
) -> list[dict]:
    """Predict ``jobs`` in order with one predictor (one compiled program per member; a :class:`Predictor`
    or an :class:`EnsemblePredictor`); returns the case summaries.

    ``pipeline=True``: three stages overlap, as in nnU-Net's predictor: a reader thread reads and
    preprocesses the next case and a writer thread maps the previous one back to its file's grid and
    writes it while the device runs the current one. At most three cases are held at once (one per stage).
    ``pipeline=False`` runs the stages one after another (the same files). Each summary holds ``seconds``
    (the case's three stages) and ``read_seconds``, ``device_seconds``, ``write_seconds``.

    A case that fails raises :class:`DataError` naming it, after the cases before it are completely
    written; nothing of it (or of the cases after it) is written.
    """
    from tqdm.auto import tqdm

    options = options or OutputOptions()
    summaries: list[dict] = []
    pending_write: concurrent.futures.Future | None = None

    def complete_pending_write():
        nonlocal pending_write
        if pending_write is not None:
            future, pending_write = pending_write, None
            summaries.append(future.result())

    def stage(name):
        if not pipeline:
            return _InlineExecutor()
        return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"medseg-{name}")

    with stage("read") as reader, stage("write") as writer:
        next_read = reader.submit(_read_case, jobs[0], predictor, options) if jobs else None
        try:
            for index in tqdm(range(len(jobs)), desc="predict", unit=unit, disable=not progress):
                assert next_read is not None
                try:
                    case = next_read.result()
                    next_read = None
                    if index + 1 < len(jobs):
                        next_read = reader.submit(_read_case, jobs[index + 1], predictor, options)
                    logits, device_seconds = _run_network(case, predictor)
                finally:  # the case before this one is complete (or its own error is raised) before any other
                    complete_pending_write()
                pending_write = writer.submit(_write_case, case, logits, device_seconds, predictor, options)
                del case, logits
            complete_pending_write()
        finally:
            if next_read is not None:
                next_read.cancel()
    return summaries


def predict_path(
    input_path,
    output_path,
    model,
    params,
    plan: dict,
    inference_config=None,
    *,
    predictor: Predictor | EnsemblePredictor | None = None,
    save_probabilities: bool = False,
    statistics: bool = False,
    output_format: str = "nifti",
    series_uid: str | None = None,
    **predictor_options,
) -> dict:
    """Predict one case from a NIfTI file, a DICOM series folder, or a list of channel files (plan order).

    ``output_path``: a ``.nii.gz`` / ``.nii`` file, or a folder to write ``{case}.nii.gz`` into. Returns the
    case summary with ``output`` added. Errors are :class:`DataError` naming the input; nothing is written
    for a case that fails. ``predictor`` reuses an existing :class:`Predictor` (model etc. then ignored).
    ``statistics``: also write ``{case}.statistics.json`` beside the label (per-class volume in mL and mean
    scan intensity, :func:`~medseg_jax.inference.statistics.case_statistics`; the summary's ``statistics``).
    ``series_uid`` picks one series of a DICOM folder holding several. ``output_format="dicom-seg"`` writes
    ``{case}.dcm``, a DICOM Segmentation referencing the input series
    (:func:`~medseg_jax.inference.dicom_seg.write_dicom_seg`), instead of the NIfTI; it needs a DICOM input.
    """
    options = OutputOptions(save_probabilities, statistics, output_format, series_uid)
    inputs = [Path(p) for p in input_path] if isinstance(input_path, (list, tuple)) else [Path(input_path)]
    target = label_target(inputs, output_path, output_format)
    refuse_overwriting_inputs([target], inputs)
    predictor = predictor or Predictor(model, params, plan, inference_config, **predictor_options)
    return predict_cases([CaseJob(_case_name(inputs[0]), inputs, target)], predictor, options, pipeline=False)[0]


def predict_folder(
    input_dir,
    output_dir,
    model,
    params,
    plan: dict,
    inference_config=None,
    *,
    predictor: Predictor | EnsemblePredictor | None = None,
    save_probabilities: bool = False,
    statistics: bool = False,
    skip_existing: bool = False,
    progress: bool = True,
    pipeline: bool = True,
    **predictor_options,
) -> list[dict]:
    """Predict every case of a folder in nnU-Net naming into ``output_dir/{case}.nii.gz``.

    The whole folder is checked first (names, channel counts, outputs that would replace an input, readable
    headers, channel shapes), so a wrong folder fails before anything is written. The cases then run as a
    pipeline (:func:`predict_cases`); each case's outputs are written atomically after it is predicted; a case
    failing later (e.g. a corrupted voxel stream, NaN voxels) raises :class:`DataError` naming it, with the
    cases before it complete and nothing of it written. Returns the per-case summaries. ``statistics``: as
    :func:`predict_path`, for every case. ``predictor`` reuses an existing predictor (model etc. then ignored).
    """
    predictor = predictor or Predictor(model, params, plan, inference_config, **predictor_options)
    cases = find_image_cases(input_dir, len(predictor.plan["channel_names"]))
    output_dir = Path(output_dir)
    # one case's label must not replace another case's channel file either (cases "x" and "x_0000")
    refuse_overwriting_inputs(
        [output_dir / f"{case}.nii.gz" for case in cases], [path for paths in cases.values() for path in paths]
    )
    for case, paths in cases.items():
        try:
            shapes = {read_nifti_header(p)[0] for p in paths}
        except DataError as exc:
            raise DataError(f"case {case}: {exc}") from exc
        if len(shapes) != 1:
            raise DataError(f"case {case}: channel shapes differ {sorted(shapes)}")
    jobs = [CaseJob(case, list(paths), output_dir / f"{case}.nii.gz") for case, paths in cases.items()]
    if skip_existing:
        jobs = [job for job in jobs if not job.target.exists()]
    options = OutputOptions(save_probabilities, statistics)
    return predict_cases(jobs, predictor, options, pipeline=pipeline, progress=progress)


def predict_series_folders(
    input_dir,
    output_dir,
    model,
    params,
    plan: dict,
    inference_config=None,
    *,
    predictor: Predictor | EnsemblePredictor | None = None,
    output_format: str = "nifti",
    save_probabilities: bool = False,
    statistics: bool = False,
    skip_existing: bool = False,
    progress: bool = True,
    pipeline: bool = True,
    **predictor_options,
) -> list[dict]:
    """Predict every DICOM series folder inside ``input_dir`` into ``output_dir/{folder}.nii.gz`` (or ``.dcm``).

    ``input_dir`` holds only folders (one series each, e.g. one per scan of an export). One compiled
    predictor serves every series, as a pipeline (:func:`predict_cases`); a series that fails raises
    :class:`DataError` naming its folder, with the series before it complete and nothing of it written.
    """
    folders = series_folders(input_dir) or []
    output_dir = Path(output_dir)
    if is_nifti(output_dir) or output_dir.suffix.lower() == SEG_SUFFIX:
        raise DataError(
            f"{output_dir}: names one file, but {input_dir} holds {len(folders)} series folders; give an output folder"
        )
    options = OutputOptions(save_probabilities, statistics, output_format)
    jobs = [CaseJob(_case_name(f), [f], label_target([f], output_dir, output_format)) for f in folders]
    if skip_existing:
        jobs = [job for job in jobs if not job.target.exists()]
    predictor = predictor or Predictor(model, params, plan, inference_config, **predictor_options)
    return predict_cases(jobs, predictor, options, pipeline=pipeline, progress=progress, unit="series")


def predict_input(input_path, output_path, model, params, plan: dict, inference_config=None, **options):
    """Dispatch for a command line: a folder holding NIfTI files -> :func:`predict_folder` (returns a list of
    summaries); a folder of DICOM series folders -> :func:`predict_series_folders`; a NIfTI file or a DICOM
    series folder -> :func:`predict_path` (returns a one-item list).

    Either refuses an ``output_path`` that would replace an input scan, and options that do not apply to the
    input (``series_uid`` or ``output_format="dicom-seg"`` for NIfTI), before predicting anything.
    """
    input_path = Path(input_path)
    output_format = options.get("output_format", "nifti")
    series_uid = options.get("series_uid")
    if output_format == "dicom-seg" and (is_nifti(input_path) or _is_nifti_folder(input_path)):
        raise DataError(f"{input_path}: {NO_SOURCE_SERIES}")
    if series_uid is not None and (is_nifti(input_path) or _is_nifti_folder(input_path)):
        raise DataError(f"{input_path}: --series-uid picks a series of a DICOM folder; this input is NIfTI")
    if _is_nifti_folder(input_path):
        if is_nifti(output_path):
            raise DataError(
                f"{output_path}: names one NIfTI file, but {input_path} is a folder of scans; give an output folder"
            )
        options.pop("output_format", None)
        options.pop("series_uid", None)
        return predict_folder(input_path, output_path, model, params, plan, inference_config, **options)
    if series_folders(input_path) is not None:
        if series_uid is not None:
            raise DataError(
                f"{input_path}: --series-uid picks a series inside one DICOM folder, but this is a folder of "
                "series folders (each predicted); pass the folder that holds the series"
            )
        options.pop("series_uid", None)
        return predict_series_folders(input_path, output_path, model, params, plan, inference_config, **options)
    for folder_only in ("skip_existing", "progress", "pipeline"):
        options.pop(folder_only, None)
    return [predict_path(input_path, output_path, model, params, plan, inference_config, **options)]
