"""Synthetic abdominal CT phantoms with liver and liver-tumour labels, for tests and the demo.

:func:`make_ct_phantom` draws one case in Hounsfield units: air outside a body of subcutaneous fat and
a muscle wall; a spine (vertebral bodies, discs, canal, spinous process) and ribs; bowel with fat and
gas pockets; liver, spleen, kidneys and aorta with smooth random shapes; and liver tumours of random
number, size and contrast. The image is blurred like a CT point-spread function (partial volume) and
carries spatially correlated Gaussian noise. Labels: 0 background, 1 liver, 2 tumour; a tumour is
always inside the liver. :func:`write_synthetic_dataset` writes cases in the nnU-Net v2 raw layout.

Geometry: the anatomy is built on a canonical RAS grid centred on the body (+x patient right, +y
anterior, +z superior; world = anatomy mm + a random table offset). Only then is the array
permuted / flipped into a random axial orientation code (LPS, RAS, PLI, ...) with the affine changed
to match, so the world-space anatomy is the same whatever the file order: readers must use the affine.

Voxels are coarse on purpose (for the default 64x64x32 grid, 5-6.6 mm in-plane and 5-8 mm between
slices): real abdominal CT has 0.6-1 mm pixels on 512x512 slices, but the demo trains on tiny grids on
two CPU cores, and at real resolution such a grid would hold a patch of one organ instead of a body.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from nibabel import orientations as nio
from scipy import ndimage

from medseg_jax.data.image_io import write_nifti
from medseg_jax.data.volume import Volume
from medseg_jax.errors import DataError

DEFAULT_SHAPE = (64, 64, 32)
DEFAULT_DATASET_NAME = "Dataset001_SynthLiver"
LABELS = {"background": 0, "liver": 1, "tumour": 2}
GENERATOR_ID = "medseg_jax.data.synthetic"

# The default spacing range is derived from an abdominal field of view: 320-448 mm across (an adult
# abdomen is about 300 x 220 mm) and 160-256 mm head to foot (the liver spans about 150 mm).
FIELD_OF_VIEW_MM = {"in_plane": (320.0, 420.0), "slice": (160.0, 256.0)}
# Slice thickness range for 2D phantoms (one axial slice), where there is no z field of view.
SLICE_THICKNESS_2D_MM = (5.0, 8.0)
# Axial acquisitions: slice axis last, in-plane axes in either order and direction, head first or
# feet first -- the codes scanners and converters produce (LPS from DICOM, RAS from many tools...).
AXIAL_CODES = tuple(
    first + second + third
    for pair in (("RL", "AP"), ("AP", "RL"))
    for first in pair[0]
    for second in pair[1]
    for third in "SI"
)
# Tumour contrast relative to the liver in HU: (probability, low, high). Mostly clearly hypodense,
# some barely visible, a few hyperdense, so that the task is learnable but not trivial.
TUMOUR_CONTRASTS = ((0.75, -55.0, -25.0), (0.15, -15.0, -8.0), (0.10, 15.0, 30.0))
TUMOUR_RADIUS_MM = (8.0, 30.0)


def make_ct_phantom(
    seed: int,
    shape: tuple[int, ...] = DEFAULT_SHAPE,
    spacing: tuple[float, ...] | None = None,
    num_tumours: int | None = None,
    *,
    spacing_range: tuple[tuple[float, float], tuple[float, float]] | None = None,
    orientation: str | None = None,
    noise_sigma_range: tuple[float, float] = (10.0, 20.0),
) -> tuple[Volume, Volume]:
    """Draw one synthetic abdominal CT case; the same ``seed`` always gives the same case.

    Args:
      seed: non-negative integer seed.
      shape: grid size in RAS order ``(x, y, z)``, or ``(x, y)`` for one axial slice through the liver.
        The returned arrays have these axes permuted / flipped into the chosen orientation.
      spacing: voxel size in mm in RAS order (``len(shape)`` values); drawn from ``spacing_range``
        when None (square in-plane pixels).
      num_tumours: number of tumours (0 for a healthy liver); 1-3 when None. A tumour is skipped only
        if the liver is too small to hold it.
      spacing_range: ``((in_plane_min, in_plane_max), (slice_min, slice_max))`` in mm; by default the
        range that gives a 320-420 mm in-plane and a 160-256 mm z field of view on ``shape``.
      orientation: axis code of the returned arrays (e.g. ``"LPS"``); a random axial code when None.
        2D phantoms are always ``"RAS"``.
      noise_sigma_range: range of the noise standard deviation in HU.

    Returns:
      ``(image, label)``: ``image`` int16 HU, ``label`` uint8 (0 background, 1 liver, 2 tumour), same
      shape and affine; ``metadata`` records the seed, orientation code and number of tumours.
    """
    shape = check_phantom_shape(shape)
    seed = _check_int(seed, "phantom seed", minimum=0)
    # Independent streams, so that the anatomy of a seed is the same whatever the tumour count.
    anatomy_rng, tumour_rng, noise_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(3))
    voxel_mm = _draw_spacing(anatomy_rng, shape, spacing, spacing_range)
    liver_z = (anatomy_rng.uniform(10.0, 40.0), anatomy_rng.uniform(60.0, 85.0))  # centre, semi-axis
    axes = _anatomy_axes(anatomy_rng, shape, voxel_mm, liver_z)
    hu, liver, (bone, bone_hu) = _paint_anatomy(anatomy_rng, axes, liver_z)
    code = _choose_orientation(anatomy_rng, len(shape), orientation)
    offset = anatomy_rng.uniform((-30.0, -30.0, -350.0), (30.0, 30.0, -50.0))

    label = liver.astype(np.uint8)
    count = tumour_rng.integers(1, 4) if num_tumours is None else _check_int(num_tumours, "num_tumours", 0)
    placed = _add_tumours(tumour_rng, axes, voxel_mm, hu, label, count)
    hu = np.where(bone, bone_hu, hu)  # the liver (and so every tumour) already excludes bone

    image = _acquire(noise_rng, hu, noise_sigma_range, grid_is_2d=len(shape) == 2)
    affine = np.diag([*voxel_mm, 1.0])
    affine[:3, 3] = [axes[0][0, 0, 0], axes[1][0, 0, 0], axes[2][0, 0, 0]] + offset
    if len(shape) == 2:
        image, label = image[..., 0], label[..., 0]
    else:
        transform = nio.ornt_transform(nio.axcodes2ornt(tuple("RAS")), nio.axcodes2ornt(tuple(code)))
        affine = affine @ nio.inv_ornt_aff(transform, image.shape)
        image, label = (np.ascontiguousarray(nio.apply_orientation(a, transform)) for a in (image, label))
    metadata = {"synthetic_seed": seed, "orientation": code, "num_tumours": placed}
    return Volume(image, affine, dict(metadata)), Volume(label, affine, dict(metadata))


def write_synthetic_dataset(
    out_dir: str | os.PathLike,
    num_cases: int,
    seed: int = 0,
    shape: tuple[int, ...] = DEFAULT_SHAPE,
    name: str = DEFAULT_DATASET_NAME,
) -> Path:
    """Write ``num_cases`` phantoms as the nnU-Net v2 raw dataset ``out_dir/name``; return its path.

    Layout: ``imagesTr/synth_000_0000.nii.gz`` (int16 HU), ``labelsTr/synth_000.nii.gz`` (uint8) and
    ``dataset.json``. Cases are written into a hidden temporary sibling folder that is renamed into
    place at the end, so an interrupted run never leaves a half-written dataset. An existing folder is
    replaced only if it is empty or a synthetic dataset written by this function.
    """
    num_cases = _check_int(num_cases, "num_cases", minimum=1)
    seed = _check_int(seed, "seed", minimum=0)
    shape = check_phantom_shape(shape)
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or os.sep in name:
        raise DataError(f"dataset name must be a plain folder name, got {name!r}")
    out_dir = Path(out_dir)
    target = out_dir / name
    _check_replaceable(target)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=out_dir))
    try:
        for index in range(num_cases):
            case_id = f"synth_{index:03d}"
            # Per-case seeds from (seed, index): datasets with different seeds share no case.
            case_seed = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
            image, label = make_ct_phantom(case_seed, shape)
            write_nifti(image, staging / "imagesTr" / f"{case_id}_0000.nii.gz", dtype=np.int16)
            write_nifti(label, staging / "labelsTr" / f"{case_id}.nii.gz", dtype=np.uint8)
        meta = {
            "name": name,
            "description": "Synthetic abdominal CT phantoms with liver and liver tumour labels",
            "channel_names": {"0": "CT"},
            "labels": dict(LABELS),
            "numTraining": num_cases,
            "file_ending": ".nii.gz",
            "synthetic": {"generator": GENERATOR_ID, "seed": seed, "shape": list(shape)},
        }
        (staging / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
        _swap_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def check_phantom_shape(shape) -> tuple[int, ...]:
    try:
        dims = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise DataError(f"phantom shape must be a tuple of 2 or 3 integers, got {shape!r}") from None
    if len(dims) not in (2, 3) or min(dims) < 8:
        raise DataError(f"phantom shape must have 2 or 3 sizes of at least 8 voxels, got {shape!r}")
    return dims


def _check_int(value, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _draw_spacing(rng, shape, spacing, spacing_range) -> np.ndarray:
    """Voxel size (x, y, z) in mm. 2D phantoms get a slice thickness for the affine's third column."""
    in_plane: tuple[float, ...]  # (min, max) mm of the draws below
    through: tuple[float, ...]
    if spacing_range is None:
        fov_xy, fov_z = FIELD_OF_VIEW_MM["in_plane"], FIELD_OF_VIEW_MM["slice"]
        # The smaller in-plane size sets the pixel so the body fits across both axes.
        in_plane = (fov_xy[0] / min(shape[:2]), fov_xy[1] / min(shape[:2]))
        through = (fov_z[0] / shape[2], fov_z[1] / shape[2]) if len(shape) == 3 else SLICE_THICKNESS_2D_MM
    else:
        in_plane, through = (tuple(float(v) for v in r) for r in spacing_range)
        if not (0 < in_plane[0] <= in_plane[1] and 0 < through[0] <= through[1]):
            raise DataError(f"spacing_range must be ((min, max), (min, max)) in mm > 0, got {spacing_range!r}")
    pixel, thickness = rng.uniform(*in_plane), rng.uniform(*through)
    if spacing is None:
        return np.array([pixel, pixel, thickness])
    values = [float(v) for v in spacing]
    if len(values) != len(shape) or min(values) <= 0:
        raise DataError(f"spacing must have {len(shape)} positive values (mm, RAS order), got {spacing!r}")
    return np.array(values if len(values) == 3 else [*values, thickness])


def _anatomy_axes(rng, shape, voxel_mm, liver_z):
    """Broadcastable world coordinates (mm, relative to the body centre) of the RAS grid's voxels."""
    nx, ny = shape[:2]
    x = (np.arange(nx) - (nx - 1) / 2) * voxel_mm[0]
    y = (np.arange(ny) - (ny - 1) / 2) * voxel_mm[1]
    if len(shape) == 3:
        z = (np.arange(shape[2]) - (shape[2] - 1) / 2) * voxel_mm[2]
    else:  # one axial slice somewhere through the liver
        z = np.array([liver_z[0] + rng.uniform(-0.5, 0.5) * liver_z[1]])
    return x[:, None, None], y[None, :, None], z[None, None, :]


def _smooth_field(rng, axes, wavelength_mm, n_waves=6):
    """A random smooth field in [-1, 1]: a sum of plane waves of random direction and phase."""
    x, y, z = axes
    amplitudes = rng.uniform(0.5, 1.0, n_waves)
    total = 0.0
    for amplitude in amplitudes:
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        k = 2 * np.pi / rng.uniform(*wavelength_mm)
        phase = rng.uniform(0, 2 * np.pi)
        total = total + amplitude * np.cos(k * (direction[0] * x + direction[1] * y + direction[2] * z) + phase)
    return total / amplitudes.sum()


def _ellipsoid(axes, centre, semi_axes, slack=0.0):
    """Inside an axis-aligned ellipsoid; ``slack`` (scalar or field) deforms its surface smoothly.

    A semi-axis of ``np.inf`` makes a cylinder along that axis.
    """
    q = sum(((a - c) / s) ** 2 for a, c, s in zip(axes, centre, semi_axes))
    return q <= 1.0 + slack


def _paint_anatomy(rng, axes, liver_z):
    """HU before blur and noise, the liver mask and ``(mask, HU)`` of bone, on the RAS grid.

    Bone (and the spinal canal) is painted over everything at the end and kept out of the labels.
    """
    x, y, z = axes
    full = np.broadcast_shapes(x.shape, y.shape, z.shape)
    a, b = rng.uniform(140.0, 160.0), rng.uniform(100.0, 125.0)  # body semi-axes (left-right, AP)
    fat, muscle = rng.uniform(12.0, 30.0), rng.uniform(8.0, 14.0)
    ac, bc = a - fat - muscle, b - fat - muscle  # abdominal cavity semi-axes
    wall = 0.06 * _smooth_field(rng, axes, (150.0, 400.0))
    body = _ellipsoid(axes, (0, 0, 0), (a, b, np.inf), wall)
    cavity = _ellipsoid(axes, (0, 0, 0), (ac, bc, np.inf), wall)

    hu = np.full(full, -1000.0)
    hu[body] = (rng.uniform(-110.0, -85.0) + 5.0 * _smooth_field(rng, axes, (40.0, 120.0)))[body]
    hu[_ellipsoid(axes, (0, 0, 0), (a - fat, b - fat, np.inf), wall) & body] = rng.uniform(40.0, 55.0)

    # Spine: vertebral body just inside the posterior cavity wall, posterior elements in the wall.
    r_v = rng.uniform(16.0, 21.0)
    y_v = -bc + r_v + 5.0
    for side in (-1, 1):  # paraspinal muscles
        paraspinal = _ellipsoid(axes, (side * (r_v + 14.0), y_v - r_v - 12.0, 0), (22.0, 20.0, np.inf))
        hu[paraspinal & body] = rng.uniform(40.0, 55.0)

    bowel = rng.uniform(5.0, 25.0) + 20.0 * _smooth_field(rng, axes, (30.0, 90.0))
    bowel = np.where(_smooth_field(rng, axes, (40.0, 100.0)) > 0.45, rng.uniform(-110.0, -85.0), bowel)
    gas = (_smooth_field(rng, axes, (30.0, 80.0)) > 0.6) & (y > 0)
    bowel = np.where(gas, rng.uniform(-1000.0, -900.0), bowel)
    hu[cavity] = bowel[cavity]

    organs = [
        (
            _ellipsoid(
                axes,
                (-rng.uniform(10.0, 20.0), y_v + r_v + rng.uniform(8.0, 14.0), 0),
                (rng.uniform(9.0, 13.0),) * 2 + (np.inf,),
            ),
            rng.uniform(35.0, 45.0),
        ),  # aorta
        (
            _ellipsoid(
                axes,
                (-rng.uniform(0.55, 0.68) * ac, -rng.uniform(0.15, 0.35) * bc, liver_z[0] + rng.uniform(0.0, 30.0)),
                (rng.uniform(0.15, 0.22) * ac, rng.uniform(0.25, 0.35) * bc, rng.uniform(40.0, 55.0)),
                0.2 * _smooth_field(rng, axes, (50.0, 150.0)),
            ),
            rng.uniform(42.0, 52.0),
        ),  # spleen
    ]
    for side in (1, -1):  # kidneys; the right one (+x) sits lower, under the liver
        centre = (
            side * rng.uniform(0.3, 0.4) * ac,
            y_v + rng.uniform(0.0, 10.0),
            liver_z[0] - rng.uniform(55.0, 85.0) - (10.0 if side > 0 else 0.0),
        )
        semi = (rng.uniform(22.0, 30.0), rng.uniform(20.0, 26.0), rng.uniform(45.0, 55.0))
        organs.append(
            (_ellipsoid(axes, centre, semi, 0.15 * _smooth_field(rng, axes, (40.0, 120.0))), rng.uniform(30.0, 40.0))
        )
    for mask, value in organs:
        hu[mask & cavity] = value

    # Liver: a large right lobe (+x) and a smaller left lobe reaching across the midline anteriorly.
    deform = 0.3 * _smooth_field(rng, axes, (60.0, 160.0))
    right_lobe = _ellipsoid(
        axes,
        (rng.uniform(0.4, 0.5) * ac, rng.uniform(-0.1, 0.1) * bc, liver_z[0]),
        (rng.uniform(0.55, 0.7) * ac, rng.uniform(0.75, 0.9) * bc, liver_z[1]),
        deform,
    )
    left_lobe = _ellipsoid(
        axes,
        (-rng.uniform(0.1, 0.25) * ac, rng.uniform(0.3, 0.45) * bc, liver_z[0] + rng.uniform(10.0, 30.0)),
        (rng.uniform(0.35, 0.45) * ac, rng.uniform(0.3, 0.4) * bc, rng.uniform(35.0, 50.0)),
        deform,
    )
    liver = (right_lobe | left_lobe) & cavity
    hu[liver] = (rng.uniform(52.0, 68.0) + 4.0 * _smooth_field(rng, axes, (30.0, 90.0)))[liver]

    bone = _paint_bone(rng, axes, body, (a - fat - muscle / 2, b - fat - muscle / 2), r_v, y_v, liver_z)
    return hu, liver & ~bone[0], bone


def _paint_bone(rng, axes, body, rib_semi_axes, r_v, y_v, liver_z):
    """Vertebrae with discs and canal, spinous processes and ribs (partial elliptic arcs)."""
    x, y, z = axes
    full = np.broadcast_shapes(x.shape, y.shape, z.shape)
    hu = np.zeros(full)
    vertebra = _ellipsoid(axes, (0, y_v, 0), (r_v, r_v * 0.85, np.inf))
    spinous = _ellipsoid(axes, (0, y_v - r_v - 20.0, 0), (5.0, 12.0, np.inf))
    canal = _ellipsoid(axes, (0, y_v - r_v - 7.0, 0), (7.0, 7.0, np.inf))
    level = rng.uniform(28.0, 34.0)  # vertebral level height
    disc = (np.mod(z - rng.uniform(0.0, level), level) < 7.0) & vertebra
    # Ribs: a band in the muscle wall, absent at the spine and the anterior costal cartilage gap,
    # present above the lower liver, repeating along z with a slope around the body (-> arcs).
    am, bm = rib_semi_axes
    radius = np.sqrt((x / am) ** 2 + (y / bm) ** 2)
    angle = np.arctan2(y / bm, x / am)
    band = np.abs(radius - 1.0) * 0.5 * (am + bm) < 5.0
    gaps = (np.abs(angle + np.pi / 2) < 0.35) | (np.abs(angle - np.pi / 2) < 0.6)
    period = rng.uniform(28.0, 34.0)
    phase = np.mod(z + 20.0 * np.sin(angle) + rng.uniform(0.0, period), period)
    ribs = band & ~gaps & (phase < 11.0) & (z > liver_z[0] - rng.uniform(20.0, 50.0))
    hu = np.where(vertebra | spinous, rng.uniform(550.0, 750.0), hu)
    hu = np.where(ribs, rng.uniform(500.0, 750.0), hu)
    hu = np.where(disc, rng.uniform(70.0, 100.0), hu)
    hu = np.where(canal, rng.uniform(5.0, 20.0), hu)
    return (vertebra | spinous | canal | ribs) & body, hu


def _add_tumours(rng, axes, voxel_mm, hu, label, count) -> int:
    """Paint up to ``count`` tumours inside the liver (``label == 1``) into ``hu`` and ``label``."""
    placed = 0
    for _ in range(count):
        liver = label == 1
        if not liver.any():
            break
        depth = ndimage.distance_transform_edt(liver, sampling=voxel_mm)
        radius = float(np.exp(rng.uniform(*np.log(TUMOUR_RADIUS_MM))))
        # The centre lies deep enough that most of the tumour is liver (shrunk in a small liver).
        candidates = np.flatnonzero(depth >= min(0.8 * radius, 0.8 * depth.max()))
        i, j, k = np.unravel_index(rng.choice(candidates), liver.shape)
        centre = (axes[0][i, 0, 0], axes[1][0, j, 0], axes[2][0, 0, k])
        semi = radius * rng.uniform(0.75, 1.25, 3)
        tumour = _ellipsoid(axes, centre, semi, 0.25 * _smooth_field(rng, axes, (20.0, 60.0))) & liver
        probabilities = [p for p, _, _ in TUMOUR_CONTRASTS]
        _, low, high = TUMOUR_CONTRASTS[rng.choice(len(TUMOUR_CONTRASTS), p=probabilities)]
        hu[tumour] += rng.uniform(low, high)
        label[tumour] = LABELS["tumour"]
        placed += int(tumour.any())
    return placed


def _acquire(rng, hu, noise_sigma_range, grid_is_2d) -> np.ndarray:
    """Partial-volume blur, correlated Gaussian noise and int16 storage, like a reconstructed CT."""
    blur = (0.5, 0.5, 0.0 if grid_is_2d else 0.7)  # voxels; the slice profile is the widest
    blurred = ndimage.gaussian_filter(hu, sigma=blur)
    noise = ndimage.gaussian_filter(rng.normal(size=hu.shape), sigma=(0.6, 0.6, 0.0))
    noise *= rng.uniform(*noise_sigma_range) / noise.std()
    return np.clip(np.rint(blurred + noise), -1024, 3071).astype(np.int16)


def _choose_orientation(rng, ndim, orientation) -> str:
    if ndim == 2:
        if orientation not in (None, "RAS"):
            raise DataError(f"2D phantoms are always RAS, got orientation {orientation!r}")
        return "RAS"
    if orientation is None:
        return str(AXIAL_CODES[rng.integers(len(AXIAL_CODES))])
    code = str(orientation).upper()
    axis_of = {letter: pair for pair in ("LR", "AP", "IS") for letter in pair}
    if len(code) != 3 or sorted(axis_of.get(letter, letter) for letter in code) != ["AP", "IS", "LR"]:
        raise DataError(
            f"orientation must be an axis code with one of L/R, A/P and S/I each, such as 'LPS', got {orientation!r}"
        )
    return code


def _check_replaceable(target: Path) -> None:
    """Allow writing ``target`` only if it is absent, empty, or a previous synthetic dataset."""
    if not target.exists() and not target.is_symlink():
        return
    if not target.is_dir() or target.is_symlink():
        raise DataError(f"{target}: exists and is not a folder; refusing to replace it")
    if not any(target.iterdir()):
        return
    try:
        meta = json.loads((target / "dataset.json").read_text())
        is_synthetic = meta.get("synthetic", {}).get("generator") == GENERATOR_ID
    except (OSError, ValueError, AttributeError):
        is_synthetic = False
    if not is_synthetic:
        raise DataError(
            f"{target}: folder is not empty and is not a synthetic dataset written by medseg-jax; "
            "refusing to overwrite it (choose another output folder or name)"
        )


def _swap_into_place(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``, moving an existing ``target`` aside first and deleting it last."""
    if not target.exists():
        os.replace(staging, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rmdir(old)  # only the unique name is wanted
    os.replace(target, old)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
