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
