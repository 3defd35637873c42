"""Peak host memory (RSS) of one prediction on a synthetic CT with many classes and a tiny network.

What it measures is the scan-scale part of ``Predictor.predict_volume``: preprocessing, the sliding window
and mapping the class scores back onto the file's grid. The network is an untrained 2-stage U-Net
(features 4, 8) so that the network's own cost stays small; the plan's spacing is twice the scan's, so the
prediction is resampled back to a grid 8x larger, as for a low-resolution plan on a fine CT.

    python benchmarks/bench_predict_memory.py --slices 400 --classes 20 --accumulate host

Prints one JSON line: shape, classes, mode, seconds, peak RSS (``ru_maxrss``) and the RSS before predicting.
Run each configuration in its own process (peak RSS never goes down within one).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from medseg_jax.config import InferenceConfig
from medseg_jax.data.plan import make_plan
from medseg_jax.data.volume import Volume
from medseg_jax.inference.predict import Predictor
from medseg_jax.models.unet import UNet


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def synthetic_ct(shape, spacing, seed=0) -> Volume:
    """Air (-1000 HU) around a soft-tissue ellipsoid (40 HU) with a brighter core (300 HU), plus noise.

    Built one slice at a time in float32, so that making the scan does not raise the peak RSS above the
    scan itself (ru_maxrss is a high-water mark: the prediction's peak must be the one measured).
    """
    rng = np.random.default_rng(seed)
    x, y = (((np.arange(n, dtype=np.float32) - n / 2) / (n / 2.5)) ** 2 for n in shape[:2])
    in_plane = x[:, None] + y[None, :]
    image = np.empty(shape, np.float32)
    for z in range(shape[2]):
        r2 = in_plane + ((z - shape[2] / 2) / (shape[2] / 2.5)) ** 2
        image[..., z] = np.where(r2 < 0.2, 300.0, np.where(r2 < 1.0, 40.0, -1000.0))
        image[..., z] += rng.standard_normal(shape[:2], dtype=np.float32) * 10.0
    return Volume(image, np.diag([*spacing, 1.0]))


def make_setup(classes: int, spacing, patch):
    labels = {"background": 0, **{f"class_{k}": k for k in range(1, classes)}}
    fingerprint = {
        "channel_names": ["CT"],
        "labels": labels,
        "spacings": [[2 * s for s in spacing]] * 2,
        "shapes_after_crop": [[256, 256, 200]] * 2,
        "foreground_intensity_properties_per_channel": {
            "0": {"mean": 40.0, "std": 100.0, "percentile_00_5": -1000.0, "percentile_99_5": 1000.0}
        },
    }
    plan = make_plan(fingerprint, dim=3)
    plan.update(
        patch_size=list(patch),
        n_stages=2,
        strides=[[1, 1, 1], [2, 2, 2]],
        kernel_sizes=[[3, 3, 3]] * 2,
        features_per_stage=[4, 8],
    )
    model = UNet(num_classes=classes, spatial_dims=3, n_stages=2, features=(4, 8), deep_supervision=False)
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, *patch, 1), jnp.float32))
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.3, s.shape), s.dtype), shapes)
    return model, params, plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=400)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--accumulate", choices=("device", "host"), default="host")
    args = parser.parse_args()
    spacing = (0.8, 0.8, 1.0)
    patch = (96, 96, 48)
    model, params, plan = make_setup(args.classes, spacing, patch)
    scan = synthetic_ct((args.size, args.size, args.slices), spacing)
    predictor = Predictor(
        model, params, plan, InferenceConfig(step_size=1.0, batch_size=2, mirror_axes=()), accumulate=args.accumulate
    )
    before = _rss_mib()
    started = time.perf_counter()
    prediction = predictor.predict_volume([scan])
    seconds = time.perf_counter() - started
    print(
        json.dumps(
            {
                "shape": list(scan.shape),
                "preprocessed_shape": prediction.summary["preprocessed_shape"],
                "classes": args.classes,
                "accumulate": args.accumulate,
                "seconds": round(seconds, 1),
                "rss_before_predict_mib": round(before),
                "peak_rss_mib": round(_rss_mib()),
                "labels_present": int(np.unique(prediction.label.array).size),
            }
        )
    )


if __name__ == "__main__":
    main()
