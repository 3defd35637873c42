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
   class at a time (:mod:`medseg_jax.inference.restore`, the same labels): host memory does not grow
   with classes x voxels;
4. optionally only the largest connected component of each foreground class is kept.

The label map has exactly the input's shape and affine. File-level functions read NIfTI files or a DICOM
series folder (or a folder of series folders) and write NIfTI or a DICOM-SEG referencing the input series
(:mod:`medseg_jax.inference.dicom_seg`) atomically; probabilities go to ``{case}.npz`` (``probabilities`` float32
``(K, *original shape)`` and ``affine``), per-class statistics to ``{case}.statistics.json``
(:mod:`medseg_jax.inference.statistics`), both written before the label and removed again if the label fails.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from medseg_jax.atomic import atomic_path, write_json_atomic
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
from medseg_jax.inference.restore import argmax_on_file_grid, class_probabilities
from medseg_jax.inference.sliding_window import sliding_window
from medseg_jax.inference.statistics import STATISTICS_SUFFIX, case_statistics
from medseg_jax.postprocess import keep_largest_component


class Prediction(NamedTuple):
    """One case's result: ``label`` (uint8 Volume in the input's geometry), ``probabilities`` (one float32
    Volume per class, or None) and ``summary`` (``seconds``, ``volume_ml`` per foreground class, ...)."""

    label: Volume
    probabilities: list[Volume] | None
    summary: dict


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
    single organ whose lesions may be many); ``mesh`` splits window batches over its ``data`` axis.
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
        mesh=None,
    ):
        if mesh is not None:  # every device needs the parameters: replicate them over the mesh once
            from jax.sharding import NamedSharding, PartitionSpec

            params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
        self.params = params
        self.plan = plan
        self.config = inference_config or InferenceConfig()
        self.accumulate = accumulate
        self.largest_component = largest_component
        self.mesh = mesh
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
        logits = self._window_logits(image)
        slices_first = image.ndim - 1 != self.dim  # 2D network: (Z, X, Y, K) -> (K, X, Y, Z)
        spatial = image.shape[1:]
        out = np.empty((int(logits.shape[-1]), *spatial), np.float32)
        for k, probability in enumerate(class_probabilities(logits)):
            out[k] = np.moveaxis(probability, 0, -1) if slices_first else probability
        return out

    def logits(self, image: np.ndarray) -> np.ndarray:
        """The blended logits, ``(K, *spatial)`` float32, for a preprocessed ``(C, *spatial)``."""
        logits = np.asarray(self._window_logits(image), dtype=np.float32)
        if image.ndim - 1 == self.dim:
            return np.moveaxis(logits, -1, 0)
        return np.moveaxis(logits, (-1, 0), (0, logits.ndim - 1))

    def _window_logits(self, image: np.ndarray):
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
        logits = self._window_logits(image)
        slices_first = image.ndim - 1 != self.dim  # 2D network: (Z, X, Y, K) -> probabilities (X, Y, Z)
        affine: list[np.ndarray] = []

        def to_file_grid(probability, k):
            spatial = np.moveaxis(probability, 0, -1) if slices_first else probability
            volume = restore_geometry(spatial[None], properties, kind="probabilities", background=k == 0)[0]
            affine[:] = [volume.affine]
            return volume.array

        return argmax_on_file_grid(logits, to_file_grid), affine[0]

    def predict_volume(
        self, images: list[Volume], return_probabilities: bool = False, case_id: str | None = None
    ) -> Prediction:
        """Predict one case given one :class:`~medseg_jax.data.volume.Volume` per channel (plan order)."""
        started = time.perf_counter()
        for volume in images:  # NaN would flow through normalisation into a plausible-looking but wrong mask
            check_finite(volume, "scan")
        image, _, properties = preprocess_case(images, None, self.plan)
        if self.plan.get("resampling", {}).get("resample_logits"):
            # nnU-Net's export (plans imported from it): logits back on the file's grid, then the softmax
            back = restore_geometry(self.logits(image), properties, kind="logits")
            softmax = np.asarray(jax.nn.softmax(np.stack([v.array for v in back]), axis=0), dtype=np.float32)
            restored = [volume.with_array(p) for volume, p in zip(back, softmax)]
        elif return_probabilities:
            probabilities = self.probabilities(image)  # (K, *preprocessed spatial)
            restored = restore_geometry(probabilities, properties, kind="probabilities")
        else:  # labels only: never K probability volumes at once
            label_array, affine = self.restored_labels(image, properties)
            restored = None
        if restored is not None:
            label_array = np.argmax(np.stack([v.array for v in restored]), axis=0).astype(np.uint8)
            affine = restored[0].affine
        if self.largest_component is True:
            label_array = keep_largest_component(label_array).astype(np.uint8)
        elif self.largest_component:  # a list of class ids
            label_array = keep_largest_component(label_array, classes=list(self.largest_component)).astype(np.uint8)
        label = Volume(label_array, affine, {"source": images[0].metadata.get("source")})
        voxel_ml = _voxel_volume_ml(label)
        counts = np.bincount(label_array.ravel(), minlength=int(self.plan["num_classes"]))
        summary = {
            "case": case_id or images[0].metadata.get("source", "<in-memory volume>"),
            "seconds": round(time.perf_counter() - started, 3),
            "shape": list(label.shape),
            "spacing_mm": [round(s, 4) for s in label.spacing],
            "preprocessed_shape": list(properties["shape_after_resample"]),
            "volume_ml": {
                name: float(counts[value] * voxel_ml) for name, value in self.plan["labels"].items() if value > 0
            },
            "largest_component": self.largest_component
            if isinstance(self.largest_component, bool)
            else list(self.largest_component),
        }
        return Prediction(label, restored if return_probabilities else None, summary)


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


def _write_outputs(
    prediction: Prediction, label_path: Path, statistics: dict | None = None, write_label=None
) -> list[Path]:
    """Write the label (and probabilities / statistics beside it); on failure remove what this call wrote.

    ``write_label(label, path)`` writes the label (default: a uint8 NIfTI; a DICOM-SEG writer for DICOM output).
    """
    written: list[Path] = []
    try:
        if statistics is not None:
            written.append(write_json_atomic(_beside_label(label_path, STATISTICS_SUFFIX), statistics))
        if prediction.probabilities is not None:
            probs_path = _beside_label(label_path, ".npz")
            with atomic_path(probs_path) as tmp, open(tmp, "wb") as handle:
                np.savez_compressed(
                    handle,
                    probabilities=np.stack([v.array for v in prediction.probabilities]),
                    affine=prediction.label.affine,
                )
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


def predict_path(
    input_path,
    output_path,
    model,
    params,
    plan: dict,
    inference_config=None,
    *,
    predictor: Predictor | None = None,
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
    if output_format not in OUTPUT_FORMATS:
        raise ConfigError(f"output format {output_format!r}: expected one of {', '.join(OUTPUT_FORMATS)}")
    inputs = [Path(p) for p in input_path] if isinstance(input_path, (list, tuple)) else [Path(input_path)]
    name = _case_name(inputs[0])
    output_path = label_target(inputs, output_path, output_format)
    refuse_overwriting_inputs([output_path], inputs)
    predictor = predictor or Predictor(model, params, plan, inference_config, **predictor_options)
    try:
        images = [read_image(p, series_uid) for p in inputs]
        if len({v.shape for v in images}) != 1:
            raise DataError(f"channel shapes differ: {[v.shape for v in images]}")
        if output_format == "dicom-seg":  # before predicting: a NIfTI input has no series to reference
            require_series_source(images[0], inputs[0])
        prediction = predictor.predict_volume(images, return_probabilities=save_probabilities, case_id=name)
    except MedsegError as exc:
        raise DataError(f"case {name} ({', '.join(str(p) for p in inputs)}): {exc}") from exc
    stats = None
    if statistics:
        voxel_ml = _voxel_volume_ml(prediction.label)
        stats = {"case": name, **case_statistics(prediction.label.array, images, predictor.plan, voxel_ml)}
    write_label = None
    if output_format == "dicom-seg":
        from medseg_jax.inference.dicom_seg import write_dicom_seg

        write_label = functools.partial(write_dicom_seg, source=images[0], labels=predictor.plan["labels"])
    _write_outputs(prediction, output_path, stats, write_label)
    summary = {**prediction.summary, "output": str(output_path)}
    if stats is not None:
        summary["statistics"] = str(_beside_label(output_path, STATISTICS_SUFFIX))
    return summary


def predict_folder(
    input_dir,
    output_dir,
    model,
    params,
    plan: dict,
    inference_config=None,
    *,
    save_probabilities: bool = False,
    statistics: bool = False,
    skip_existing: bool = False,
    progress: bool = True,
    **predictor_options,
) -> list[dict]:
    """Predict every case of a folder in nnU-Net naming into ``output_dir/{case}.nii.gz``.

    The whole folder is checked first (names, channel counts, outputs that would replace an input, readable
    headers, channel shapes), so a wrong folder fails before anything is written. Each case's outputs are
    written atomically after it is predicted; a case failing later (e.g. a corrupted voxel stream, NaN
    voxels) raises :class:`DataError` naming it, with the cases before it complete and nothing of it
    written. Returns the per-case summaries. ``statistics``: as :func:`predict_path`, for every case.
    """
    from tqdm.auto import tqdm

    cases = find_image_cases(input_dir, len(plan["channel_names"]))
    # one case's label must not replace another case's channel file either (cases "x" and "x_0000")
    refuse_overwriting_inputs(
        [Path(output_dir) / f"{case}.nii.gz" for case in cases], [path for paths in cases.values() for path in paths]
    )
    for case, paths in cases.items():
        try:
            shapes = {read_nifti_header(p)[0] for p in paths}
        except DataError as exc:
            raise DataError(f"case {case}: {exc}") from exc
        if len(shapes) != 1:
            raise DataError(f"case {case}: channel shapes differ {sorted(shapes)}")
    predictor = Predictor(model, params, plan, inference_config, **predictor_options)
    output_dir = Path(output_dir)
    summaries = []
    for case, paths in tqdm(cases.items(), desc="predict", unit="case", disable=not progress):
        target = output_dir / f"{case}.nii.gz"
        if skip_existing and target.exists():
            continue
        summaries.append(
            predict_path(
                paths,
                target,
                None,
                None,
                plan,
                predictor=predictor,
                save_probabilities=save_probabilities,
                statistics=statistics,
            )
        )
    return summaries


def predict_series_folders(
    input_dir,
    output_dir,
    model,
    params,
    plan: dict,
    inference_config=None,
    *,
    output_format: str = "nifti",
    save_probabilities: bool = False,
    statistics: bool = False,
    skip_existing: bool = False,
    progress: bool = True,
    **predictor_options,
) -> list[dict]:
    """Predict every DICOM series folder inside ``input_dir`` into ``output_dir/{folder}.nii.gz`` (or ``.dcm``).

    ``input_dir`` holds only folders (one series each, e.g. one per scan of an export). One compiled
    predictor serves every series; a series that fails raises :class:`DataError` naming its folder, with the
    series before it complete and nothing of it written.
    """
    from tqdm.auto import tqdm

    folders = series_folders(input_dir) or []
    output_dir = Path(output_dir)
    if is_nifti(output_dir) or output_dir.suffix.lower() == SEG_SUFFIX:
        raise DataError(
            f"{output_dir}: names one file, but {input_dir} holds {len(folders)} series folders; give an output folder"
        )
    predictor = Predictor(model, params, plan, inference_config, **predictor_options)
    summaries = []
    for folder in tqdm(folders, desc="predict", unit="series", disable=not progress):
        if skip_existing and label_target([folder], output_dir, output_format).exists():
            continue
        summaries.append(
            predict_path(
                folder,
                output_dir,
                None,
                None,
                plan,
                predictor=predictor,
                save_probabilities=save_probabilities,
                statistics=statistics,
                output_format=output_format,
            )
        )
    return summaries


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
    options.pop("skip_existing", None)
    options.pop("progress", None)
    return [predict_path(input_path, output_path, model, params, plan, inference_config, **options)]
