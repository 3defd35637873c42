"""Labels on the file's grid one class at a time: same labels as the whole-volume path, memory not K x N."""

import tracemalloc

import jax
import numpy as np
import pytest

from medseg_jax.config import InferenceConfig
from medseg_jax.data.preprocess import preprocess_case, restore_geometry
from medseg_jax.data.volume import Volume
from medseg_jax.inference.predict import Predictor
from medseg_jax.inference.restore import SLAB_BYTES, argmax_on_file_grid, class_probabilities, slab_rows
from medseg_jax.models.unet import UNet
from tests.inference.test_predict import tiny_plan, untrained_params


def test_slab_rows_keep_one_slab_within_the_budget_whatever_the_scan():
    # 20 classes on a 512x512x400 grid: the logits are 8.4 GB; one slab stays within the budget.
    rows = slab_rows((512, 512, 400), 20)
    assert 1 <= rows < 512
    assert rows * 512 * 400 * 20 * 4 <= SLAB_BYTES
    # doubling the classes halves the rows: the slab's bytes do not grow with K x N
    assert slab_rows((512, 512, 400), 40) == rows // 2
    assert slab_rows((4, 3, 2), 3) == 4  # small arrays: the whole axis, one slab
    assert slab_rows((10, 10_000, 10_000), 5, slab_bytes=1024) == 1  # a row above the budget is still one slab


def _reference_labels(logits_k_first, properties):
    """The whole-volume path: softmax of all classes, every class resampled, arg-max over the stack."""
    probabilities = np.asarray(jax.nn.softmax(logits_k_first, axis=0), dtype=np.float32)
    restored = restore_geometry(probabilities, properties, kind="probabilities")
    return np.argmax(np.stack([v.array for v in restored]), axis=0).astype(np.uint8), restored


@pytest.fixture(scope="module")
def case():
    """An oblique-ish scan whose grid differs from the plan's (resampling and a crop box both apply)."""
    rng = np.random.default_rng(3)
    array = np.zeros((30, 26, 11), np.float32)
    array[3:27, 2:24, 1:10] = rng.normal(100.0, 40.0, (24, 22, 9))
    affine = np.array([[0, -1.3, 0, 10], [1.6, 0, 0, -4], [0, 0, 2.5, 7], [0, 0, 0, 1]], dtype=np.float64)
    plan = tiny_plan(spacing=(2.0, 2.0, 2.0))
    model = UNet(num_classes=3, spatial_dims=3, n_stages=2, features=(4, 8), deep_supervision=True)
    return Volume(array, affine), plan, model, untrained_params(model, (1, 16, 16, 8, 1), seed=6)


@pytest.mark.parametrize("accumulate", ["device", "host"])
def test_labels_one_class_at_a_time_equal_the_whole_volume_path(case, accumulate):
    scan, plan, model, params = case
    predictor = Predictor(model, params, plan, InferenceConfig(batch_size=4, mirror_axes=()), accumulate=accumulate)
    image, _, properties = preprocess_case([scan], None, plan)
    assert tuple(properties["shape_after_crop"]) != tuple(properties["shape_after_resample"])  # resampled back
    logits = predictor.logits(image)
    expected, restored = _reference_labels(logits, properties)
    assert len(np.unique(expected)) == 3  # every class present: a real comparison

    prediction = predictor.predict_volume([scan])
    np.testing.assert_array_equal(prediction.label.array, expected)
    np.testing.assert_allclose(prediction.label.affine, restored[0].affine)
    # with probabilities requested (the whole-volume path) the labels are the same too
    with_probabilities = predictor.predict_volume([scan], return_probabilities=True)
    np.testing.assert_array_equal(with_probabilities.label.array, expected)
    for got, want in zip(with_probabilities.probabilities, restored):
        np.testing.assert_allclose(got.array, want.array, rtol=1e-6, atol=1e-7)


def test_many_slabs_give_the_same_labels_and_probabilities(case):
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 2.0, (9, 7, 5, 6)).astype(np.float32)  # (*spatial, K)
    whole = np.asarray(jax.nn.softmax(logits, axis=-1))
    tiny = 7 * 5 * 6 * 4 * 2  # two rows per slab: five slabs
    for k, probability in enumerate(class_probabilities(logits, slab_bytes=tiny)):
        np.testing.assert_allclose(probability, whole[..., k], rtol=1e-6, atol=1e-7)
    labels = argmax_on_file_grid(logits, lambda probability, k: probability, slab_bytes=tiny)
    np.testing.assert_array_equal(labels, np.argmax(whole, axis=-1))


def test_ties_go_to_the_lower_class_as_argmax():
    logits = np.zeros((4, 3, 2, 5), np.float32)
    logits[..., 2] = logits[..., 4] = 1.0
    labels = argmax_on_file_grid(logits, lambda probability, k: probability)
    assert labels.dtype == np.uint8 and (labels == 2).all()


def test_restoring_one_foreground_class_puts_zero_outside_the_crop_box(case):
    scan, plan, *_ = case
    image, _, properties = preprocess_case([scan], None, plan)
    ones = np.ones((1, *image.shape[1:]), np.float32)
    inside = restore_geometry(ones, properties, kind="probabilities", background=False)[0].array
    background = restore_geometry(ones, properties, kind="probabilities")[0].array
    assert (inside == 0).any() and (inside[inside != 0] == 1).all()  # zero outside the box, not one
    assert (background == 1).all()


def _host_peak_bytes(num_classes, shape=(48, 40, 32)):
    logits = np.random.default_rng(0).normal(size=(*shape, num_classes)).astype(np.float32)
    slab = 4 * num_classes * shape[1] * shape[2] * 4  # four rows per slab

    def run():
        return argmax_on_file_grid(logits, lambda probability, k: probability * 1.0, slab_bytes=slab)

    run()  # compile first: tracing allocates Python objects that would blur the comparison
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_host_memory_of_the_class_by_class_arg_max_does_not_grow_with_classes():
    voxels = 48 * 40 * 32
    small, large = _host_peak_bytes(4), _host_peak_bytes(32)
    # a few float32 per voxel (normaliser, one class before and after mapping, running maximum) ...
    assert large < 8 * 4 * voxels
    # ... and about the same for 32 classes as for 4 (one K x voxels float32 array alone would be 32 x 4
    # bytes per voxel); the difference allowed is one slab of 4 rows of 32 classes and some slack
    assert large < small + 4 * 32 * 4 * 40 * 32 + 2**16
