import numpy as np

from medseg_jax.metrics.lesions import lesion_detection


def test_detected_missed_and_false_positive_lesions():
    reference = np.zeros((20, 20, 10), np.uint8)
    reference[2:5, 2:5, 2:5] = 2  # lesion A: found
    reference[10:13, 10:13, 2:5] = 2  # lesion B: missed
    reference[0:20, 0:20, 8] = 1  # another class is ignored
    prediction = np.zeros_like(reference)
    prediction[4:6, 4:6, 4:6] = 2  # overlaps A by one voxel
    prediction[15:17, 2:4, 2:4] = 2  # overlaps nothing
    result = lesion_detection(prediction, reference, 2)
    assert result == {
        "reference_lesions": 2,
        "detected": 1,
        "predicted_lesions": 2,
        "false_positives": 1,
        "sensitivity": 0.5,
        "precision": 0.5,
    }


def test_diagonal_neighbours_are_one_lesion_and_empty_cases_are_nan():
    reference = np.zeros((6, 6), np.uint8)
    reference[1, 1] = reference[2, 2] = 1  # touching corners: one component under full connectivity
    result = lesion_detection(np.zeros_like(reference), reference, 1)
    assert result["reference_lesions"] == 1 and result["detected"] == 0
    assert np.isnan(result["precision"]) and result["sensitivity"] == 0.0
    none = lesion_detection(np.zeros_like(reference), np.zeros_like(reference), 1)
    assert np.isnan(none["sensitivity"]) and np.isnan(none["precision"])
