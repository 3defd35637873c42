"""``train --init-from``: the source run's network and weights, heads re-initialised for other classes."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medseg_jax.cli import main
from medseg_jax.config import RunConfig
from medseg_jax.errors import ConfigError
from medseg_jax.inference.run_folder import load_run
from medseg_jax.models import UNet
from medseg_jax.nnunet.architecture import architecture
from medseg_jax.train.init_from import adopt_network, merged_params
from tests.nnunet.model_folder import arch_kwargs, plans, write_model_folder

PATCH, SPACING = [16, 16, 16], [1.0, 1.0, 1.0]


def _run(tmp_path, encoder="residual", folds=(0,)):
    kwargs = arch_kwargs(3, encoder)
    arch = architecture(plans("3d_fullres", kwargs, encoder, PATCH, SPACING)["configurations"]["3d_fullres"], "p")
    folder = write_model_folder(tmp_path / f"results_{len(folds)}", arch, kwargs, "3d_fullres", PATCH, SPACING, folds)
    out = tmp_path / f"run_{len(folds)}"
    assert main(["import-nnunet", str(folder), "--out", str(out)]) == 0
    return out


def test_adopt_network_takes_the_source_network_and_leaves_the_plan_fields(tmp_path):
    source = _run(tmp_path)
    config = adopt_network(RunConfig(), source)
    assert config.model.encoder == "residual" and config.model.features == (4, 8, 8)
    assert config.model.n_blocks_per_stage == (1, 2, 2) and config.model.n_conv_per_stage_decoder == (1, 1)
    assert config.model.num_classes is None and config.model.strides is None  # the training plan's
    with pytest.raises(ConfigError, match="ensemble of 2 networks; fine-tune one fold"):
        adopt_network(RunConfig(), _run(tmp_path, folds=(0, 1)))
    with pytest.raises(ConfigError, match="not a run folder"):
        adopt_network(RunConfig(), tmp_path)


def test_weights_are_copied_and_only_heads_of_another_class_count_stay_fresh(tmp_path):
    source_dir = _run(tmp_path)
    model, source, _, config = load_run(source_dir)
    fields = {k: getattr(config.model, k) for k in ("features", "kernel_sizes", "strides", "n_blocks_per_stage")}
    fields |= {"n_stages": 3, "encoder": "residual", "n_conv_per_stage_decoder": (1, 1)}
    x = jnp.zeros((1, *PATCH, 1))
    same = UNet(num_classes=3, **fields).init(jax.random.key(1), x)
    params, kept = merged_params(same, source, source_dir)
    assert kept == []
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(source)):
        np.testing.assert_array_equal(a, b)
    five = UNet(num_classes=5, **fields).init(jax.random.key(1), x)
    params, kept = merged_params(five, source, source_dir)
    assert sorted(kept) == sorted(f"['params']['head_{d}']['{p}']" for d in range(2) for p in ("bias", "kernel"))
    np.testing.assert_array_equal(params["params"]["head_1"]["kernel"], five["params"]["head_1"]["kernel"])
    np.testing.assert_array_equal(
        params["params"]["decoder_1"]["conv_block_0"]["conv"]["kernel"],
        source["params"]["decoder_1"]["conv_block_0"]["conv"]["kernel"],
    )
    wider = UNet(num_classes=3, **(fields | {"features": (4, 8, 16)})).init(jax.random.key(1), x)
    with pytest.raises(ConfigError, match=r"parameter \['params'\]\['encoder_2_block_0'\]"):
        merged_params(wider, source, source_dir)


FIXTURE_MODEL = (
    Path(__file__).parent / "fixtures" / "Dataset901_SynthLiver" / "nnUNetTrainer__nnUNetResEncUNetMPlans__3d_fullres"
)


@pytest.mark.slow
@pytest.mark.skipif(not FIXTURE_MODEL.is_dir(), reason="nnU-Net fixtures not made (tests/nnunet/make_fixtures.py)")
def test_fine_tuning_an_imported_nnunet_model_end_to_end(tmp_path, capsys):
    """import -> preprocess new data with the imported plan -> train --init-from: after two steps the liver
    Dice is already that of the imported network (about 0.9 here), so its weights were carried over."""
    from medseg_jax.data.synthetic import write_synthetic_dataset

    dataset = write_synthetic_dataset(tmp_path / "raw", 5, seed=11, shape=(40, 40, 24))
    source, store, tuned = tmp_path / "source", tmp_path / "store", tmp_path / "tuned"
    assert main(["import-nnunet", str(FIXTURE_MODEL), "--folds", "0", "--out", str(source)]) == 0
    assert main(["preprocess", str(dataset), "--plan", str(source / "plan.json"), "--out", str(store), "--quiet"]) == 0
    steps = ["train.steps=2", "train.val_every=2", "train.checkpoint_every=2", "data.num_workers=0"]
    command = ["train", "--data", str(store), "--out", str(tuned), "--init-from", str(source), "--fold", "0", "--quiet"]
    assert main([*command, *[arg for s in steps for arg in ("--set", s)]]) == 0
    assert "initialised from" in capsys.readouterr().out
    validation = [json.loads(line) for line in (tuned / "metrics.jsonl").read_text().splitlines() if "val_dice" in line]
    assert validation[-1]["val_dice_per_class"][1] > 0.5  # liver
