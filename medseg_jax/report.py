"""Pictures a person would rather see than read: overlays and training curves (matplotlib, Agg)."""

from __future__ import annotations

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


def plot_training_curve(history: list[dict], path, title: str = "training", validation: list[dict] = ()) -> Path:
    """Training loss against step, with validation pseudo-Dice / Dice on a second axis when given."""
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
        handles += dice_ax.plot(steps, [v["val_dice"] for v in validation], "o-", color="tab:green", ms=3,
                                label="validation Dice (patches)")
        if "pseudo_dice" in validation[0]:
            handles += dice_ax.plot(steps, [v["pseudo_dice"] for v in validation], "--", color="tab:olive",
                                    label="pseudo-Dice (EMA)")
        dice_ax.set_ylim(0, 1)
        dice_ax.set_ylabel("Dice")
    ax.legend(handles=handles, loc="upper right", fontsize=8)
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_overlay(image_slice: np.ndarray, reference_slice: np.ndarray, prediction_slice: np.ndarray, path,
                 title: str = "", class_names: dict[int, str] | None = None, window=(-175.0, 250.0)) -> Path:
    """One 2D slice in a CT window with reference (solid) and prediction (dashed) contours per class.

    Slices are given in RAS voxel order ``(x, y)`` and drawn radiologically (patient right on the left
    of the picture, anterior up).
    """
    plt = _figure()
    colours = ["#ffd400", "#ff2d2d", "#2dd4ff", "#7cff2d", "#ff7cf5"]
    fig, ax = plt.subplots(figsize=(5, 5))
    # array[x, y] with +x = patient right, +y = anterior: rows = y flipped (anterior up), columns = x
    # flipped (patient right on the picture's left, as radiologists read axial CT)
    show = lambda a: np.asarray(a).T[::-1, ::-1]
    ax.imshow(show(image_slice), cmap="gray", vmin=window[0], vmax=window[1], interpolation="nearest")
    classes = sorted((set(np.unique(reference_slice).tolist()) | set(np.unique(prediction_slice).tolist())) - {0})
    handles = []
    for i, k in enumerate(classes):
        colour = colours[i % len(colours)]
        name = (class_names or {}).get(int(k), f"class {k}")
        if np.any(reference_slice == k):
            ax.contour(show(reference_slice == k), levels=[0.5], colors=[colour], linewidths=1.5)
        if np.any(prediction_slice == k):
            ax.contour(show(prediction_slice == k), levels=[0.5], colors=[colour], linewidths=1.2, linestyles="dashed")
        handles.append(plt.Line2D([], [], color=colour, label=name))
    handles += [plt.Line2D([], [], color="white", label="reference (solid)"),
                plt.Line2D([], [], color="white", ls="--", label="prediction (dashed)")]
    ax.legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.6)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
