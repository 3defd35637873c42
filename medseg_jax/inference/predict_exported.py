"""Segment a NIfTI scan with a network exported by ``medseg-jax export``, without medseg-jax installed.

Usage (the export folder holds this file; ``--export-dir`` defaults to the folder of the script)::

    python predict_exported.py -i scan.nii.gz -o mask.nii.gz            # one file per channel, plan order
    JAX_PLATFORMS=cpu python predict_exported.py -i t1.nii.gz t2.nii.gz -o mask.nii.gz

Needs jax (with flatbuffers, which ``jax.export`` reads its files with), numpy, nibabel and scipy. scipy
stays because the plan's resampling is scipy's cubic B-spline (``scipy.ndimage.zoom`` with its
prefilter): a re-implementation would not give the same numbers, and then not the same labels. The
steps are those of ``medseg-jax predict``, in its order and arithmetic, so the label map is the same
(medseg-jax's tests compare the two voxel for voxel):

1. each channel to RAS voxel order (or the plan's ``orientation``), axis permutations and flips only;
2. crop to the box of voxels != 0 in any channel;
3. resample to the plan's ``target_spacing`` (order ``image_order``; with a spacing ratio above 3 the
   thickest axis alone at order 0), denoise / CLAHE, normalise as the plan says (before resampling when
   ``preprocessing.normalize_before_resampling``);
4. sliding window over the preprocessed image: Gaussian-weighted windows at ``step_size`` of the patch,
   every mirror combination of ``mirror_axes`` averaged (2D plans: every slice along the last axis);
5. softmax, class probabilities resampled linearly back to the cropped box (plans imported from nnU-Net:
   the logits, softmax after), arg-max, background outside the box, the file's voxel order;
6. the label map written as uint8 NIfTI with the input's affine.

The artefact (``export.json``, ``forward.jaxexport``, ``parameters.npz``, ``importance_map.npy``) can also
be used from Python: ``load_artefact(folder)`` and ``predict_volumes(artefact, arrays, affine)``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "medseg-jax export"
FORMAT_VERSION = 1
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
METADATA_NAME = "export.json"
FUNCTION_NAME = "forward.jaxexport"
PARAMETERS_NAME = "parameters.npz"
IMPORTANCE_MAP_NAME = "importance_map.npy"
ANISOTROPY_THRESHOLD = 3.0  # a spacing ratio above it resamples the thickest axis alone (nnU-Net's rule)
MIN_STD = 1e-8  # z-score of a constant image: 0, not NaN


class ExportError(Exception):
    """An export folder or an input that this predictor cannot use; the message says which and why."""


# --- the artefact -----------------------------------------------------------------------------------------


def read_metadata(folder) -> dict:
    """``export.json`` of an export folder, refused unless it is this predictor's format version."""
    path = Path(folder) / METADATA_NAME
    if not path.is_file():
        raise ExportError(f"{folder}: not an export folder (no {METADATA_NAME}); write one with medseg-jax export")
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ExportError(f"{path}: not a {FORMAT} file")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ExportError(
            f"{path}: export format version {metadata.get('format_version')!r}, but this predictor reads version "
            f"{FORMAT_VERSION}; export the run again with the medseg-jax that goes with this predictor"
        )
    return metadata


def current_platform() -> str:
    """The platform JAX runs on here, as ``jax.export`` names it (``cpu``, ``cuda``, ``rocm``, ``tpu``)."""
    import jax

    return jax.export.default_export_platform()


class Artefact:
    """A loaded export: ``metadata`` (export.json), ``exported`` (the ``jax.export.Exported`` forward
    function ``(parameters, windows (b, *patch, C)) -> logits (b, *patch, K)``), ``parameters`` (its first
    argument, a list of arrays) and ``importance_map`` (the Gaussian window weights, ``patch`` float32)."""

    def __init__(self, folder, platform: str | None = None):
        import jax

        folder = Path(folder)
        self.metadata = read_metadata(folder)
        self.platform = platform or current_platform()
        exported_for = list(self.metadata.get("platforms", []))
        if self.platform not in exported_for:
            raise ExportError(
                f"{folder}: exported for {', '.join(exported_for)}, not for {self.platform}; export again with "
                f"--platforms {' '.join(exported_for + [self.platform])}, or run on one of those platforms "
                "(JAX_PLATFORMS=cpu picks the CPU)"
            )
        try:
            self.exported = jax.export.deserialize(bytearray((folder / FUNCTION_NAME).read_bytes()))
            with np.load(folder / PARAMETERS_NAME) as stored:
                self.parameters = [stored[name] for name in sorted(stored.files)]
            self.importance_map = np.load(folder / IMPORTANCE_MAP_NAME)
        except Exception as exc:  # a missing or damaged file: name the folder, not a jax / zip internal
            raise ExportError(f"{folder}: cannot load the exported function or its parameters ({exc})") from exc
        if len(self.parameters) != self.metadata["function"]["parameters"]:
            raise ExportError(
                f"{folder / PARAMETERS_NAME}: {len(self.parameters)} arrays, the function takes "
                f"{self.metadata['function']['parameters']}"
            )
        self._program = None

    def program(self):
        """The jitted per-batch program ``(parameters, windows, weight) -> weighted mirrored logits``: the
        windows and every mirrored copy go through the network as one batch, as medseg-jax predicts."""
        if self._program is None:
            import jax
            import jax.numpy as jnp

            exported = self.exported
            flips = [tuple(a + 1 for a in subset) for subset in mirror_subsets(self.metadata["inference"])]

            def program(parameters, windows, weight):
                if len(flips) == 1:
                    logits = exported.call(parameters, windows).astype(jnp.float32)
                else:
                    stacked = jnp.concatenate([jnp.flip(windows, axes) if axes else windows for axes in flips])
                    out = exported.call(parameters, stacked).astype(jnp.float32)
                    out = out.reshape((len(flips), windows.shape[0]) + out.shape[1:])
                    logits = sum(jnp.flip(out[i], axes) if axes else out[i] for i, axes in enumerate(flips)) / len(
                        flips
                    )
                return logits * weight[None, ..., None]

            self._program = jax.jit(program)
        return self._program


def load_artefact(folder, platform: str | None = None) -> Artefact:
    """Load an export folder for ``platform`` (default: the one JAX runs on); ExportError if it cannot."""
    return Artefact(folder, platform)


def mirror_subsets(inference: dict) -> list[tuple[int, ...]]:
    """Every subset of the mirrored axes, the empty one first (the order medseg-jax averages them in)."""
    axes = tuple(int(a) for a in inference["mirror_axes"])
    return list(itertools.chain.from_iterable(itertools.combinations(axes, r) for r in range(len(axes) + 1)))


# --- geometry ---------------------------------------------------------------------------------------------


def _ras_transform(affine: np.ndarray):
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    ornt = io_orientation(np.asarray(affine, dtype=np.float64))
    if np.isnan(ornt).any():
        raise ExportError(f"the affine is degenerate:\n{affine}")
    return ornt_transform(ornt, axcodes2ornt(("R", "A", "S")))


def _apply(array: np.ndarray, transform) -> np.ndarray:
    from nibabel.orientations import apply_orientation

    return np.ascontiguousarray(apply_orientation(array, transform))


def to_ras(array: np.ndarray, affine: np.ndarray):
    """``(array, affine)`` with the voxel axes permuted / flipped to RAS (2D arrays unchanged)."""
    from nibabel.orientations import inv_ornt_aff

    if array.ndim == 2:
        return array, affine
    transform = _ras_transform(affine)
    return _apply(array, transform), affine @ inv_ornt_aff(transform, array.shape)


def permute_axes(array: np.ndarray, affine: np.ndarray, axes):
    axes = [int(a) for a in axes]
    permuted = affine.copy()
    permuted[:3, :3] = affine[:3, axes]
    return np.ascontiguousarray(np.transpose(array, axes)), permuted


def orient(array: np.ndarray, affine: np.ndarray, orientation: dict | None):
    """The plan's voxel order: RAS, or ``orientation["axes"]`` of the file's or the RAS axes."""
    if orientation is None:
        return to_ras(array, affine)
    if array.ndim != 3:
        raise ExportError(f"a plan with an axis order needs 3D images, got shape {array.shape}")
    if orientation["frame"] != "file":
        array, affine = to_ras(array, affine)
    return permute_axes(array, affine, orientation["axes"])


def unorient(array: np.ndarray, orientation: dict | None, original_affine: np.ndarray) -> np.ndarray:
    """Undo :func:`orient` for an array on the oriented grid (values moved, never interpolated)."""
    if orientation is not None:
        array = np.ascontiguousarray(np.transpose(array, np.argsort(orientation["axes"])))
        if orientation["frame"] == "file":
            return array
    if array.ndim == 2:
        return array
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    return _apply(array, ornt_transform(axcodes2ornt(("R", "A", "S")), io_orientation(original_affine)))


def spacing_of(affine: np.ndarray, ndim: int) -> list[float]:
    return [float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)[:ndim]]


def nonzero_bbox(image: np.ndarray) -> list[list[int]]:
    mask = np.any(image != 0, axis=0)
    if not mask.any():
        return [[0, int(n)] for n in mask.shape]
    bbox = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        bbox.append([int(hits[0]), int(hits[-1]) + 1])
    return bbox


# --- resampling (edge-aligned grids, scipy's splines) -----------------------------------------------------


def shape_for_spacing(shape, spacing, new_spacing) -> tuple[int, ...]:
    ratio = np.asarray(spacing, dtype=np.float64) / np.asarray(new_spacing, dtype=np.float64)
    return tuple(max(1, int(round(n * r))) for n, r in zip(shape, ratio))


def separate_axis(spacing, new_spacing) -> int | None:
    for candidate in (spacing, new_spacing):
        values = np.asarray(candidate, dtype=np.float64)
        if values.size == 3 and values.max() / values.min() > ANISOTROPY_THRESHOLD:
            thickest = np.flatnonzero(values == values.max())
            return int(thickest[0]) if thickest.size == 1 else None
    return None


def _zoom(array: np.ndarray, new_shape, order: int, clip: bool = False) -> np.ndarray:
    from scipy import ndimage

    if tuple(array.shape) == tuple(new_shape):
        return array
    factors = np.asarray(new_shape, dtype=np.float64) / np.asarray(array.shape, dtype=np.float64)
    out = ndimage.zoom(array, factors, order=order, mode="nearest", grid_mode=True, prefilter=order > 1)
    if clip:
        np.clip(out, array.min(), array.max(), out=out)
    return out


def resample_array(array: np.ndarray, new_shape, order: int, axis: int | None, clip: bool = False) -> np.ndarray:
    array = np.asarray(array, dtype=np.float32)
    new_shape = tuple(int(n) for n in new_shape)
    if array.shape == new_shape:
        return array.copy()
    if axis is None:
        return _zoom(array, new_shape, order, clip)
    moved = np.moveaxis(array, axis, 0)
    in_plane = new_shape[:axis] + new_shape[axis + 1 :]
    slices = np.stack([_zoom(s, in_plane, order, clip) for s in moved])
    stacked = _zoom(slices, (new_shape[axis],) + in_plane, 0)
    return np.ascontiguousarray(np.moveaxis(stacked, 0, axis))


def resample_image(image: np.ndarray, spacing, new_spacing, order: int, new_shape=None, clip: bool = False):
    """``(C, *spatial)`` from ``spacing`` to ``new_spacing`` (or to ``new_shape``), float32."""
    spatial = image.shape[1:]
    new_shape = tuple(new_shape) if new_shape is not None else shape_for_spacing(spatial, spacing, new_spacing)
    axis = separate_axis(spacing, new_spacing)
    return np.stack([resample_array(c, new_shape, order, axis, clip=clip) for c in image]).astype(np.float32)


# --- intensities ------------------------------------------------------------------------------------------


def normalize_channel(x: np.ndarray, scheme: dict, mask: np.ndarray | None) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    name = scheme.get("scheme")
    if name == "ct":
        x = np.clip(x, scheme["percentile_00_5"], scheme["percentile_99_5"])
        return ((x - scheme["mean"]) / max(float(scheme["std"]), MIN_STD)).astype(np.float32)
    if name == "zscore" and scheme.get("use_mask"):
        out = x.copy()
        inside = x[mask]
        out[mask] = (inside - inside.mean()) / max(float(inside.std()), MIN_STD)
        return out
    if name == "zscore":
        return ((x - x.mean()) / max(float(x.std()), MIN_STD)).astype(np.float32)
    if name == "hu_window":
        lower, upper = float(scheme["lower"]), float(scheme["upper"])
        return ((np.clip(x, lower, upper) - lower) / (upper - lower)).astype(np.float32)
    if name == "rescale_01":
        shifted = x - x.min()
        return (shifted / max(float(shifted.max()), MIN_STD)).astype(np.float32)
    if name == "none":
        return x.copy()
    raise ExportError(f"normalization scheme {name!r} is unknown to this predictor")


def denoise(x: np.ndarray, options: dict, spacing, in_plane_only: bool) -> np.ndarray:
    from scipy import ndimage

    x = np.asarray(x, dtype=np.float32)
    if options.get("method") == "gaussian":
        sigma = np.float64(options["sigma"]) / np.asarray(spacing, dtype=np.float64)
        if in_plane_only and x.ndim == 3:
            sigma[-1] = 0.0
        return ndimage.gaussian_filter(x, sigma=tuple(sigma), mode="nearest").astype(np.float32)
    if options.get("method") == "median":
        size = [int(options["size"])] * x.ndim
        if in_plane_only and x.ndim == 3:
            size[-1] = 1
        return ndimage.median_filter(x, size=tuple(size), mode="nearest").astype(np.float32)
    raise ExportError(f"denoise method {options.get('method')!r} is unknown to this predictor")


def _clahe_slice(image: np.ndarray, clip_limit: float, kernel_size, n_bins: int) -> np.ndarray:
    ky, kx = (int(k) for k in kernel_size)
    h, w = image.shape
    ty, tx = -(-h // ky), -(-w // kx)
    bins = np.minimum((image * n_bins).astype(np.int64), n_bins - 1)
    padded = np.pad(bins, ((0, ty * ky - h), (0, tx * kx - w)), mode="edge")
    tiles = padded.reshape(ty, ky, tx, kx).transpose(0, 2, 1, 3).reshape(ty * tx, ky * kx)
    tile_ids = np.repeat(np.arange(ty * tx), ky * kx)
    hist = np.bincount(tile_ids * n_bins + tiles.ravel(), minlength=ty * tx * n_bins)
    hist = hist.reshape(ty * tx, n_bins).astype(np.float64)
    limit = max(clip_limit * ky * kx, 1.0)
    excess = np.maximum(hist - limit, 0.0).sum(axis=1, keepdims=True)
    hist = np.minimum(hist, limit) + excess / n_bins
    maps = (np.cumsum(hist, axis=1) / (ky * kx)).reshape(ty, tx, n_bins)

    def neighbours(n_pixels, k, n_tiles):
        pos = np.clip((np.arange(n_pixels) + 0.5) / k - 0.5, 0, n_tiles - 1)
        low = np.floor(pos).astype(np.int64)
        return low, np.minimum(low + 1, n_tiles - 1), (pos - low)

    y0, y1, wy = neighbours(h, ky, ty)
    x0, x1, wx = neighbours(w, kx, tx)
    wy, wx = wy[:, None], wx[None, :]
    top = (1 - wx) * maps[y0[:, None], x0[None, :], bins] + wx * maps[y0[:, None], x1[None, :], bins]
    bottom = (1 - wx) * maps[y1[:, None], x0[None, :], bins] + wx * maps[y1[:, None], x1[None, :], bins]
    return np.clip((1 - wy) * top + wy * bottom, 0.0, 1.0)


def clahe(x: np.ndarray, options: dict, window) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    lower, upper = (float(x.min()), float(x.max())) if window is None else (float(window[0]), float(window[1]))
    if upper <= lower:
        return x.copy()
    unit = (np.clip(x, lower, upper) - lower) / (upper - lower)
    kernel = options.get("kernel_size")
    if kernel is None:
        kernel = [max(2, n // 8) for n in x.shape[:2]]
    elif isinstance(kernel, (int, float, np.integer)):
        kernel = [int(kernel)] * 2
    clip_limit, n_bins = float(options.get("clip_limit", 0.01)), int(options.get("n_bins", 256))
    if x.ndim == 2:
        out = _clahe_slice(unit, clip_limit, kernel, n_bins)
    else:
        out = np.stack([_clahe_slice(unit[..., k], clip_limit, kernel, n_bins) for k in range(x.shape[-1])], -1)
    return (lower + out * (upper - lower)).astype(np.float32)


def _intensity_window(scheme: dict):
    if scheme["scheme"] == "hu_window":
        return scheme["lower"], scheme["upper"]
    if scheme["scheme"] == "ct":
        return scheme["percentile_00_5"], scheme["percentile_99_5"]
    return None


def normalize(image: np.ndarray, plan: dict, spacing) -> np.ndarray:
    """Denoise, CLAHE and normalise every channel of ``(C, *spatial)`` as the plan says."""
    options = plan["preprocessing"]
    mask = None
    if any(s.get("use_mask") for s in plan["normalization"]):
        from scipy.ndimage import binary_fill_holes

        mask = binary_fill_holes(np.any(image != 0, axis=0))
    channels = []
    for c, scheme in enumerate(plan["normalization"]):
        x = image[c]
        if options.get("denoise") is not None:
            x = denoise(x, options["denoise"], spacing, in_plane_only=plan["dim"] == 2)
        if options.get("clahe") is not None:
            x = clahe(x, options["clahe"], _intensity_window(scheme))
        channels.append(normalize_channel(x, scheme, mask))
    return np.stack(channels).astype(np.float32)


# --- prediction -------------------------------------------------------------------------------------------


def preprocess(arrays: list[np.ndarray], affine: np.ndarray, plan: dict):
    """``(image (C, *spatial) float32, geometry)``: the network's input grid and what undoes it."""
    orientation = plan.get("orientation")
    oriented = [orient(np.asarray(a), affine, orientation) for a in arrays]
    spacing = spacing_of(oriented[0][1], oriented[0][0].ndim)
    if len(plan["target_spacing"]) != len(spacing):
        raise ExportError(f"a {len(spacing)}D image does not fit a plan with target spacing {plan['target_spacing']}")
    target = [s if t is None else float(t) for s, t in zip(spacing, plan["target_spacing"])]
    stack = np.stack([array.astype(np.float32) for array, _ in oriented])
    bbox = nonzero_bbox(stack)
    image = stack[(Ellipsis,) + tuple(slice(a, b) for a, b in bbox)]
    crop_shape = image.shape[1:]
    resampling = plan.get("resampling", {})
    early = bool(plan["preprocessing"].get("normalize_before_resampling"))
    if early:
        image = normalize(image, plan, spacing)
    image = resample_image(
        image, spacing, target, order=resampling.get("image_order", 3), clip=bool(resampling.get("clip_to_input_range"))
    )
    if not early:
        image = normalize(image, plan, target)
    geometry = {
        "spacing": spacing,
        "target": target,
        "bbox": bbox,
        "crop_shape": crop_shape,
        "oriented_shape": oriented[0][0].shape,
        "orientation": orientation,
        "affine": np.asarray(affine, dtype=np.float64),
    }
    return image, geometry


def window_starts(image_shape, patch, step: float) -> list[list[int]]:
    starts = []
    for size, p in zip(image_shape, patch):
        count = int(np.ceil((size - p) / (p * step))) + 1
        spacing = (size - p) / (count - 1) if count > 1 else 0.0
        starts.append([int(np.round(spacing * i)) for i in range(count)])
    return starts


def sliding_window(artefact: Artefact, image: np.ndarray) -> np.ndarray:
    """Blended logits ``(N, *spatial, K)`` of ``image (N, *spatial, C)`` (N images of one shape)."""
    import jax

    inference = artefact.metadata["inference"]
    patch = tuple(int(p) for p in inference["patch_size"])
    batch_size = int(inference["batch_size"])
    weight = artefact.importance_map
    num_images, spatial = image.shape[0], image.shape[1:-1]
    widths = [((max(p - s, 0)) // 2, max(p - s, 0) - max(p - s, 0) // 2) for s, p in zip(spatial, patch)]
    padded = np.pad(image, [(0, 0), *widths, (0, 0)])
    positions = list(itertools.product(*window_starts(padded.shape[1:-1], patch, float(inference["step_size"]))))
    rows = [(n, *s) for n in range(num_images) for s in positions]
    count = len(rows)
    rows += [rows[0]] * (-(-count // batch_size) * batch_size - count)  # whole batches; copies weigh nothing
    program = artefact.program()
    parameters = [jax.device_put(p) for p in artefact.parameters]
    device_weight = jax.device_put(weight)
    acc = None

    def region(row):
        return (int(row[0]), *(slice(int(s), int(s) + p) for s, p in zip(row[1:], patch)))

    for first in range(0, len(rows), batch_size):
        batch = rows[first : first + batch_size]
        result = np.asarray(program(parameters, np.stack([padded[region(r)] for r in batch]), device_weight))
        if acc is None:
            acc = np.zeros((num_images, *padded.shape[1:-1], result.shape[-1]), np.float32)
        for index, (row, logits) in enumerate(zip(batch, result)):
            if first + index < count:
                acc[region(row)] += logits
    if acc is None:  # not reachable: there is always at least one window
        raise ExportError(f"no window fits an image of shape {spatial}")
    total = np.zeros(padded.shape[1:-1], np.float32)
    for start in positions:
        total[tuple(slice(int(s), int(s) + p) for s, p in zip(start, patch))] += weight
    logits = acc / total[None, ..., None]
    return logits[(slice(None), *(slice(lo, lo + n) for (lo, _), n in zip(widths, spatial)), slice(None))]


def network_logits(artefact: Artefact, image: np.ndarray) -> np.ndarray:
    """Blended logits ``(K, *spatial)`` of a preprocessed ``(C, *spatial)`` image (2D plans: per slice)."""
    dim = len(artefact.metadata["inference"]["patch_size"])
    extra = image.ndim - 1 - dim
    if extra == 0:
        return np.moveaxis(np.asarray(sliding_window(artefact, np.moveaxis(image, 0, -1)[None])[0]), -1, 0)
    if extra == 1:  # a 2D network on a volume: the slices along the last axis are the batch
        logits = sliding_window(artefact, np.moveaxis(image, (0, image.ndim - 1), (-1, 0)))
        return np.moveaxis(logits, (-1, 0), (0, logits.ndim - 1))
    raise ExportError(f"a {image.ndim - 1}D image cannot be predicted with a {dim}D network")


def predict_volumes(artefact: Artefact, arrays: list[np.ndarray], affine: np.ndarray) -> np.ndarray:
    """The uint8 label map, on the input's grid, of one case given as one array per channel (file voxel
    order, one shared ``affine``)."""
    import jax

    plan = artefact.metadata["plan"]
    if len(arrays) != len(plan["channel_names"]):
        raise ExportError(
            f"{len(arrays)} channel(s) given, the model expects {len(plan['channel_names'])}: "
            f"{', '.join(plan['channel_names'])}"
        )
    for c, array in enumerate(arrays):
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise ExportError(f"channel {c} has NaN or infinite voxels")
    image, geometry = preprocess(arrays, affine, plan)
    logits = network_logits(artefact, image)
    region = tuple(slice(a, b) for a, b in geometry["bbox"])
    target, spacing, crop_shape = geometry["target"], geometry["spacing"], geometry["crop_shape"]
    if plan.get("resampling", {}).get("resample_logits"):  # nnU-Net: logits back, softmax on the file's grid
        back = resample_image(logits.astype(np.float32), target, spacing, order=1, new_shape=crop_shape)
        full = np.full((logits.shape[0],) + tuple(geometry["oriented_shape"]), -np.inf, dtype=np.float32)
        full[0] = 0.0
        full[(Ellipsis,) + region] = back
        full = np.stack([unorient(channel, geometry["orientation"], geometry["affine"]) for channel in full])
        probabilities = np.asarray(jax.nn.softmax(full, axis=0), dtype=np.float32)
        return np.argmax(probabilities, axis=0).astype(np.uint8)
    probabilities = np.asarray(jax.nn.softmax(logits, axis=0), dtype=np.float32)
    back = resample_image(probabilities, target, spacing, order=1, new_shape=crop_shape)
    # Outside the box the probabilities are background 1, so its label is 0; arg-max commutes with moving
    # voxels, so the label map is reoriented rather than K probability maps.
    label = np.zeros(geometry["oriented_shape"], dtype=np.uint8)
    label[region] = np.argmax(back, axis=0).astype(np.uint8)
    return unorient(label, geometry["orientation"], geometry["affine"])


def read_nifti(path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: file not found")
    try:
        image: Any = nib.load(str(path))  # a NIfTI image: voxels and an affine
        array = np.asarray(image.dataobj)
    except Exception as exc:
        raise ExportError(f"{path}: not a readable NIfTI file ({exc})") from exc
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3):
        raise ExportError(f"{path}: expected a 2D or 3D image, found shape {array.shape}")
    return array, np.asarray(image.affine, dtype=np.float64)


def write_nifti(label: np.ndarray, affine: np.ndarray, path) -> None:
    """Write the label map with the input's affine, under a temporary name first (never half-written)."""
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(label.astype(np.uint8), affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        nib.save(image, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def predict_file(artefact: Artefact, inputs, output) -> np.ndarray:
    """Predict one case from its channel files (plan order) into ``output`` (.nii.gz); returns the labels."""
    read = [read_nifti(p) for p in inputs]
    if len({array.shape for array, _ in read}) != 1:
        raise ExportError(f"channel shapes differ: {[array.shape for array, _ in read]}")
    label = predict_volumes(artefact, [array for array, _ in read], read[0][1])
    write_nifti(label, read[0][1], output)
    return label


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-i", "--input", nargs="+", required=True, help="the case's NIfTI file(s), one per channel")
    parser.add_argument("-o", "--output", required=True, help="label map to write (.nii.gz)")
    parser.add_argument("--export-dir", default=str(Path(__file__).resolve().parent), help="the export folder")
    parser.add_argument("--platform", choices=PLATFORMS, default=None, help="default: the one JAX runs on")
    args = parser.parse_args(argv)
    try:
        if not str(args.output).endswith((".nii.gz", ".nii")):
            raise ExportError(f"{args.output}: the output name must end with .nii.gz or .nii")
        if any(Path(args.output).resolve() == Path(p).resolve() for p in args.input):
            raise ExportError(f"{args.output}: writing there would replace an input scan")
        artefact = load_artefact(args.export_dir, args.platform)
        label = predict_file(artefact, args.input, args.output)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    names = {int(v): k for k, v in artefact.metadata["plan"]["labels"].items()}
    counts = np.bincount(label.ravel(), minlength=len(names))
    found = ", ".join(f"{names.get(v, v)} {int(n)} voxels" for v, n in enumerate(counts) if v > 0)
    print(f"{args.output}: {found}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
