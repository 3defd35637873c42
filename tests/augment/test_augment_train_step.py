import jax
import jax.numpy as jnp
import numpy as np

from medseg_jax.augment import AugmentConfig, loader_crop_size, train_step_augmentation
from medseg_jax.config import load_config
from medseg_jax.models.factory import build_unet
from medseg_jax.train import create_train_state, make_optimizer, make_train_step
from medseg_jax.train.step import jit_train_step


def test_train_step_augments_larger_crops_down_to_the_patch():
    c = load_config(
        None,
        [
            "model.spatial_dims=2",
            "model.n_stages=2",
            "model.features=[4, 8]",
            "model.num_classes=3",
            "model.deep_supervision=false",
            "train.optimizer=adamw",
        ],
    )
    patch = (16, 16)
    augment = AugmentConfig()
    crop = loader_crop_size(augment, patch)
    assert crop == (32, 32)  # 2D: rotation up to 180 degrees and scale up to 1.4
    model = build_unet(c.model)
    optimizer = make_optimizer(c.train)
    state = create_train_state(model, optimizer, jax.random.key(0), jnp.zeros((1, *patch, 1)))
    step = jit_train_step(
        make_train_step(
            model, optimizer, c.train.loss, augment_fn=train_step_augmentation(augment, patch, num_classes=3)
        )
    )
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.normal(size=(2, *crop, 1)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 3, (2, *crop)), jnp.int32),
    }
    state, metrics = step(state, batch)
    assert bool(metrics["finite"]) and int(state.step) == 1
    assert train_step_augmentation(AugmentConfig(mode="cpu"), patch) is None
    assert train_step_augmentation(AugmentConfig(mode="none"), patch) is None
