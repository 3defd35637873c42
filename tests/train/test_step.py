import jax
import jax.numpy as jnp
import numpy as np

from medseg_jax.config import load_config
from medseg_jax.models.factory import build_unet
from medseg_jax.train import create_train_state, make_eval_step, make_lr_schedule, make_optimizer, make_train_step
from medseg_jax.train.step import jit_train_step

TINY_2D = [
    "model.spatial_dims=2",
    "model.num_classes=3",
    "model.n_stages=3",
    "model.features=[8, 16, 32]",
    "model.in_channels=1",
]


def synthetic_batch(seed=0, size=32, batch=2):
    """Bright discs (class 1) with a brighter core (class 2) on noise: learnable from intensity + shape."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, labels = [], []
    for _ in range(batch):
        cy, cx = rng.integers(10, size - 10, 2)
        r = np.hypot(yy - cy, xx - cx)
        label = (r < 8).astype(np.int32) + (r < 3)
        images.append(label * 1.0 + rng.normal(0, 0.3, (size, size)))
        labels.append(label)
    return {"image": jnp.asarray(np.stack(images)[..., None], jnp.float32), "label": jnp.asarray(np.stack(labels))}


def setup(overrides=()):
    c = load_config(None, [*TINY_2D, *overrides])
    model = build_unet(c.model)
    optimizer = make_optimizer(c.train)
    state = create_train_state(
        model, optimizer, jax.random.key(c.train.seed), jnp.zeros((1, 32, 32, 1)), use_ema=c.train.ema_decay is not None
    )
    step = make_train_step(
        model, optimizer, c.train.loss, lr_schedule=make_lr_schedule(c.train), ema_decay=c.train.ema_decay
    )
    return c, model, state, step


def test_tiny_model_overfits_one_batch():
    # Dice+CE starts near 1 (Dice term) + log(3) ~ 2.1; a net that memorises the batch drives both
    # terms towards 0. Below 0.2 the soft Dice of both classes averages above 0.9 (CE >= 0), and the
    # hard Dice checked below confirms the segmentation itself is right.
    c, model, state, step = setup(
        [
            "train.optimizer=adamw",
            "train.learning_rate=1e-2",
            "train.steps=100",
            "train.weight_decay=0",
            "model.deep_supervision=false",
        ]
    )
    step = jit_train_step(step)
    batch = synthetic_batch()
    first = None
    for _ in range(100):
        state, metrics = step(state, batch)
        first = float(metrics["loss"]) if first is None else first
    assert first > 1.5
    assert float(metrics["loss"]) < 0.2, float(metrics["loss"])
    evaluation = jax.jit(make_eval_step(model, c.train.loss))(state.params, batch)
    dice = 2 * evaluation["tp"] / (2 * evaluation["tp"] + evaluation["fp"] + evaluation["fn"])
    assert float(dice[1]) > 0.9 and float(dice[2]) > 0.9, dice


def test_step_does_not_retrace_and_advances():
    traces = []
    c, model, state, step = setup(["train.steps=10"])

    def counting_step(state, batch):
        traces.append(1)  # runs only while tracing
        return step(state, batch)

    jitted = jit_train_step(counting_step)
    for seed in range(4):
        state, metrics = jitted(state, synthetic_batch(seed))
    assert len(traces) == 1
    assert int(state.step) == 4
    assert float(metrics["learning_rate"]) < c.train.learning_rate  # poly decay has moved


def test_non_finite_loss_skips_update_and_reports():
    c, model, state, step = setup(["train.ema_decay=0.9"])
    batch = synthetic_batch()
    bad = {"image": batch["image"].at[0, 0, 0, 0].set(jnp.nan), "label": batch["label"]}
    before = jax.tree_util.tree_map(np.asarray, state.params)
    new_state, metrics = jax.jit(step)(state, bad)
    assert not bool(metrics["finite"])
    assert int(new_state.step) == 1
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(new_state.params)):
        np.testing.assert_array_equal(a, np.asarray(b))
    good_state, good_metrics = jax.jit(step)(new_state, batch)
    assert bool(good_metrics["finite"])
    changed = [
        not np.array_equal(a, np.asarray(b))
        for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(good_state.params))
    ]
    assert any(changed)
    # EMA moved towards the new params but not all the way
    ema_leaf = np.asarray(jax.tree_util.tree_leaves(good_state.ema_params)[0])
    new_leaf = np.asarray(jax.tree_util.tree_leaves(good_state.params)[0])
    old_leaf = jax.tree_util.tree_leaves(before)[0]
    np.testing.assert_allclose(ema_leaf, 0.9 * old_leaf + 0.1 * new_leaf, rtol=1e-5, atol=1e-6)


def test_gradients_are_finite_with_deep_supervision_3d():
    c = load_config(
        None, ["model.spatial_dims=3", "model.num_classes=3", "model.n_stages=3", "model.features=[4, 8, 8]"]
    )
    model = build_unet(c.model)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 16, 16, 16, 1)), jnp.float32)
    y = jnp.asarray(np.random.default_rng(1).integers(0, 3, size=(1, 16, 16, 16)))
    optimizer = make_optimizer(c.train)
    state = create_train_state(model, optimizer, jax.random.key(0), x)
    new_state, metrics = jax.jit(make_train_step(model, optimizer, c.train.loss))(state, {"image": x, "label": y})
    assert bool(metrics["finite"]) and float(metrics["grad_norm"]) > 0


def test_nnunet_schedule_and_clipping():
    c = load_config(None, ["train.steps=100"])
    schedule = make_lr_schedule(c.train)
    np.testing.assert_allclose(float(schedule(0)), 1e-2, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(50)), 1e-2 * 0.5**0.9, rtol=1e-5)
    assert float(schedule(100)) == 0.0
    # a huge gradient is clipped to norm 12 before momentum: the first SGD update has norm lr * 12 * (1 + m)
    optimizer = make_optimizer(load_config(None, ["train.weight_decay=0", "train.steps=100"]).train)
    params = {"w": jnp.zeros(4)}
    updates, _ = optimizer.update({"w": jnp.full(4, 1e6)}, optimizer.init(params), params)
    np.testing.assert_allclose(float(jnp.linalg.norm(updates["w"])), 1e-2 * 12 * 1.99, rtol=1e-4)


def test_adamw_warmup_cosine():
    c = load_config(
        None, ["train.optimizer=adamw", "train.learning_rate=1e-3", "train.warmup_steps=10", "train.steps=110"]
    ).train
    schedule = make_lr_schedule(c)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(10)), 1e-3, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(60)), 0.5e-3, rtol=1e-3)
