"""JAX Dice / IoU inside jit equal the numpy metrics, conventions included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medseg_jax.metrics import dice_iou_per_class
from medseg_jax.metrics.jax_overlap import dice_iou, dice_iou_from_logits, per_class_tp_fp_fn
from medseg_jax.metrics.overlap import dice_iou_from_counts

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
    counts = ([0, 3, 0], [2, 1, 0], [0, 0, 0])
    dice, iou = jax.jit(lambda *c: dice_iou_from_counts(*c, xp=jnp))(*(jnp.array(c) for c in counts))
    np.testing.assert_allclose(dice, [0.0, 6 / 7, np.nan])
    np.testing.assert_allclose(iou, [0.0, 3 / 4, np.nan])
    # the same function on numpy gives the same values, in float64
    numpy_dice, numpy_iou = dice_iou_from_counts(*(np.array(c) for c in counts))
    assert numpy_dice.dtype == np.float64 and dice.dtype == jnp.float32
    np.testing.assert_allclose(numpy_dice, dice, rtol=1e-6)
    np.testing.assert_allclose(numpy_iou, iou, rtol=1e-6)


def test_per_class_counts_skip_invalid_voxels():
    prediction = jnp.array([[0, 1], [1, 2]])
    reference = jnp.array([[0, 1], [2, 2]])
    valid = jnp.array([[True, True], [False, True]])
    tp, fp, fn = jax.jit(lambda p, r, v: per_class_tp_fp_fn(p, r, 3, v))(prediction, reference, valid)
    assert tp.tolist() == [1, 1, 1] and fp.tolist() == [0, 0, 0] and fn.tolist() == [0, 0, 0]
    tp, fp, fn = per_class_tp_fp_fn(prediction, reference, 3)
    assert tp.tolist() == [1, 1, 1] and fp.tolist() == [0, 1, 0] and fn.tolist() == [0, 0, 1]


def test_from_logits_uses_the_argmax():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(16, 16, 3)).astype(np.float32)
    reference = rng.integers(0, 3, size=(16, 16))
    got = jax.jit(dice_iou_from_logits)(jnp.asarray(logits), jnp.asarray(reference))
    want = dice_iou_per_class(np.argmax(logits, axis=-1), reference, range(3))
    np.testing.assert_allclose(got["dice"], [want[k]["dice"] for k in range(3)], rtol=1e-6)
