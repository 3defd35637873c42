"""``predict --statistics``: per-class volume and mean scan intensity, hand-checked, and written atomically."""

import json

import numpy as np
import pytest

from medseg_jax.data.image_io import read_image, write_nifti
from medseg_jax.data.volume import Volume
from medseg_jax.errors import DataError
from medseg_jax.inference.predict import predict_input, predict_path
from medseg_jax.inference.statistics import case_statistics, intensity_unit
from tests.inference.test_predict import NO_TTA, threshold_model, tiny_plan


def blocks_scan():
    """Two bright blocks (values 10 and 30; 64 and 8 voxels) in a dim volume, 2 mm voxels (0.008 mL each)."""
    array = np.full((16, 14, 12), 0.5, np.float32)
    array[2:6, 2:6, 2:6] = 10.0
    array[10:12, 9:11, 8:10] = 30.0
    return Volume(array, np.diag([-2.0, 2.0, 2.0, 1.0]))  # L-A-S: the label map comes back in this order


def test_statistics_of_a_hand_made_case(tmp_path):
    # The threshold network labels the voxels above the z-score mean as organ: exactly the two blocks.
    scan = write_nifti(blocks_scan(), tmp_path / "case_0000.nii.gz")
    model, params = threshold_model(3)
    summary = predict_path(scan, tmp_path / "out", model, params, tiny_plan("MR"), NO_TTA, statistics=True)
    path = tmp_path / "out" / "case.statistics.json"
    assert summary["statistics"] == str(path)
    stats = json.loads(path.read_text())
    assert stats["case"] == "case" and stats["voxel_volume_ml"] == pytest.approx(0.008)
    assert stats["intensity_units"] == {"MR": "file values"}
    organ, lesion, background = (stats["classes"][name] for name in ("organ", "lesion", "background"))
    assert organ["label"] == 1 and organ["voxels"] == 72 and organ["volume_ml"] == pytest.approx(72 * 0.008)
    assert organ["mean_intensity"]["MR"] == pytest.approx((64 * 10.0 + 8 * 30.0) / 72)
    assert lesion == {"label": 2, "voxels": 0, "volume_ml": 0.0, "mean_intensity": {"MR": None}}
    assert background["voxels"] == 16 * 14 * 12 - 72 and background["mean_intensity"]["MR"] == pytest.approx(0.5)
    assert summary["volume_ml"]["organ"] == pytest.approx(organ["volume_ml"])  # the same volumes as printed
    label = read_image(tmp_path / "out" / "case.nii.gz").array
    assert (label == 1).sum() == 72


def test_multichannel_ct_statistics_name_hounsfield_units():
    label = np.array([[0, 1], [1, 2]], np.uint8)
    ct = Volume(np.array([[-1000.0, 40.0], [60.0, 100.0]]), np.eye(4))
    pet = Volume(np.array([[0.0, 2.0], [4.0, 8.0]]), np.eye(4))
    plan = {
        "channel_names": ["CT", "PET"],
        "num_classes": 3,
        "labels": {"background": 0, "liver": 1, "tumour": 2},
        "normalization": [{"scheme": "ct"}, {"scheme": "zscore"}],
    }
    stats = case_statistics(label, [ct, pet], plan, voxel_ml=0.5)
    assert stats["intensity_units"] == {"CT": "HU", "PET": "file values"}
    assert stats["classes"]["liver"] == {
        "label": 1,
        "voxels": 2,
        "volume_ml": 1.0,
        "mean_intensity": {"CT": 50.0, "PET": 3.0},
    }
    assert stats["classes"]["tumour"]["mean_intensity"] == {"CT": 100.0, "PET": 8.0}
    assert intensity_unit("t1", {"scheme": "hu_window"}) == "HU"


def test_a_label_that_cannot_be_written_leaves_no_statistics(tmp_path):
    scan = write_nifti(blocks_scan(), tmp_path / "in" / "case_0000.nii.gz")
    (tmp_path / "out" / "case.nii.gz").mkdir(parents=True)  # a folder where the label file should go
    model, params = threshold_model(3)
    with pytest.raises(DataError, match="case.nii.gz"):
        predict_input(tmp_path / "in", tmp_path / "out", model, params, tiny_plan("MR"), NO_TTA, statistics=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case.nii.gz"]
    assert scan.is_file()
