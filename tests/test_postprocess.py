"""Largest connected component per class."""

import numpy as np
import pytest

from medseg_jax.errors import ConfigError
from medseg_jax.postprocess import keep_largest_component


def test_keeps_the_biggest_blob_of_each_class_3d():
    labels = np.zeros((16, 16, 16), np.uint8)
    labels[1:5, 1:5, 1:5] = 1  # 64 voxels: kept
    labels[10:12, 10:12, 10:12] = 1  # 8 voxels: removed
    labels[1:3, 10:15, 1:3] = 2  # 20 voxels: kept
    labels[12:15, 1:3, 12:14] = 2  # 12 voxels: removed
    labels[8, 8, 8] = 3  # a single component stays
    out = keep_largest_component(labels)
    expected = labels.copy()
    expected[10:12, 10:12, 10:12] = 0
    expected[12:15, 1:3, 12:14] = 0
    np.testing.assert_array_equal(out, expected)
    assert labels[10, 10, 10] == 1  # the input is not modified


def test_connectivity_and_class_selection_2d():
    labels = np.zeros((8, 8), np.int32)
    labels[0:2, 0:2] = 1  # 4 voxels
    labels[2, 2] = 1  # touches the block only at a corner
    labels[5:7, 5:8] = 2
    labels[0, 7] = 2
    full = keep_largest_component(labels)  # 8-connectivity: the corner voxel joins the block
    assert full[2, 2] == 1 and full[0, 7] == 0
    faces = keep_largest_component(labels, classes=[1], connectivity=1)
    assert faces[2, 2] == 0 and faces[0, 0] == 1 and faces[0, 7] == 2  # class 2 left alone
    with pytest.raises(ConfigError, match="connectivity"):
        keep_largest_component(labels, connectivity=3)


def test_a_group_of_classes_keeps_the_largest_component_of_their_union():
    from medseg_jax.postprocess import apply_postprocessing, keep_largest_component_of

    label = np.zeros((12, 12), np.uint8)
    label[1:4, 1:4] = 1  # 9 voxels of class 1, touching ...
    label[1:4, 4:6] = 2  # ... 6 of class 2: together one component of 15
    label[8:11, 8:11] = 1  # a separate 9-voxel component of class 1
    kept = keep_largest_component_of(label, [1, 2])
    expected = label.copy()
    expected[8:11, 8:11] = 0
    np.testing.assert_array_equal(kept, expected)
    # class 1 alone: two components of 9 voxels, the first in C order is kept, class 2 untouched
    np.testing.assert_array_equal(keep_largest_component_of(label, [1]), keep_largest_component(label, classes=[1]))
    np.testing.assert_array_equal(apply_postprocessing(label, []), label)
    twice = apply_postprocessing(label, [[2], [1, 2]])
    np.testing.assert_array_equal(twice, keep_largest_component_of(keep_largest_component_of(label, [2]), [1, 2]))


@pytest.mark.parametrize("steps", [[[0]], [[3]], [[]], [1], "foreground", [[1, True]]])
def test_postprocessing_steps_are_checked(steps):
    from medseg_jax.postprocess import check_postprocessing

    with pytest.raises(ConfigError, match=r"postprocessing"):
        check_postprocessing(steps, num_classes=3)
    assert check_postprocessing([[1, 2], [2]], num_classes=3) == [[1, 2], [2]]
