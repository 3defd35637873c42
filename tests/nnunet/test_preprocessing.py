"""nnU-Net's preprocessing as a medseg-jax plan, and the pipeline pieces that reproduce it."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from medseg_jax.data.intensity import normalize_channel
from medseg_jax.data.preprocess import nonzero_mask, orient, preprocess_case, restore_geometry, unorient
from medseg_jax.data.resample import resample_image, separate_axis
from medseg_jax.data.volume import Volume, permute_axes
from medseg_jax.errors import DataError
from medseg_jax.nnunet.architecture import architecture
from medseg_jax.nnunet.preprocessing import labels, make_plan, orientation_axes
from tests.nnunet.model_folder import DATASET_JSON, arch_kwargs, plans


def test_orientation_axes_follow_simpleitk_and_transpose_forward():
    # nnU-Net's array is (k, j, i) of the file; transpose_forward [1, 0, 2] gives (j, k, i)
    assert orientation_axes([0, 1, 2], 3) == [2, 1, 0]
    assert orientation_axes([1, 0, 2], 3) == [1, 2, 0]
    # 2D: nnU-Net slices along its axis 0, medseg-jax along the last axis
    assert orientation_axes([0, 1, 2], 2) == [1, 0, 2]


def test_oriented_array_is_simpleitk_order_and_goes_back_exactly():
    rng = np.random.default_rng(0)
    array = rng.normal(size=(4, 5, 6)).astype(np.float32)
    affine = np.array([[0, 0, -2.0, 10], [-1.5, 0, 0, 5], [0, 3.0, 0, -7], [0, 0, 0, 1]])
    volume = Volume(array, affine)
    orientation = {"frame": "file", "axes": orientation_axes([0, 1, 2], 3)}
    oriented = orient(volume, orientation)
    np.testing.assert_array_equal(oriented.array, array.transpose(2, 1, 0))  # SimpleITK's GetArrayFromImage
    assert oriented.spacing == (2.0, 3.0, 1.5)  # SimpleITK's GetSpacing()[::-1]
    # every voxel keeps its world position
    np.testing.assert_allclose(oriented.affine @ [1, 2, 3, 1], affine @ [3, 2, 1, 1])
    back = unorient(oriented, orientation, affine, array.shape)
    np.testing.assert_array_equal(back.array, array)
    np.testing.assert_array_equal(back.affine, affine)
    with pytest.raises(DataError, match="permutation"):
        permute_axes(volume, (0, 0, 1))


def test_normalisation_schemes_of_nnunet():
    x = np.array([[0.0, 2.0, 4.0], [0.0, 6.0, 0.0]], np.float32)
    np.testing.assert_allclose(normalize_channel(x, {"scheme": "rescale_01"}), x / 6.0)
    np.testing.assert_array_equal(normalize_channel(x, {"scheme": "none"}), x)
    mask = x != 0
    out = normalize_channel(x, {"scheme": "zscore", "use_mask": True}, mask=mask)
    inside = np.array([2.0, 4.0, 6.0])
    np.testing.assert_allclose(out[mask], (inside - 4.0) / inside.std(), rtol=1e-6)
    assert (out[~mask] == 0).all()  # outside the mask nnU-Net leaves the (zero) voxels alone


def test_nonzero_mask_fills_holes():
    image = np.zeros((1, 5, 5), np.float32)
    image[0, 1:4, 1:4] = 1.0
    image[0, 2, 2] = 0.0  # a hole: inside the mask, as nnU-Net's binary_fill_holes makes it
    mask = nonzero_mask(image)
    assert mask[2, 2] and mask.sum() == 9


def test_separate_axis_needs_one_thickest_axis():
    assert separate_axis([1.0, 1.0, 5.0], [1.0, 1.0, 5.0]) == 2
    assert separate_axis([0.24, 1.25, 1.25], [0.24, 1.25, 1.25]) is None  # nnU-Net: no separate axis


def test_clip_to_input_range_as_skimage_resize():
    image = np.zeros((1, 8, 8, 8), np.float32)
    image[0, 3:5, 3:5, 3:5] = 1.0
    plain = resample_image(image, [1, 1, 1], [0.6, 0.6, 0.6])
    clipped = resample_image(image, [1, 1, 1], [0.6, 0.6, 0.6], clip=True)
    assert plain.min() < 0 or plain.max() > 1  # order-3 overshoot
    assert clipped.min() >= 0 and clipped.max() <= 1
    np.testing.assert_array_equal(clipped, np.clip(plain, 0, 1))


def _plan(**config_changes):
    config_name = "3d_fullres"
    plan_json = plans(config_name, arch_kwargs(3, "plain"), "plain", [16, 16, 16], [2.0, 1.0, 1.0], (0, 1, 2))
    config = plan_json["configurations"][config_name] | config_changes
    arch = architecture(config, "where")
    return plan_json, config, arch


def test_make_plan_maps_nnunet_fields():
    plan_json, config, arch = _plan()
    plan = make_plan(plan_json, DATASET_JSON, config, "3d_fullres", arch, (0, 1, 2))
    assert plan["orientation"] == {"frame": "file", "axes": [2, 1, 0]}
    assert plan["target_spacing"] == [2.0, 1.0, 1.0]
    assert plan["normalization"] == [
        {
            "channel": "CT",
            "scheme": "ct",
            "mean": 60.0,
            "std": 45.0,
            "percentile_00_5": -100.0,
            "percentile_99_5": 250.0,
        }
    ]
    assert plan["preprocessing"]["normalize_before_resampling"] and plan["resampling"]["resample_logits"]
    assert plan["num_classes"] == 3 and plan["labels"]["tumour"] == 2


def test_preprocess_and_restore_with_an_imported_plan():
    """File voxel order reversed, crop, CT normalisation before resampling, back to the file's grid."""
    plan_json, config, arch = _plan()
    plan = make_plan(plan_json, DATASET_JSON, config, "3d_fullres", arch, (0, 1, 2))
    rng = np.random.default_rng(1)
    array = np.zeros((12, 10, 6), np.float32)
    array[2:10, 1:9, 1:5] = rng.uniform(-300, 500, size=(8, 8, 4))
    affine = np.diag([1.0, 1.0, 2.0, 1.0])  # spacing (x 1, y 1, z 2): already the target spacing
    image, _, properties = preprocess_case([Volume(array, affine)], None, plan)
    cropped = array[2:10, 1:9, 1:5].transpose(2, 1, 0)
    expected = (np.clip(cropped, -100, 250) - 60.0) / 45.0
    np.testing.assert_allclose(image[0], expected, rtol=1e-6, atol=1e-6)
    label = restore_geometry((image[0] > 0).astype(np.uint8), properties, kind="label")
    assert label.shape == array.shape
    np.testing.assert_array_equal(label.array[2:10, 1:9, 1:5], (expected > 0).transpose(2, 1, 0))
    assert label.array[0].sum() == 0
    logits = np.stack([np.zeros_like(image[0]), image[0]])
    restored = restore_geometry(logits, properties, kind="logits")
    assert restored[0].array[0, 0, 0] == 0 and restored[1].array[0, 0, 0] == -np.inf


@pytest.mark.parametrize(
    "change, message",
    [
        ({"resampling_fn_data": "resample_torch_fornnunet"}, "resampling_fn_data"),
        ({"preprocessor_name": "MyPreprocessor"}, "preprocessor_name"),
        ({"normalization_schemes": ["MyNormalization"]}, r"normalization_schemes\[0\]"),
        ({"previous_stage": "3d_lowres"}, "cascade"),
    ],
)
def test_unreproducible_preprocessing_is_refused(change, message):
    plan_json, config, arch = _plan(**change)
    with pytest.raises(DataError, match=message):
        make_plan(plan_json, DATASET_JSON, config, "3d_fullres", arch, None)


def test_force_separate_z_and_readers_are_refused():
    plan_json, config, arch = _plan()
    forced = copy.deepcopy(config)
    forced["resampling_fn_data_kwargs"]["force_separate_z"] = True
    with pytest.raises(DataError, match="force_separate_z"):
        make_plan(plan_json, DATASET_JSON, forced, "3d_fullres", arch, None)
    with pytest.raises(DataError, match="image_reader_writer 'Tiff3DIO'"):
        make_plan(plan_json | {"image_reader_writer": "Tiff3DIO"}, DATASET_JSON, config, "3d_fullres", arch, None)


def test_labels_drop_ignore_and_refuse_regions():
    assert labels({"labels": {"background": 0, "a": 1, "ignore": 2}}, "dataset.json") == {"background": 0, "a": 1}
    with pytest.raises(DataError, match="region-based"):
        labels({"labels": {"background": 0, "whole": [1, 2], "core": 2}, "regions_class_order": [1, 2]}, "dataset.json")
    with pytest.raises(DataError, match="without gaps"):
        labels({"labels": {"background": 0, "a": 2}}, "dataset.json")
