"""Pictures a person would rather see than read: overlays and training curves (matplotlib, Agg)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medseg_jax.atomic import atomic_path


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    return Path(path)


def plot_training_curve(
    history: list[dict],
    path,
    title: str = "training",
    validation: Sequence[dict] = (),
    validation_label: str = "validation Dice",
) -> Path:
    """Training loss against step, with validation pseudo-Dice / Dice on a second axis when given
    (``validation_label`` names what the Dice was measured on)."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], lw=1, label="train loss (Dice + CE)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    handles = ax.get_legend_handles_labels()[0]
    if validation:
        dice_ax = ax.twinx()
        steps = [v["step"] for v in validation]
        handles += dice_ax.plot(
            steps, [v["val_dice"] for v in validation], "o-", color="tab:green", ms=3, label=validation_label
        )
        if "pseudo_dice" in validation[0]:
            handles += dice_ax.plot(
                steps, [v["pseudo_dice"] for v in validation], "--", color="tab:olive", label="pseudo-Dice (EMA)"
            )
        dice_ax.set_ylim(0, 1)
        dice_ax.set_ylabel("Dice")
    ax.legend(handles=handles, loc="upper right", fontsize=8)
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


COLOURS = ["#ffd400", "#ff2d2d", "#2dd4ff", "#7cff2d", "#ff7cf5"]


def _display(plane: np.ndarray) -> np.ndarray:
    """A RAS-ordered 2D plane ``a[u, v]`` as a picture: rows = v (anterior / superior up), columns = u
    flipped. Axial (x, y) and coronal (x, z) put the patient's right on the picture's left, as
    radiologists read them; sagittal (y, z) puts anterior on the left."""
    return np.asarray(plane).T[::-1, ::-1]


def _take_plane(array, index: int, axis: int):
    """The slice ``index`` along ``axis`` of ``array`` (None stays None: an absent image or reference)."""
    return None if array is None else np.take(array, index, axis=axis)


def _draw_plane(plt, ax, image, reference, prediction, class_names, window, aspect=1.0) -> list:
    """CT plane in ``window`` (or a label map in gray when ``image`` is None) with per-class contours:
    reference solid, prediction dashed. Returns legend handles of the classes drawn."""
    background = image if image is not None else (reference if reference is not None else prediction)
    limits = window if image is not None else (0, max(1, int(np.max(background))))
    ax.imshow(_display(background), cmap="gray", vmin=limits[0], vmax=limits[1], interpolation="nearest", aspect=aspect)
    present = set(np.unique(prediction).tolist())
    if reference is not None:
        present |= set(np.unique(reference).tolist())
    handles = []
    for i, k in enumerate(sorted(present - {0})):
        colour = COLOURS[i % len(COLOURS)]
        for mask, style, width in ((reference, "solid", 1.5), (prediction, "dashed", 1.2)):
            if mask is not None and np.any(mask == k):
                ax.contour(_display(mask == k), levels=[0.5], colors=[colour], linewidths=width, linestyles=style)
        handles.append(plt.Line2D([], [], color=colour, label=(class_names or {}).get(int(k), f"class {k}")))
    ax.axis("off")
    return handles


def _legend(plt, ax, handles, with_reference: bool) -> None:
    handles = list(handles)
    if with_reference:
        handles += [plt.Line2D([], [], color="white", label="reference (solid)")]
    handles += [plt.Line2D([], [], color="white", ls="--", label="prediction (dashed)")]
    ax.legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.6)


def plot_overlay(
    image_slice: np.ndarray,
    reference_slice: np.ndarray,
    prediction_slice: np.ndarray,
    path,
    title: str = "",
    class_names: dict[int, str] | None = None,
    window=(-175.0, 250.0),
) -> Path:
    """One axial slice (RAS voxel order ``(x, y)``) in a CT window with reference (solid) and prediction
    (dashed) contours per class, drawn radiologically."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5, 5))
    handles = _draw_plane(plt, ax, image_slice, reference_slice, prediction_slice, class_names, window)
    _legend(plt, ax, handles, with_reference=True)
    ax.set_title(title, fontsize=9)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def largest_extent_index(mask: np.ndarray, axis: int) -> int:
    """The index along ``axis`` of the plane holding most of ``mask`` (the middle when it is empty)."""
    other = tuple(a for a in range(mask.ndim) if a != axis)
    counts = mask.sum(axis=other)
    return int(np.argmax(counts)) if counts.any() else mask.shape[axis] // 2


def plot_case_views(
    image,
    prediction,
    reference,
    spacing,
    path,
    title: str = "",
    class_names: dict[int, str] | None = None,
    window=(-175.0, 250.0),
) -> Path:
    """Axial, coronal and sagittal planes of a 3D case (arrays in RAS voxel order, ``spacing`` in mm per
    axis), one row per foreground class through that class's largest extent in each view, with the
    prediction (dashed) and, when given, the reference (solid) as contours over the image (or over the
    label map when ``image`` is None). A 2D case gives one panel."""
    plt = _figure()
    present = set(np.unique(prediction).tolist()) | (
        set(np.unique(reference).tolist()) if reference is not None else set()
    )
    classes = sorted(present - {0}) or [0]
    if prediction.ndim == 2:
        fig, axes = plt.subplots(1, 1, figsize=(5, 5), squeeze=False)
        handles = _draw_plane(plt, axes[0, 0], image, reference, prediction, class_names, window)
    else:
        views = (("axial", 2), ("coronal", 1), ("sagittal", 0))
        fig, axes = plt.subplots(len(classes), 3, figsize=(12, 4 * len(classes)), squeeze=False)
        handles = []
        for row, k in enumerate(classes):
            union = (prediction == k) | (reference == k if reference is not None else False)
            for col, (view, axis) in enumerate(views):
                index = largest_extent_index(union, axis)
                take = functools.partial(_take_plane, index=index, axis=axis)
                u, v = [a for a in range(3) if a != axis]
                drawn = _draw_plane(
                    plt,
                    axes[row, col],
                    take(image),
                    take(reference),
                    take(prediction),
                    class_names,
                    window,
                    aspect=spacing[v] / spacing[u],
                )
                handles = handles if len(handles) >= len(drawn) else drawn
                name = (class_names or {}).get(int(k), f"class {k}")
                axes[row, col].set_title(f"{view} {index} (largest {name})", fontsize=8)
    _legend(plt, axes[0, -1], handles, with_reference=reference is not None)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def report_case(prediction, path, image=None, reference=None, class_names=None, title: str = "") -> Path:
    """:func:`plot_case_views` for :class:`~medseg_jax.data.volume.Volume` s in any orientation (reoriented
    to RAS first; all must share the prediction's grid)."""
    from medseg_jax.data.volume import to_ras

    pred = to_ras(prediction)
    as_ras = lambda v: None if v is None else to_ras(v).array
    return plot_case_views(
        as_ras(image), pred.array, as_ras(reference), pred.spacing, path, title=title, class_names=class_names
    )
