"""Every YAML in configs/ loads into a RunConfig (so a typo in a shipped config fails CI)."""

from pathlib import Path

import pytest

from medseg_jax.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_configs_folder_is_not_empty():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "2d.yaml", "3d_fullres.yaml", "tpu_pod.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    config = load_config(path)
    assert config.train.steps > 0
    text = path.read_text()
    assert "medseg-jax" in text  # each config says the command that runs it
