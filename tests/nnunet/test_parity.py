"""Parity with nnU-Net v2 itself, on the fixtures ``make_fixtures.py`` made with nnunetv2 and torch (see its
docstring). No torch here: the PyTorch outputs are stored.

Tolerances: logits of the same weights on the same input agree to 1e-4 (float32 convolutions summed in
another order; measured about 1e-5). Labels of ``medseg-jax predict`` and ``nnUNetv2_predict`` agree on at
least 99.9% of the voxels (measured: all but one voxel of the six predictions) and the class
probabilities to 1e-2 everywhere (measured at most 3e-3): the fixtures store them rounded to 1/255, and
nnU-Net blends its windows in float16 (weights and sums), medseg-jax in float32. That float16 blending
is the one systematic difference: where only the rims of windows cover a voxel (image borders), its
summed weights lose precision, which moves an untrained network's logits there by up to about 0.5
(with a float16 emulation of nnU-Net's blending the difference drops to its rounding, 8e-3).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from medseg_jax.data.image_io import read_image
from medseg_jax.inference.predict import predict_path
from medseg_jax.inference.run_folder import load_run
from medseg_jax.nnunet.importer import import_nnunet

FIXTURES = Path(__file__).parent / "fixtures"
LOGITS_TOLERANCE = 1e-4
LABEL_AGREEMENT = 0.999
PROBABILITY_TOLERANCE = 1e-2

pytestmark = pytest.mark.skipif(
    not (FIXTURES / "manifest.json").is_file(), reason="nnU-Net fixtures not made (tests/nnunet/make_fixtures.py)"
)


def _manifest() -> dict:
    return json.loads((FIXTURES / "manifest.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every model and fold set the fixtures hold, imported once."""
    manifest = _manifest()
    base = tmp_path_factory.mktemp("imported")
    imported = {}
    for name, model in manifest["models"].items():
        for fold in (0, 1):
            if (FIXTURES / model / f"fold_{fold}").is_dir():
                import_nnunet(FIXTURES / model, base / f"{name}_f{fold}", folds=[fold])
                imported[f"{name}_f{fold}"] = base / f"{name}_f{fold}"
    for prediction, spec in manifest["predictions"].items():
        if prediction not in imported:
            import_nnunet(FIXTURES / manifest["models"][spec["model"]], base / prediction, folds=spec["folds"])
            imported[prediction] = base / prediction
    return imported


def test_logits_equal_pytorch(runs):
    files = sorted((FIXTURES / "logits").glob("*.npz"))
    assert files
    for path in files:
        stored = np.load(path)
        model, params, _, _ = load_run(runs[path.stem])
        x = jnp.asarray(np.moveaxis(stored["input"], 1, -1))  # PyTorch (N, C, *S) -> (N, *S, C)
        logits = np.moveaxis(np.asarray(model.apply(params, x)), -1, 1)
        np.testing.assert_allclose(
            logits, stored["logits"], rtol=LOGITS_TOLERANCE, atol=LOGITS_TOLERANCE, err_msg=path.stem
        )


@pytest.mark.parametrize("prediction", ["2d_f0", "3d_f0", "3d_f01"])
def test_predictions_equal_nnunetv2_predict(runs, prediction, tmp_path):
    model, params, plan, config = load_run(runs[prediction])
    expected_dir = FIXTURES / "predictions" / prediction
    for image in sorted((FIXTURES / "images").glob("*_0000.nii.gz")):
        case = image.name[: -len("_0000.nii.gz")]
        out = tmp_path / f"{case}.nii.gz"
        predict_path(image, out, model, params, plan, config.inference, save_probabilities=True)
        ours = read_image(out).array
        theirs = read_image(expected_dir / f"{case}.nii.gz").array
        agreement = float(np.mean(ours == theirs))
        assert agreement >= LABEL_AGREEMENT, f"{prediction} {case}: labels agree on {agreement:.5f} of the voxels"
        # nnU-Net stores probabilities in SimpleITK's (K, z, y, x), medseg-jax in the file's (K, x, y, z)
        probabilities = np.load(tmp_path / f"{case}.npz")["probabilities"]
        stored = np.load(expected_dir / f"{case}.npz")["probabilities_uint8"]
        reference = (stored.astype(np.float32) / 255).transpose(0, 3, 2, 1)
        difference = float(np.abs(probabilities - reference).max())
        assert difference <= PROBABILITY_TOLERANCE, f"{prediction} {case}: probabilities differ up to {difference:.4f}"
        # labels only: the logits are mapped back one class at a time (memory bounded), the same labels
        labels_only = tmp_path / "labels-only" / f"{case}.nii.gz"
        predict_path(image, labels_only, model, params, plan, config.inference)
        assert not labels_only.with_name(f"{case}.npz").exists()
        np.testing.assert_array_equal(read_image(labels_only).array, ours, err_msg=f"{prediction} {case}")
