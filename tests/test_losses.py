import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medseg_jax.losses import (
    cross_entropy_loss,
    deep_supervision_loss,
    deep_supervision_weights,
    dice_ce_loss,
    downsample_labels,
    soft_dice_loss,
)

# Large logits make the softmax one-hot, so hand counts give the exact soft Dice.
BIG = 50.0


def onehot_logits(pred_labels, num_classes):
    return BIG * jax.nn.one_hot(jnp.asarray(pred_labels), num_classes)


def test_soft_dice_hand_computed_without_background():
    label = np.array([[0, 1, 1, 2], [0, 0, 2, 2]])[None]  # (1, 2, 4)
    pred = np.array([[0, 1, 0, 2], [0, 1, 2, 0]])[None]
    # class 1: tp 1, |p| 2, |y| 2 -> 2/4; class 2: tp 2, |p| 2, |y| 3 -> 4/5
    expected = 1 - (0.5 + 0.8) / 2
    loss = soft_dice_loss(onehot_logits(pred, 3), jnp.asarray(label), smooth=0.0)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_soft_dice_with_background_and_smooth():
    label = np.array([[0, 1, 1, 0]])
    pred = np.array([[0, 1, 0, 0]])
    smooth = 1.0
    dice_bg = (2 * 2 + smooth) / (3 + 2 + smooth)
    dice_fg = (2 * 1 + smooth) / (1 + 2 + smooth)
    loss = soft_dice_loss(onehot_logits(pred, 2), jnp.asarray(label), smooth=smooth, include_background=True)
    np.testing.assert_allclose(float(loss), 1 - (dice_bg + dice_fg) / 2, rtol=1e-5)


def test_batch_dice_pools_samples_before_the_ratio():
    label = jnp.asarray([[1, 1, 0, 0], [1, 0, 0, 0]])
    pred = jnp.asarray([[1, 1, 0, 0], [0, 0, 0, 0]])
    per_sample = 1 - (1.0 + 0.0) / 2  # sample 1 perfect, sample 2 dice 0
    pooled = 1 - (2 * 2) / (2 + 3)
    logits = onehot_logits(pred, 2)
    np.testing.assert_allclose(float(soft_dice_loss(logits, label, smooth=0.0)), per_sample, rtol=1e-5)
    np.testing.assert_allclose(float(soft_dice_loss(logits, label, smooth=0.0, batch_dice=True)), pooled, rtol=1e-5)


def test_cross_entropy_matches_numpy_and_ignores_label():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
    labels = rng.integers(0, 4, size=(2, 3, 3))
    labels[0, 0, 0] = 255
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    keep = labels != 255
    expected = -np.mean(np.take_along_axis(log_p, np.where(keep, labels, 0)[..., None], -1)[..., 0][keep])
    got = cross_entropy_loss(jnp.asarray(logits), jnp.asarray(labels), ignore_index=255)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_ignored_voxels_do_not_change_dice():
    label = jnp.asarray([[1, 1, 0, 255]])
    good = onehot_logits([[1, 1, 0, 0]], 2)
    bad_on_ignored = onehot_logits([[1, 1, 0, 1]], 2)
    a = soft_dice_loss(good, label, ignore_index=255, smooth=0.0)
    b = soft_dice_loss(bad_on_ignored, label, ignore_index=255, smooth=0.0)
    np.testing.assert_allclose(float(a), 0.0, atol=1e-6)
    np.testing.assert_allclose(float(b), 0.0, atol=1e-6)


def test_dice_ce_is_weighted_sum():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(1, 4, 4, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 3, size=(1, 4, 4)))
    combo = dice_ce_loss(logits, labels, dice_weight=0.3, ce_weight=2.0)
    expected = 0.3 * soft_dice_loss(logits, labels) + 2.0 * cross_entropy_loss(logits, labels)
    np.testing.assert_allclose(float(combo), float(expected), rtol=1e-6)


@pytest.mark.parametrize("n, expected", [(1, (1.0,)), (2, (1.0, 0.0)), (4, (4 / 7, 2 / 7, 1 / 7, 0.0))])
def test_deep_supervision_weights(n, expected):
    np.testing.assert_allclose(deep_supervision_weights(n), expected)


def test_deep_supervision_loss_downsamples_labels_and_weights_outputs():
    rng = np.random.default_rng(2)
    labels = jnp.asarray(rng.integers(0, 2, size=(1, 8, 8)))
    outputs = [jnp.asarray(rng.normal(size=(1, s, s, 2)), jnp.float32) for s in (8, 4, 2)]
    expected = (2 / 3) * dice_ce_loss(outputs[0], labels) + (1 / 3) * dice_ce_loss(outputs[1], labels[:, ::2, ::2])
    np.testing.assert_allclose(float(deep_supervision_loss(outputs, labels)), float(expected), rtol=1e-6)


def test_downsample_labels_rejects_uneven_sizes():
    with pytest.raises(ValueError, match="not a multiple"):
        downsample_labels(jnp.zeros((1, 6, 6), jnp.int32), (4, 4))


def test_losses_have_finite_gradients():
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(2, 4, 4, 4, 3)) * 30, jnp.float32)  # saturated softmax
    labels = jnp.asarray(rng.integers(0, 3, size=(2, 4, 4, 4)))
    grads = jax.grad(lambda z: dice_ce_loss(z, labels, batch_dice=True))(logits)
    assert bool(jnp.all(jnp.isfinite(grads)))
    assert float(jnp.abs(grads).max()) > 0
