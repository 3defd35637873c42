import numpy as np
from PIL import Image

from medseg_jax.report import largest_extent_index, plot_case_views, plot_training_curve


def test_largest_extent_index_finds_the_fullest_plane():
    mask = np.zeros((6, 7, 8), bool)
    mask[1:3, 2:6, 5] = True
    mask[2, 2, 1] = True
    assert largest_extent_index(mask, 2) == 5
    assert largest_extent_index(mask, 0) in (1, 2)
    assert largest_extent_index(np.zeros((4, 4, 4), bool), 1) == 2


def test_three_views_one_row_per_class(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.normal(0, 50, (24, 20, 12))
    reference = np.zeros((24, 20, 12), np.uint8)
    reference[4:16, 4:14, 2:10] = 1
    reference[8:11, 6:9, 4:7] = 2
    prediction = np.roll(reference, 1, axis=0)
    one_class = plot_case_views(
        image, (prediction == 1).astype(np.uint8), None, (1.0, 1.0, 3.0), tmp_path / "one.png", class_names={1: "liver"}
    )
    two_classes = plot_case_views(
        image, prediction, reference, (1.0, 1.0, 3.0), tmp_path / "two.png", class_names={1: "liver", 2: "tumour"}
    )
    h1, h2 = Image.open(one_class).size[1], Image.open(two_classes).size[1]
    assert h2 > 1.6 * h1  # a second row for the second class
    assert not list(tmp_path.glob(".tmp-*"))


def test_training_curve_with_validation(tmp_path):
    history = [{"step": s, "loss": 2.0 / s, "learning_rate": 1e-2} for s in range(1, 11)]
    validation = [{"step": 5, "val_dice": 0.4, "pseudo_dice": 0.4}, {"step": 10, "val_dice": 0.6, "pseudo_dice": 0.42}]
    path = plot_training_curve(history, tmp_path / "curve.png", validation=validation)
    assert Image.open(path).size[0] > 300
