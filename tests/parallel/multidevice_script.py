"""Run with 8 fake CPU devices (the test sets XLA_FLAGS before this imports JAX); prints one JSON line.

1. One train step on meshes (8,1), (4,2), (2,4), (1,8) against a single device: loss and params.
2. FSDP-sharded parameters give the same step.
3. A checkpoint saved from the (4,2) mesh restores onto 1 device and onto a (2,4) mesh.
"""

import json
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from medseg_jax import checkpoint, parallel
from medseg_jax.config import load_config
from medseg_jax.models.factory import build_unet
from medseg_jax.train import create_train_state, make_optimizer, make_train_step
from medseg_jax.train.step import jit_train_step

assert jax.device_count() == 8, jax.devices()
config = load_config(
    None,
    [
        "model.spatial_dims=2",
        "model.num_classes=3",
        "model.n_stages=3",
        "model.features=[4, 8, 16]",
        "train.steps=10",
        "model.deep_supervision=true",
    ],
)
model = build_unet(config.model)
optimizer = make_optimizer(config.train)
rng = np.random.default_rng(0)
batch = {
    "image": rng.normal(size=(8, 32, 32, 1)).astype(np.float32),
    "label": rng.integers(0, 3, size=(8, 32, 32)).astype(np.int32),
}
init = lambda key: create_train_state(model, optimizer, key, jnp.zeros((1, 32, 32, 1)))
step = make_train_step(model, optimizer, config.train.loss)


def run(data, spatial, fsdp_min_size=None):
    mesh = parallel.make_mesh(config.mesh.__class__(data=data, spatial=spatial, fsdp_min_size=fsdp_min_size))
    abstract = jax.eval_shape(init, jax.random.key(0))
    shardings = parallel.state_shardings(mesh, abstract, fsdp_min_size)
    batch_shardings = parallel.batch_shardings(mesh, 2)
    state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
    fn = jit_train_step(step, shardings, batch_shardings)
    new_state, metrics = fn(state, parallel.global_batch(batch, batch_shardings))
    return mesh, shardings, new_state, float(metrics["loss"])


single_state, single_metrics = jax.jit(step)(jax.jit(init)(jax.random.key(0)), batch)
reference = jax.tree_util.tree_leaves(jax.device_get(single_state.params))
results = {"single_loss": float(single_metrics["loss"]), "meshes": {}}


def max_param_diff(state):
    leaves = jax.tree_util.tree_leaves(jax.device_get(state.params))
    return max(float(np.max(np.abs(a - b))) for a, b in zip(leaves, reference))


for data, spatial in [(8, 1), (4, 2), (2, 4), (1, 8)]:
    mesh, shardings, state, loss = run(data, spatial)
    results["meshes"][f"{data}x{spatial}"] = {"loss": loss, "max_param_diff": max_param_diff(state)}
    if (data, spatial) == (4, 2):
        saved_state, saved_shardings = state, shardings

_, fsdp_shardings, fsdp_state, fsdp_loss = run(8, 1, fsdp_min_size=64)
sharded_leaves = sum(1 for s in jax.tree_util.tree_leaves(fsdp_shardings) if s.spec != jax.sharding.PartitionSpec())
results["fsdp"] = {"loss": fsdp_loss, "max_param_diff": max_param_diff(fsdp_state), "sharded_leaves": sharded_leaves}

directory = tempfile.mkdtemp()
manager = checkpoint.make_manager(directory, async_save=False)
checkpoint.save(manager, 1, saved_state, {"position": 1}, {"note": "from 4x2"})
manager.wait_until_finished()
abstract = jax.eval_shape(init, jax.random.key(0))
saved_leaves = jax.tree_util.tree_leaves(jax.device_get(saved_state))
restores = {}
one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
for name, target in [
    ("1 device", jax.tree_util.tree_map(lambda _: one_device, abstract)),
    ("2x4", parallel.state_shardings(parallel.make_mesh(config.mesh.__class__(data=2, spatial=4)), abstract)),
]:
    restored, data_state, meta = checkpoint.restore_step(
        manager, 1, checkpoint.abstract_with_shardings(abstract, target)
    )
    leaves = jax.tree_util.tree_leaves(restored)
    restores[name] = {
        "equal": all(np.array_equal(np.asarray(a), b) for a, b in zip(jax.device_get(leaves), saved_leaves)),
        "on_target": all(leaf.sharding == s for leaf, s in zip(leaves, jax.tree_util.tree_leaves(target))),
        "data_state": data_state,
    }
results["restore"] = restores
print(json.dumps(results))
sys.stdout.flush()
