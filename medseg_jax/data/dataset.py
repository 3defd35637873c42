"""Dataset folders: ``dataset.json``, the case list and its validation.

The k-fold splits live in :mod:`medseg_jax.data.splits` and are re-exported here.

Two layouts are read:

- nnU-Net v2: ``channel_names`` {"0": "CT"}, ``labels`` {"background": 0, "liver": 1} (name -> int),
  ``numTraining``, ``file_ending``; cases are found as ``labelsTr/{case}{file_ending}`` and
  ``imagesTr/{case}_{XXXX}{file_ending}`` (XXXX = 4-digit channel), or listed under an optional
  ``dataset`` key ``{case: {"images": [...], "label": ...}}`` with paths relative to the folder.
- Medical Segmentation Decathlon (MSD): ``modality`` {"0": "CT"}, ``labels`` {"0": "background"}
  (int -> name) and ``training`` [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}].
  Only single-modality MSD datasets are supported (multi-modal MSD stores one 4D file per case).

Every path must stay inside the dataset folder, symbolic links included. :func:`load_dataset` raises at
once for what makes the case list untrustworthy (a malformed dataset.json, paths outside the folder,
duplicated case ids); :func:`validate_dataset` then checks the files and reports all their problems.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from medseg_jax.atomic import read_json
from medseg_jax.data.case_files import CHANNEL_FILE, nifti_stem
from medseg_jax.data.image_io import NIFTI_SUFFIXES, read_nifti, read_nifti_header
from medseg_jax.data.splits import load_or_create_splits, make_splits  # noqa: F401 (public API)
from medseg_jax.data.volume import affine_problem
from medseg_jax.errors import DataError, DatasetValidationError

DATASET_JSON = "dataset.json"


@dataclasses.dataclass(frozen=True)
class Case:
    """One training case: one image file per channel (in channel order) and its label file."""

    case_id: str
    image_paths: tuple[Path, ...]
    label_path: Path | None = None


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A dataset folder as declared by its dataset.json.

    ``labels`` maps label name -> integer value (background 0); ``num_training`` is the declared
    ``numTraining`` (None when absent); ``layout`` is "nnunetv2" (cases found from file names),
    "nnunetv2_listed" (cases from the ``dataset`` key) or "msd".
    """

    root: Path
    name: str
    channel_names: list[str]
    labels: dict[str, int]
    file_ending: str
    cases: list[Case]
    num_training: int | None = None
    layout: str = "nnunetv2"

    @property
    def case_ids(self) -> list[str]:
        return [case.case_id for case in self.cases]


def load_dataset(root: str | os.PathLike) -> Dataset:
    """Read ``root/dataset.json`` (nnU-Net v2 or MSD) and list the cases; files are not opened.

    Raises DataError if dataset.json is missing or not JSON, and DatasetValidationError listing every
    malformed field, path outside the folder and duplicated case id.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    meta = read_json(root / DATASET_JSON, expect=dict)
    problems: list[str] = []
    if "channel_names" in meta:
        dataset = _parse_nnunet(root, meta, problems)
    elif "modality" in meta:
        dataset = _parse_msd(root, meta, problems)
    else:
        raise DataError(
            f"{root / DATASET_JSON}: neither field 'channel_names' (nnU-Net v2) nor 'modality' "
            "(Medical Segmentation Decathlon) is present"
        )
    if dataset is not None:
        problems += _containment_problems(dataset) + _duplicate_problems(dataset.cases)
    if problems:
        raise DatasetValidationError(root, problems)
    assert dataset is not None  # the parsers return None only after recording a problem
    return dataset


def validate_dataset(
    dataset: Dataset, check_geometry: bool = True, check_labels: bool = True, affine_tolerance: float = 1e-3
) -> None:
    """Check the files of every case and raise one DatasetValidationError listing all problems.

    Checks: paths inside the folder, missing image / label files, channel count, numTraining, stray
    files in imagesTr; with ``check_geometry`` the shapes and affines of each case's channels and label
    agree (headers only; affines entry-wise within ``affine_tolerance`` mm); with ``check_labels`` the
    label values are integers declared in ``labels`` (this reads the label voxels).
    """
    problems = _containment_problems(dataset) + _duplicate_problems(dataset.cases)
    if not dataset.cases:
        problems.append("no training cases found (imagesTr/ and labelsTr/ are empty or missing)")
    if dataset.num_training is not None and dataset.num_training != len(dataset.cases):
        problems.append(
            f"{DATASET_JSON}: numTraining is {dataset.num_training} but {len(dataset.cases)} case(s) were found"
        )
    declared = set(dataset.labels.values())
    for case in dataset.cases:
        files = _case_files(dataset, case, problems)
        if check_geometry:
            problems += _geometry_problems(dataset, case.case_id, files, affine_tolerance)
        label = [path for what, path in files if what == "label"]
        if check_labels and label:
            problems += _label_value_problems(dataset, case.case_id, label[0], declared)
    problems += _stray_file_problems(dataset)
    if problems:
        raise DatasetValidationError(dataset.root, problems)


# --- dataset.json parsing -------------------------------------------------------------------------


def _parse_nnunet(root: Path, meta: dict, problems: list[str]) -> Dataset | None:
    channels = _parse_channels(meta["channel_names"], "channel_names", problems)
    labels = _labels_with_problems(meta, "nnunetv2", problems)
    file_ending = meta.get("file_ending")
    if not isinstance(file_ending, str):
        problems.append(f"{DATASET_JSON}: field 'file_ending' is missing or not a string (e.g. \".nii.gz\")")
    elif file_ending not in NIFTI_SUFFIXES:
        problems.append(f"{DATASET_JSON}: file_ending {file_ending!r} is not supported (only .nii.gz and .nii)")
    num_training = _parse_num_training(meta, problems, required=True)
    if problems or not isinstance(file_ending, str):  # (a non-string file_ending is already a problem)
        return None
    if "dataset" in meta:
        cases, layout = _listed_cases(root, meta["dataset"], problems), "nnunetv2_listed"
    else:
        cases, layout = _discover_cases(root, len(channels), file_ending), "nnunetv2"
    name = meta["name"] if isinstance(meta.get("name"), str) else root.name
    return Dataset(root, name, channels, labels, file_ending, cases, num_training, layout)


def _parse_msd(root: Path, meta: dict, problems: list[str]) -> Dataset | None:
    channels = _parse_channels(meta["modality"], "modality", problems)
    if len(channels) > 1:
        problems.append(
            f"{DATASET_JSON}: 'modality' declares {len(channels)} modalities; multi-modal MSD "
            "datasets (one 4D image per case) are not supported: convert them to the nnU-Net v2 "
            "layout, one file per channel (imagesTr/{case}_{XXXX}.nii.gz)"
        )
    labels = _labels_with_problems(meta, "msd", problems)
    num_training = _parse_num_training(meta, problems, required=False)
    entries = meta.get("training")
    if not isinstance(entries, list):
        problems.append(
            f'{DATASET_JSON}: field \'training\' is missing or not a list of {{"image": ..., "label": ...}} entries'
        )
    if problems or not isinstance(entries, list):  # (a non-list is already a problem)
        return None
    cases = []
    for index, entry in enumerate(entries):
        where = f"{DATASET_JSON}: training[{index}]"
        if not (
            isinstance(entry, dict) and isinstance(entry.get("image"), str) and isinstance(entry.get("label"), str)
        ):
            problems.append(f'{where}: expected {{"image": path, "label": path}}, got {entry!r}')
            continue
        case_id = nifti_stem(Path(entry["image"]).name)
        if case_id is None or nifti_stem(Path(entry["label"]).name) is None:
            what = "image" if case_id is None else "label"
            problems.append(f"{where}: {what} {entry[what]!r} is not a .nii.gz or .nii file (only NIfTI is read)")
            continue
        cases.append(Case(case_id, (root / entry["image"],), root / entry["label"]))
    file_ending = ".nii" if cases and str(cases[0].image_paths[0]).endswith(".nii") else ".nii.gz"
    name = meta["name"] if isinstance(meta.get("name"), str) else root.name
    return Dataset(root, name, channels, labels, file_ending, cases, num_training, "msd")


def _parse_channels(value: Any, field: str, problems: list[str]) -> list[str]:
    """{"0": "CT", "1": "T2"} -> ["CT", "T2"]; keys must be 0..C-1."""
    if not isinstance(value, dict) or not value:
        problems.append(f'{DATASET_JSON}: field \'{field}\' must be a non-empty object such as {{"0": "CT"}}')
        return []
    if sorted(value) != sorted(str(i) for i in range(len(value))):
        problems.append(f'{DATASET_JSON}: field \'{field}\' keys must be "0".."{len(value) - 1}", got {sorted(value)}')
        return []
    return [str(value[str(i)]) for i in range(len(value))]


def parse_labels(meta: dict, layout: str | None = None) -> tuple[dict[str, int], list[str]]:
    """The ``labels`` of a dataset.json as ``{name: value}`` (background 0 included) and the problems found.

    ``layout``: "nnunetv2" (name -> int), "msd" (``{"0": "background"}``, int -> name) or None to tell
    them apart by form (for a bare ``{"labels": ...}`` file given to ``evaluate``). Each problem names the
    field. Every label must be one exclusive class with one integer value: nnU-Net's region-based labels
    (a list of values, with ``regions_class_order``) and its ``ignore`` label (voxels left out of the loss
    and the metrics) are refused, because training and evaluation here would silently treat them as
    ordinary classes.
    """
    value = meta.get("labels")
    problems: list[str] = []
    if layout == "msd" or (layout is None and _looks_like_msd_labels(value)):
        labels = _parse_msd_labels(value, problems)
    else:
        labels = _parse_nnunet_labels(value, problems)
    if "regions_class_order" in meta:
        problems.append(
            "field 'regions_class_order': region-based training (nnU-Net regions) is not supported; "
            "declare one integer per label"
        )
    return labels, problems


def _labels_with_problems(meta: dict, layout: str, problems: list[str]) -> dict[str, int]:
    labels, found = parse_labels(meta, layout)
    problems += [f"{DATASET_JSON}: {problem}" for problem in found]
    return labels


def _looks_like_msd_labels(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(k, str) and k.isdigit() and isinstance(v, str) for k, v in value.items())
    )


def _parse_nnunet_labels(value: Any, problems: list[str]) -> dict[str, int]:
    where = "field 'labels'"
    if not isinstance(value, dict) or not value:
        problems.append(f'{where} must be an object mapping name -> integer, e.g. {{"background": 0}}')
        return {}
    regions = [name for name, v in value.items() if isinstance(v, (list, tuple))]
    if regions:
        problems.append(
            f"{where}: region-based labels (lists of values, for {regions}) are not supported; "
            "use one integer per label"
        )
    if "ignore" in value:
        problems.append(
            f"{where}: the 'ignore' label (nnU-Net's partially annotated data, value "
            f"{value['ignore']!r}) is not supported; every label here is a class that is trained "
            "and evaluated"
        )
    bad = [
        name
        for name, v in value.items()
        if not isinstance(v, (list, tuple)) and (isinstance(v, bool) or not isinstance(v, int) or v < 0)
    ]
    if bad:
        problems.append(f"{where}: values of {bad} are not non-negative integers")
    if regions or bad or "ignore" in value:
        return {}
    labels = {str(name): int(v) for name, v in value.items()}
    if len(set(labels.values())) != len(labels):
        problems.append(f"{where}: two labels share a value ({labels})")
    if 0 not in labels.values():
        problems.append(f"{where}: background must have the value 0 ({labels})")
    return labels


def _parse_msd_labels(value: Any, problems: list[str]) -> dict[str, int]:
    """MSD {"0": "background", "1": "liver"} -> {"background": 0, "liver": 1}."""
    where = "field 'labels'"
    if not isinstance(value, dict) or not value or not all(re.fullmatch(r"\d+", str(k)) for k in value):
        problems.append(f'{where} must be an object mapping integer strings to names, e.g. {{"0": "background"}}')
        return {}
    labels = {str(name): int(key) for key, name in value.items()}
    if len(labels) != len(value):
        problems.append(f"{where}: label names are not unique ({value})")
    if 0 not in labels.values():
        problems.append(f"{where}: the value 0 (background) is missing")
    return labels


def _parse_num_training(meta: dict, problems: list[str], required: bool) -> int | None:
    value = meta.get("numTraining")
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        problems.append(f"{DATASET_JSON}: field 'numTraining' is missing or not a non-negative integer (got {value!r})")
        return None
    return value


def _discover_cases(root: Path, n_channels: int, file_ending: str) -> list[Case]:
    """Cases named by labelsTr/{case}{ending} or imagesTr/{case}_{XXXX}{ending} (hidden files skipped)."""
    ids = {m["case"] for p in _visible_files(root / "imagesTr", file_ending) if (m := CHANNEL_FILE.match(p.name))}
    ids |= {p.name[: -len(file_ending)] for p in _visible_files(root / "labelsTr", file_ending)}
    return [
        Case(
            case_id,
            tuple(root / "imagesTr" / f"{case_id}_{c:04d}{file_ending}" for c in range(n_channels)),
            root / "labelsTr" / f"{case_id}{file_ending}",
        )
        for case_id in sorted(ids)
    ]


def _listed_cases(root: Path, listing: Any, problems: list[str]) -> list[Case]:
    """Cases from nnU-Net v2's optional ``dataset`` key (paths relative to the dataset folder)."""
    if not isinstance(listing, dict):
        problems.append(f'{DATASET_JSON}: field \'dataset\' must map case ids to {{"images": [...], "label": ...}}')
        return []
    cases = []
    for case_id, entry in listing.items():
        images = entry.get("images") if isinstance(entry, dict) else None
        if not (
            isinstance(images, list) and all(isinstance(i, str) for i in images) and isinstance(entry.get("label"), str)
        ):
            problems.append(
                f'{DATASET_JSON}: dataset[{case_id!r}]: expected {{"images": [paths], "label": path}}, got {entry!r}'
            )
            continue
        cases.append(Case(str(case_id), tuple(root / i for i in images), root / entry["label"]))
    return cases


# --- checks ---------------------------------------------------------------------------------------


def _case_paths(case: Case) -> list[tuple[str, Path]]:
    """(description, path) of every file of a case, images in channel order then the label."""
    named = [(f"image channel {c}", path) for c, path in enumerate(case.image_paths)]
    return named + ([("label", case.label_path)] if case.label_path is not None else [])


def _is_inside(path: Path, root: Path) -> bool:
    # resolve() follows symbolic links, so a link pointing outside the folder is caught too.
    return Path(path).resolve().is_relative_to(Path(root).resolve())


def _show(path: Path, root: Path) -> str:
    """A path as the user wrote it, relative to the dataset folder where possible."""
    try:
        return str(Path(os.path.normpath(path)).relative_to(os.path.normpath(root)))
    except ValueError:
        return str(path)


def _containment_problems(dataset: Dataset) -> list[str]:
    problems = []
    for case in dataset.cases:
        for what, path in _case_paths(case):
            if not _is_inside(path, dataset.root):
                link = " (a symbolic link)" if Path(path).is_symlink() else ""
                problems.append(
                    f"case {case.case_id}: {what} {_show(path, dataset.root)}{link} lies outside the dataset folder"
                )
    return problems


def _duplicate_problems(cases: list[Case]) -> list[str]:
    ids = [case.case_id for case in cases]
    return [
        f"case {case_id}: case id appears {ids.count(case_id)} times"
        for case_id in sorted(set(ids))
        if ids.count(case_id) > 1
    ]


def _case_files(dataset: Dataset, case: Case, problems: list[str]) -> list[tuple[str, Path]]:
    """Report missing files / channels of a case; return its (description, path) files that exist."""
    if len(case.image_paths) != len(dataset.channel_names):
        problems.append(
            f"case {case.case_id}: {len(case.image_paths)} image file(s) but the dataset declares "
            f"{len(dataset.channel_names)} channel(s) {dataset.channel_names}"
        )
    if case.label_path is None:
        problems.append(f"case {case.case_id}: no label file")
    present = []
    for what, path in _case_paths(case):
        if not _is_inside(path, dataset.root):
            continue  # already reported; never open files outside the folder
        if not Path(path).is_file():
            problems.append(f"case {case.case_id}: {what} file missing: {_show(path, dataset.root)}")
        else:
            present.append((what, path))
    return present


def _geometry_problems(dataset: Dataset, case_id: str, files, tolerance: float) -> list[str]:
    """Shapes and affines of a case's files must agree (the first readable file is the reference)."""
    problems, reference = [], None
    for what, path in files:
        shown = _show(path, dataset.root)
        try:
            shape, affine = read_nifti_header(path)
        except DataError as exc:
            problems.append(f"case {case_id}: {what} {shown} cannot be read ({exc})")
            continue
        if len(shape) not in (2, 3):
            problems.append(
                f"case {case_id}: {what} {shown} has shape {shape}; expected a 2D or 3D volume (one file per channel)"
            )
            continue
        if (problem := affine_problem(affine, len(shape))) is not None:
            problems.append(f"case {case_id}: {what} {shown}: {problem} (fix the header's sform / qform)")
            continue
        if reference is None:
            reference = (what, shown, shape, affine)
            continue
        ref_what, ref_shown, ref_shape, ref_affine = reference
        if shape != ref_shape:
            problems.append(
                f"case {case_id}: {what} {shown} has shape {shape} but {ref_what} {ref_shown} has shape {ref_shape}"
            )
        elif not np.allclose(affine, ref_affine, rtol=0.0, atol=tolerance):
            difference = float(np.max(np.abs(affine - ref_affine)))
            problems.append(
                f"case {case_id}: {what} {shown} affine differs from {ref_what} {ref_shown} by up "
                f"to {difference:.4g} mm (tolerance {tolerance:g})"
            )
    return problems


def _label_value_problems(dataset: Dataset, case_id: str, path: Path, declared: set[int]) -> list[str]:
    shown = _show(path, dataset.root)
    try:
        values = np.unique(np.asarray(read_nifti(path).array))
    except DataError as exc:
        return [f"case {case_id}: label {shown} cannot be read ({exc})"]
    problem = label_value_problem(values, declared, source=f"{DATASET_JSON} labels {dataset.labels}")
    return [] if problem is None else [f"case {case_id}: label {shown} {problem}"]


def label_value_problem(values: np.ndarray, declared=None, source: str = "the labels") -> str | None:
    """Why the distinct voxel ``values`` of a file are no label map of the ``declared`` values, or None.

    A label map holds non-negative integers (any float type holding them is accepted); with ``declared``
    (background 0 included) only those, ``source`` naming where they were declared. A CT or MR image given
    where a label map belongs (an easy slip where images and labels share file names, as in MSD) fails
    one of these checks.
    """
    values = np.asarray(values)
    exact = values.dtype == bool or np.issubdtype(values.dtype, np.integer)
    if not exact and not (np.all(np.isfinite(values)) and np.array_equal(values, np.round(values))):
        return "contains non-integer values"
    if values.size and values.min() < 0:
        return f"contains negative values (minimum {values.min():g}): a label map holds classes 0, 1, 2, ..."
    if declared is not None:
        undeclared = sorted({int(v) for v in values} - set(declared))
        if undeclared:
            shown = undeclared[:10] + (["..."] if len(undeclared) > 10 else [])
            hint = f" ({len(undeclared)} of them: an image rather than a label map?)" if len(undeclared) > 10 else ""
            return f"contains values {shown} not declared in {source}{hint}"
    return None


def _stray_file_problems(dataset: Dataset) -> list[str]:
    """Files in imagesTr/ that belong to no case (e.g. a channel beyond those declared)."""
    if dataset.layout != "nnunetv2":
        return []
    known = {os.path.normpath(path) for case in dataset.cases for _, path in _case_paths(case)}
    return [
        f"{_show(path, dataset.root)}: belongs to no case (expected {{case}}_{{XXXX}}{dataset.file_ending} "
        f"with XXXX below {len(dataset.channel_names)})"
        for path in _visible_files(dataset.root / "imagesTr", dataset.file_ending)
        if os.path.normpath(path) not in known
    ]


# --- files ----------------------------------------------------------------------------------------


def _visible_files(folder: Path, file_ending: str) -> list[Path]:
    # Hidden names are skipped: macOS "._x.nii.gz" resource forks ship inside the MSD archives.
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.endswith(file_ending) and not p.name.startswith("."))
