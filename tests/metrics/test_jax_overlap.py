"""JAX Dice / IoU inside jit equal the numpy metrics, conventions included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medseg_jax.metrics import dice_iou_per_class
from medseg_jax.metrics.jax_overlap import (
    dice_iou,
    dice_iou_from_counts,
    dice_iou_from_logits,
)

NUM_CLASSES = 4


@pytest.mark.parametrize("convention", ["nnunet", "monai"])
def test_jitted_dice_equals_numpy(convention):
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 3, size=(2, 16, 16, 8))  # class 3 never in the reference
    prediction = np.where(rng.random(reference.shape) < 0.2, rng.integers(0, 4, size=reference.shape), reference)
    prediction[prediction == 2] = 1  # class 2 never predicted
    fn = jax.jit(lambda p, r: dice_iou(p, r, NUM_CLASSES, empty=convention))
    got = jax.device_get(fn(jnp.asarray(prediction), jnp.asarray(reference)))
    want = dice_iou_per_class(prediction, reference, range(NUM_CLASSES), empty=convention)
    for k in range(NUM_CLASSES):
        for key in ("tp", "fp", "fn"):
            assert int(got[key][k]) == want[k][key]
        np.testing.assert_allclose([got["dice"][k], got["iou"][k]], [want[k]["dice"], want[k]["iou"]], rtol=1e-6)
    if convention == "monai":
        assert np.isnan(got["dice"][3])  # reference empty, prediction not
    else:
        assert got["dice"][3] == 0.0


def test_both_empty_is_nan_and_valid_mask_excludes_voxels():
    labels = jnp.zeros((8, 8), jnp.int32).at[0, 0].set(1)
    valid = jnp.ones((8, 8), bool).at[0, 0].set(False)
    out = jax.jit(lambda p, r, v: dice_iou(p, r, 3, valid=v))(labels, labels, valid)
    assert out["dice"][0] == 1.0 and np.isnan(out["dice"][1]) and np.isnan(out["iou"][2])
    dice, iou = dice_iou_from_counts(jnp.array([0, 3]), jnp.array([2, 1]), jnp.array([0, 0]))
    np.testing.assert_allclose(dice, [0.0, 6 / 7])
    np.testing.assert_allclose(iou, [0.0, 3 / 4])


def test_from_logits_uses_the_argmax():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(16, 16, 3)).astype(np.float32)
    reference = rng.integers(0, 3, size=(16, 16))
    got = jax.jit(dice_iou_from_logits)(jnp.asarray(logits), jnp.asarray(reference))
    want = dice_iou_per_class(np.argmax(logits, axis=-1), reference, range(3))
    np.testing.assert_allclose(got["dice"], [want[k]["dice"] for k in range(3)], rtol=1e-6)
