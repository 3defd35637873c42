"""Ensembles of saved class probabilities: ``medseg-jax ensemble``, as nnU-Net's ``nnUNetv2_ensemble``.

``predict --save-probabilities`` writes ``{case}.npz`` beside each label map: ``probabilities`` float32
``(K, *scan shape)`` on the scan's own grid, its ``affine`` and ``labels`` (the plan's ``{name: value}`` as
JSON text in a 0-d string array; files written before it was added have none). This module writes and reads
that format and averages the files of several folders case by case with equal weights, as nnU-Net does: the
float32 sum in input order divided by the number of inputs, then the arg-max (ties go to the lower class).

Memory: the files are read one class at a time straight from their zip member (the npy layout is C order, so
class k is one contiguous block), summed, and folded into a running arg-max; the averaged file is written the
same way. A case therefore needs a few float32 volumes of the scan's size, whatever the number of classes.

Everything the files' headers tell is checked for every case before the first file is written: the same cases
in every folder, valid npz files, the same number of classes, label set, scan shape and affine (within 1e-3 mm).
Files without ``labels`` (older ones) are compared by their number of classes only; the summary counts them. The
voxels themselves are read while writing: a file whose compressed data is corrupt stops the run with the cases
before it complete and nothing of its case written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import zipfile
import zlib
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from medseg_jax.atomic import atomic_path
from medseg_jax.data.image_io import write_nifti
from medseg_jax.data.volume import Volume
from medseg_jax.errors import DataError
from medseg_jax.inference.restore import running_argmax

PROBABILITIES_SUFFIX = ".npz"
AFFINE_TOLERANCE_MM = 1e-3
MAX_CLASSES = 256  # the label map is uint8
_REPREDICT = "write it again with `medseg-jax predict --save-probabilities`"
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError)


@dataclasses.dataclass(frozen=True)
class ProbabilityFile:
    """What one ``{case}.npz`` holds besides the voxels (read from its header and small members)."""

    path: Path
    num_classes: int
    shape: tuple[int, ...]  # the scan's shape, without the class axis
    dtype: np.dtype
    affine: np.ndarray
    labels: dict[str, int] | None  # None: written before labels were stored


# --- writing -----------------------------------------------------------------------------------------------


def _write_member(archive: zipfile.ZipFile, name: str, array: np.ndarray) -> None:
    with archive.open(f"{name}.npy", "w", force_zip64=True) as member:  # as np.savez writes its members
        np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


@contextlib.contextmanager
def probability_writer(
    path: str | os.PathLike, shape: Sequence[int], affine: np.ndarray, labels: dict[str, int] | None = None
) -> Iterator[Callable[[np.ndarray], np.ndarray]]:
    """Write a probabilities file of ``shape`` ``(K, *scan shape)`` one class at a time, atomically.

    Yields ``write_class(class_map)``, to be called for classes 0 .. K-1 in order; it returns its argument, so
    it can sit in a pipeline (``running_argmax(map(write_class, class_maps))``). The file is the one
    ``np.savez_compressed(path, probabilities=..., affine=..., labels=...)`` writes, without the K x voxels
    array ever being held. It appears under ``path`` only when every class was written.
    """
    shape = tuple(int(n) for n in shape)
    written = 0

    def write_class(class_map: np.ndarray) -> np.ndarray:
        nonlocal written
        if written >= shape[0] or tuple(class_map.shape) != shape[1:]:
            raise ValueError(f"{path}: class {written} of shape {class_map.shape} does not fit {shape}")
        member.write(np.ascontiguousarray(class_map, dtype="<f4").data)
        written += 1
        return class_map

    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("probabilities.npy", "w", force_zip64=True) as member:
            header = {"descr": "<f4", "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_1_0(member, header)
            yield write_class
            if written != shape[0]:
                raise ValueError(f"{path}: {written} of {shape[0]} classes were written")
        _write_member(archive, "affine", np.asarray(affine, dtype=np.float64))
        if labels is not None:
            _write_member(archive, "labels", np.asarray(json.dumps(labels)))


# --- reading -----------------------------------------------------------------------------------------------


def _array_header(member, path: Path) -> tuple[tuple[int, ...], bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` of the npy stream ``member``, which is left at the first data byte."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(member)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(member)
    raise DataError(f"{path}: probabilities stored in npy format {version[0]}.{version[1]}, which is not read here")


def _small_member(archive: zipfile.ZipFile, name: str) -> np.ndarray:
    with archive.open(f"{name}.npy") as member:
        return np.lib.format.read_array(member, allow_pickle=False)  # object arrays (pickle) are refused


def _parse_labels(stored: np.ndarray, num_classes: int, path: Path) -> dict[str, int]:
    problem = f"{path}: 'labels' must be JSON text of {{name: class value}}"
    if stored.shape != () or stored.dtype.kind != "U":
        raise DataError(f"{problem}; found an array of shape {stored.shape} and dtype {stored.dtype}")
    try:
        labels = json.loads(stored.item())
    except json.JSONDecodeError as exc:
        raise DataError(f"{problem}; it is not valid JSON ({exc.msg})") from None
    valid = isinstance(labels, dict) and all(type(v) is int for v in labels.values())
    if not valid or not labels:
        raise DataError(f"{problem}; found {stored.item()!r}")
    if not all(0 <= value < num_classes for value in labels.values()):
        raise DataError(f"{path}: labels {labels} name values outside the {num_classes} stored classes")
    return labels


def read_probability_file(path: str | os.PathLike) -> ProbabilityFile:
    """The header of a probabilities file: number of classes, scan shape, dtype, affine and labels.

    Reads the ``probabilities`` npy header (not its voxels) and the small ``affine`` and ``labels`` members;
    a truncated or foreign file is a DataError naming it.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            members = set(archive.namelist())
            missing = {"probabilities.npy", "affine.npy"} - members
            if missing:
                raise DataError(
                    f"{path}: has no {' or '.join(sorted(m.removesuffix('.npy') for m in missing))} array "
                    f"(members: {', '.join(sorted(members)) or 'none'}); not a probabilities file, {_REPREDICT}"
                )
            with archive.open("probabilities.npy") as member:
                full_shape, fortran_order, dtype = _array_header(member, path)
            affine = _small_member(archive, "affine")
            stored_labels = _small_member(archive, "labels") if "labels.npy" in members else None
    except DataError:
        raise
    except _READ_ERRORS as exc:
        raise DataError(f"{path}: not a valid .npz file, it may be truncated ({exc}); {_REPREDICT}") from exc
    if len(full_shape) not in (3, 4) or fortran_order or dtype.kind != "f":
        raise DataError(
            f"{path}: probabilities are {'Fortran-ordered ' if fortran_order else ''}{dtype} of shape "
            f"{full_shape}; expected floats of shape (classes, *2D or 3D scan shape) in C order"
        )
    num_classes = int(full_shape[0])
    if not 1 <= num_classes <= MAX_CLASSES:
        raise DataError(f"{path}: {num_classes} classes; a uint8 label map holds 1 to {MAX_CLASSES}")
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise DataError(f"{path}: 'affine' must be a finite 4x4 matrix, found shape {affine.shape}")
    labels = None if stored_labels is None else _parse_labels(stored_labels, num_classes, path)
    return ProbabilityFile(path, num_classes, tuple(full_shape[1:]), dtype, affine.astype(np.float64), labels)


def class_maps(file: ProbabilityFile) -> Generator[np.ndarray, None, None]:
    """The file's probabilities, class 0 first, as float32 arrays of the scan's shape, read one class at a time."""
    count = int(np.prod(file.shape))
    try:
        with zipfile.ZipFile(file.path) as archive, archive.open("probabilities.npy") as member:
            _array_header(member, file.path)
            for _ in range(file.num_classes):
                data = member.read(count * file.dtype.itemsize)
                if len(data) != count * file.dtype.itemsize:
                    raise DataError(f"{file.path}: the probabilities end early; {_REPREDICT}")
                yield np.frombuffer(data, file.dtype).reshape(file.shape).astype(np.float32, copy=False)
            if member.read(1):  # also makes zipfile compare the member's checksum
                raise DataError(f"{file.path}: more probability values than its header's shape; {_REPREDICT}")
    except _READ_ERRORS as exc:
        raise DataError(f"{file.path}: corrupted probabilities ({exc}); {_REPREDICT}") from exc


def mean_class_maps(files: Sequence[ProbabilityFile]) -> Iterator[np.ndarray]:
    """Per class, the float32 mean over ``files`` (summed in their order, then divided, as nnU-Net does)."""
    streams = [class_maps(file) for file in files]
    try:
        for _ in range(files[0].num_classes):
            total = np.array(next(streams[0]), dtype=np.float32)  # a writable copy
            for stream in streams[1:]:
                total += next(stream)
            total /= np.float32(len(files))
            yield total
    finally:
        for stream in streams:
            stream.close()


# --- checking --------------------------------------------------------------------------------------------


def _names(cases: Iterable[str], limit: int = 10) -> str:
    cases = sorted(cases)
    more = f" and {len(cases) - limit} more" if len(cases) > limit else ""
    return ", ".join(cases[:limit]) + more


def find_cases(input_dirs: Sequence[str | os.PathLike], output_dir: str | os.PathLike) -> dict[str, list[Path]]:
    """``{case: [its npz file in each input folder]}``, cases sorted; DataError for fewer than two folders, a
    folder given twice or equal to the output folder, a folder without npz files, or cases missing from some."""
    folders = [Path(p) for p in input_dirs]
    if len(folders) < 2:
        raise DataError(f"an ensemble needs at least 2 input folders, got {len(folders)}: {_names(map(str, folders))}")
    resolved = [folder.resolve() for folder in folders]
    for index, folder in enumerate(resolved):
        if folder in resolved[:index]:
            raise DataError(f"{folders[index]}: input folder given twice (as {folders[resolved.index(folder)]})")
    if Path(output_dir).resolve() in resolved:
        raise DataError(f"--out {output_dir} is one of the input folders; choose another output folder")
    found: list[set[str]] = []
    for folder in folders:
        if not folder.is_dir():
            raise DataError(f"{folder}: no such folder")
        cases = {p.name.removesuffix(PROBABILITIES_SUFFIX) for p in folder.glob(f"*{PROBABILITIES_SUFFIX}")}
        cases = {case for case in cases if not case.startswith(".")}  # leftover temporary files of a killed write
        if not cases:
            raise DataError(f"{folder}: no {PROBABILITIES_SUFFIX} probability files; predict with --save-probabilities")
        found.append(cases)
    every = set().union(*found)
    missing = [f"{folder} lacks {_names(every - cases)}" for folder, cases in zip(folders, found) if every - cases]
    if missing:
        raise DataError("the input folders must hold the same cases: " + "; ".join(missing))
    return {case: [folder / f"{case}{PROBABILITIES_SUFFIX}" for folder in folders] for case in sorted(every)}


def check_same_case(files: Sequence[ProbabilityFile]) -> None:
    """DataError naming two of ``files`` (one case, one per input) when their classes, labels, scan shapes or
    affines (beyond :data:`AFFINE_TOLERANCE_MM`) differ. Files without labels are compared by class count."""
    first = files[0]
    labelled = [file for file in files if file.labels is not None]
    for other in files[1:]:
        if other.num_classes != first.num_classes:
            raise DataError(
                f"different numbers of classes: {first.path} has {first.num_classes}, {other.path} "
                f"has {other.num_classes}"
            )
        if other.shape != first.shape:
            raise DataError(f"different scan shapes: {first.path} has {first.shape}, {other.path} has {other.shape}")
        difference = float(np.max(np.abs(other.affine - first.affine)))
        if difference > AFFINE_TOLERANCE_MM:
            raise DataError(
                f"affines differ by up to {difference:.4g} mm (more than {AFFINE_TOLERANCE_MM:g}): {first.path} "
                f"{first.affine.tolist()} vs {other.path} {other.affine.tolist()}"
            )
    for other in labelled[1:]:
        if other.labels != labelled[0].labels:
            raise DataError(
                f"different label sets: {labelled[0].path} has {labelled[0].labels}, {other.path} has {other.labels}"
            )


# --- the ensemble ----------------------------------------------------------------------------------------


def ensemble_case(files: Sequence[ProbabilityFile], label_path: Path, save_probabilities: bool = False) -> list[Path]:
    """Average one case's files into ``label_path`` (uint8 arg-max, the first file's affine) and, with
    ``save_probabilities``, the averaged ``.npz`` beside it (written first, removed again if the label fails)."""
    first = files[0]
    labels = next((file.labels for file in files if file.labels is not None), None)
    written: list[Path] = []
    try:
        if save_probabilities:
            probabilities_path = label_path.with_name(label_path.name.removesuffix(".nii.gz") + PROBABILITIES_SUFFIX)
            shape = (first.num_classes, *first.shape)
            with probability_writer(probabilities_path, shape, first.affine, labels) as write_class:
                label = running_argmax(map(write_class, mean_class_maps(files)))
            written.append(probabilities_path)
        else:
            label = running_argmax(mean_class_maps(files))
        written.append(write_nifti(Volume(label, first.affine), label_path, dtype=np.uint8))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written


def ensemble_folders(
    input_dirs: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    save_probabilities: bool = False,
    progress: bool = True,
) -> dict:
    """Average the probabilities of every case in all ``input_dirs`` into ``output_dir/{case}.nii.gz`` (and
    ``{case}.npz`` with ``save_probabilities``), one case at a time.

    Every case's files are checked (:func:`find_cases`, :func:`read_probability_file`, :func:`check_same_case`)
    before the first file is written. Returns ``cases``, ``inputs``, ``classes``, ``labels`` (of the first
    labelled file, or None) and ``unlabelled_files`` (older files whose label set could not be compared).
    """
    from tqdm.auto import tqdm

    cases = find_cases(input_dirs, output_dir)
    headers: dict[str, list[ProbabilityFile]] = {}
    for case, paths in cases.items():
        headers[case] = [read_probability_file(path) for path in paths]
        check_same_case(headers[case])
    everything = [file for files in headers.values() for file in files]
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for case in tqdm(headers, desc="ensemble", unit="case", disable=not progress):
        ensemble_case(headers[case], output_dir / f"{case}.nii.gz", save_probabilities)
    return {
        "cases": len(headers),
        "inputs": len(input_dirs),
        "classes": everything[0].num_classes,
        "labels": next((file.labels for file in everything if file.labels is not None), None),
        "unlabelled_files": sum(file.labels is None for file in everything),
    }
