"""``medseg-jax demo``: the whole library on synthetic CT, end to end, in minutes on a CPU.

Stages: synthesise an nnU-Net-layout liver/tumour dataset -> fingerprint and plan -> preprocess into
a zarr store -> train a U-Net on fold 0's training cases with the patch loader -> predict the held-out
cases on the preprocessed grid and map them back to the files' geometry -> Dice / IoU against the
reference labels -> report (overlay PNGs, training curve, metrics.csv, summary.json, README.md).
"""

from __future__ import annotations

import csv
import dataclasses
import time
from pathlib import Path

import numpy as np

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    cases: int = 10
    steps: int = 300
    dim: int = 2
    shape: tuple[int, ...] = (64, 64, 32)


def pad_to_multiple(array: np.ndarray, multiples, axes) -> tuple[np.ndarray, tuple]:
    """Zero-pad ``array`` at the end of ``axes`` to multiples; returns the array and the crop back."""
    pad = [(0, 0)] * array.ndim
    crop = [slice(None)] * array.ndim
    for axis, m in zip(axes, multiples):
        size = array.shape[axis]
        pad[axis] = (0, (-size) % m)
        crop[axis] = slice(0, size)
    return np.pad(array, pad), tuple(crop)


def predict_preprocessed(model, params, image: np.ndarray, dim: int, batch_size: int = 8) -> np.ndarray:
    """Whole-volume (3D) or slice-by-slice along the last axis (2D) prediction of a preprocessed image
    ``(C, *spatial)``; returns the label map ``(*spatial)``."""
    import jax
    import jax.numpy as jnp

    apply = jax.jit(model.apply)
    channels_last = np.moveaxis(image, 0, -1)  # (*spatial, C)
    total = model.total_stride()
    if dim == 3:
        padded, crop = pad_to_multiple(channels_last, total, axes=(0, 1, 2))
        logits = np.asarray(apply(params, jnp.asarray(padded[None])))[0]
        return np.argmax(logits, axis=-1)[crop[:3]].astype(np.uint8)
    slices = np.moveaxis(channels_last, 2, 0)  # (Z, X, Y, C)
    padded, crop = pad_to_multiple(slices, total, axes=(1, 2))
    out = []
    for start in range(0, padded.shape[0], batch_size):
        chunk = padded[start:start + batch_size]
        n = chunk.shape[0]
        if n < batch_size:  # keep one compiled shape
            chunk = np.concatenate([chunk, np.zeros((batch_size - n, *chunk.shape[1:]), chunk.dtype)])
        out.append(np.argmax(np.asarray(apply(params, jnp.asarray(chunk))), axis=-1)[:n])
    labels = np.concatenate(out)[(slice(None), crop[1], crop[2])]
    return np.moveaxis(labels, 0, 2).astype(np.uint8)


def run_demo(out_dir, cases=None, steps=None, dim=None, seed=0, config_path=None, overrides=(), progress=True,
             log=lambda message: None) -> dict:
    """Run every stage into ``out_dir`` and return the summary (also written to ``report/summary.json``)."""
    import jax

    from medseg_jax.atomic import write_json_atomic
    from medseg_jax.config import load_config
    from medseg_jax.data.dataset import load_dataset, validate_dataset
    from medseg_jax.data.fingerprint import compute_fingerprint, save_json
    from medseg_jax.data.io import read_nifti, to_ras
    from medseg_jax.data.plan import make_plan
    from medseg_jax.data.preprocess import preprocess_dataset, restore_geometry
    from medseg_jax.data.store import CaseStore
    from medseg_jax.data.synthetic import write_synthetic_dataset
    from medseg_jax.metrics import dice_iou_per_class
    from medseg_jax.report import plot_overlay, plot_training_curve
    from medseg_jax.train.loop import read_metrics, train

    settings = DemoSettings()
    settings = dataclasses.replace(settings, **{k: v for k, v in dict(cases=cases, steps=steps, dim=dim).items()
                                                if v is not None})
    config = load_config(config_path or DEFAULT_CONFIG,
                         [f"train.steps={settings.steps}", f"train.seed={seed}", f"data.seed={seed}", *overrides])
    out = Path(out_dir)
    report_dir = out / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    timings = {}
    started = time.perf_counter()

    def stage(name, t0):
        timings[name] = round(time.perf_counter() - t0, 2)
        log(f"[{name}] done in {timings[name]:.1f} s")

    t0 = time.perf_counter()
    dataset_dir = write_synthetic_dataset(out / "raw", settings.cases, seed=seed, shape=settings.shape)
    dataset = load_dataset(dataset_dir)
    validate_dataset(dataset)
    stage("synthesise", t0)

    t0 = time.perf_counter()
    fingerprint = compute_fingerprint(dataset)
    plan = make_plan(fingerprint, dim=settings.dim, voxel_budget=config.data.batch_size * np.prod(
        config.data.patch_size), hu_window=(-175.0, 250.0))
    save_json(plan, out / "plan.json")
    stage("plan", t0)

    t0 = time.perf_counter()
    store = CaseStore(out / "store", chunk_shape=(64, 64, 1) if settings.dim == 2 else None)
    preprocess_dataset(dataset, plan, store, progress=progress)
    stage("preprocess", t0)

    t0 = time.perf_counter()
    save_json(plan, out / "store" / "plan.json")
    result = train(config, out / "store", out / "run", fold=0, progress=progress, log=log)
    model, state, split = result["model"], result["state"], result["split"]
    history = read_metrics(out / "run" / "metrics.jsonl")
    history = [h for h in history if "loss" in h]
    log(f"[train] {result['step']} steps, final loss {result['final_loss']:.3f}, pseudo-Dice {result['pseudo_dice']}")
    stage("train", t0)

    t0 = time.perf_counter()
    inference_model = model.clone(deep_supervision=False)
    labels = {int(v): k for k, v in plan["labels"].items()}
    rows, per_case = [], {}
    for case_id in split["val"]:
        image, _ = store.read_case(case_id)
        properties = store.read_properties(case_id)
        prediction = predict_preprocessed(inference_model, state.params, image, settings.dim)
        predicted = restore_geometry(prediction, properties, kind="label")
        case = next(c for c in dataset.cases if c.case_id == case_id)
        reference = read_nifti(case.label_path)
        scores = dice_iou_per_class(predicted.array, reference.array, [k for k in labels if k != 0])
        per_case[case_id] = scores
        for k, s in scores.items():
            rows.append({"case": case_id, "class": labels[k], **{m: s[m] for m in ("dice", "iou", "tp", "fp", "fn")}})
        ct = to_ras(read_nifti(case.image_paths[0]))
        ref_ras, pred_ras = to_ras(reference).array, to_ras(predicted).array
        z = int(np.argmax((ref_ras == 2).sum(axis=(0, 1)))) if (ref_ras == 2).any() else ref_ras.shape[2] // 2
        s = scores.get(2, {}).get("dice", float("nan"))
        plot_overlay(ct.array[..., z], ref_ras[..., z], pred_ras[..., z], report_dir / f"overlay_{case_id}.png",
                     title=f"{case_id} slice {z}: liver Dice {scores[1]['dice']:.3f}, tumour Dice {s:.3f}",
                     class_names=labels)
    stage("predict+evaluate", t0)

    plot_training_curve(history, report_dir / "training_curve.png")
    with open(report_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["case", "class", "dice", "iou", "tp", "fp", "fn"])
        writer.writeheader()
        writer.writerows(rows)
    mean = {labels[k]: float(np.nanmean([per_case[c][k]["dice"] for c in per_case])) for k in labels if k != 0}
    summary = {
        "metrics": {"mean_dice": mean, "validation_cases": split["val"]},
        "settings": dataclasses.asdict(settings) | {"seed": seed},
        "final_loss": result["final_loss"],
        "seconds": timings | {"total": round(time.perf_counter() - started, 2)},
        "devices": [str(d) for d in jax.devices()],
        "report_dir": str(report_dir),
    }
    write_json_atomic(report_dir / "summary.json", summary)
    return summary
