"""The check that a run's config.yaml still describes its checkpoint."""

from __future__ import annotations

import dataclasses

import pytest

from medseg_jax.config import EXECUTION_ONLY_MODEL_FIELDS, ModelConfig, to_dict
from medseg_jax.errors import DataError
from medseg_jax.inference.run_folder import check_config_matches_checkpoint


def trained_section() -> dict:
    return to_dict(ModelConfig(spatial_dims=3, in_channels=1, num_classes=3, n_stages=3, features=(8, 16, 32)))


@pytest.mark.parametrize(
    "field, value",
    [
        ("conv_implementation", "xla"),
        ("upsample_implementation", "conv_transpose"),
        ("dtype", "bfloat16"),
        ("remat_encoder", True),
    ],
)
def test_how_the_network_is_computed_may_change_after_training(tmp_path, field, value):
    assert field in EXECUTION_ONLY_MODEL_FIELDS
    edited = {**trained_section(), field: value}
    check_config_matches_checkpoint(tmp_path, edited, {"config": {"model": trained_section()}})


def test_a_field_that_changes_the_parameters_is_refused_naming_it(tmp_path):
    edited = {**trained_section(), "features": [8, 16, 64], "conv_implementation": "xla"}
    with pytest.raises(DataError, match="disagrees with the checkpoint") as error:
        check_config_matches_checkpoint(tmp_path, edited, {"config": {"model": trained_section()}})
    assert "model.features" in str(error.value) and "conv_implementation" not in str(error.value)


def test_every_execution_only_field_is_a_model_field():
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    assert set(EXECUTION_ONLY_MODEL_FIELDS) <= names
