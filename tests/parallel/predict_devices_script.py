"""Run with 8 fake CPU devices (the test sets XLA_FLAGS before this imports JAX); prints one JSON line.

Predicts one synthetic scan with a tiny U-Net on all 8 devices, on 2 of them and on 1 (device and host
accumulation), the window batch the same size everywhere so that only the split over devices differs.
"""

import json
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for the tests' helpers

from medseg_jax.config import InferenceConfig  # noqa: E402
from medseg_jax.data.volume import Volume  # noqa: E402
from medseg_jax.errors import ConfigError  # noqa: E402
from medseg_jax.inference.predict import Predictor, prediction_mesh  # noqa: E402
from medseg_jax.models.unet import UNet  # noqa: E402
from tests.inference.test_predict import tiny_plan, untrained_params  # noqa: E402

assert jax.local_device_count() == 8, jax.devices()
rng = np.random.default_rng(0)
scan = Volume(rng.normal(100.0, 40.0, (36, 30, 14)).astype(np.float32), np.diag([1.5, 1.5, 2.5, 1.0]))
plan = tiny_plan()
model = UNet(num_classes=3, spatial_dims=3, n_stages=2, features=(4, 8), deep_supervision=True)
params = untrained_params(model, (1, 16, 16, 8, 1), seed=6)
config = InferenceConfig(batch_size=8, mirror_axes=(0,))

results = {"mesh_sizes": {}, "labels": {}}
for accumulate in ("device", "host"):
    for devices in (1, 2, None):
        mesh = prediction_mesh(devices)
        results["mesh_sizes"][str(devices)] = None if mesh is None else int(mesh.shape["data"])
        predictor = Predictor(model, params, plan, config, accumulate=accumulate, mesh=mesh)
        label = predictor.predict_volume([scan]).label.array
        results["labels"][f"{accumulate} {devices}"] = label.ravel().tolist()
errors = []
for bad in (0, 9, 2.5):
    try:
        prediction_mesh(bad)
    except ConfigError as exc:
        errors.append(str(exc))
results["errors"] = errors
print(json.dumps(results))
