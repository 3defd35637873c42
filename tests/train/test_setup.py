"""resolve_run: the one place where a run config meets the plan and the devices."""

import dataclasses
from pathlib import Path

import pytest

from medseg_jax.config import load_config, to_dict
from medseg_jax.errors import ConfigError
from medseg_jax.train.setup import ResolvedRun, check_compatible, resolve_run

PLAN_2D = {
    "dim": 2,
    "channel_names": ["CT"],
    "num_classes": 3,
    "labels": {"background": 0, "liver": 1, "tumour": 2},
    "n_stages": 3,
    "kernel_sizes": [[3, 3], [3, 3], [3, 3]],
    "strides": [[1, 1], [2, 2], [2, 2]],
    "patch_size": [32, 48],
    "batch_size": 4,
}
PLAN_3D = {
    "dim": 3,
    "channel_names": ["CT", "PET"],
    "num_classes": 2,
    "labels": {"background": 0, "lesion": 1},
    "n_stages": 4,
    "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
    "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
    "patch_size": [16, 64, 64],
    "batch_size": 2,
}


def resolve(overrides=(), plan=PLAN_2D, devices=1, processes=1) -> ResolvedRun:
    return resolve_run(load_config(None, list(overrides)), plan, device_count=devices, process_count=processes)


def test_the_plan_fills_every_topology_field_left_null():
    run = resolve(plan=PLAN_3D, overrides=["augment.mode=none"])
    model = run.model
    assert (model.spatial_dims, model.in_channels, model.num_classes, model.n_stages) == (3, 2, 2, 4)
    assert model.kernel_sizes == ((1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3))
    assert model.strides == ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2))
    assert model.features == (32, 64, 128, 256)  # nnU-Net's rule from base_features
    assert run.patch_size == (16, 64, 64) and run.batch_size == 2 and run.per_process_batch == 2
    assert run.crop_size == run.device_input_size == (16, 64, 64)  # no augmentation: the loader cuts the patch
    assert run.plan["patch_size"] == [16, 64, 64] and run.plan["dim"] == 3


def test_resolving_a_resolved_config_changes_nothing():
    run = resolve(["model.base_features=8"])
    again = resolve_run(run.config, PLAN_2D, device_count=1, process_count=1)
    assert to_dict(again.config) == to_dict(run.config)


@pytest.mark.parametrize(
    "override, plan_value",
    [
        ("model.spatial_dims=3", "2"),
        ("model.num_classes=4", "3"),
        ("model.n_stages=4", "3"),
        ("model.in_channels=2", "1"),
        ("model.kernel_sizes=5", "[[3, 3], [3, 3], [3, 3]]"),
        ("model.strides=[1, 2, 4]", "[[1, 1], [2, 2], [2, 2]]"),
    ],
)
def test_a_config_value_that_disagrees_with_the_plan_is_refused_naming_both(override, plan_value):
    key, value = override.split("=")
    with pytest.raises(ConfigError) as info:
        resolve([override])
    message = str(info.value)
    assert message.startswith(key) and plan_value in message


def test_values_equal_to_the_plan_are_accepted_in_any_spelling():
    run = resolve(["model.spatial_dims=2", "model.kernel_sizes=3", "model.strides=[1, 2, [2, 2]]", "model.n_stages=3"])
    assert run.model.kernel_sizes == ((3, 3),) * 3


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.features=[8, 16]", "model.features"),  # dropped silently before: now an error
        ("model.n_conv_per_stage=[2, 2]", "model.n_conv_per_stage"),
        ("model.n_conv_per_stage_decoder=[2, 2, 2]", "model.n_conv_per_stage_decoder"),
        ("model.n_blocks_per_stage=[1, 2, 3, 4, 5, 6]", "model.n_blocks_per_stage"),
    ],
)
def test_per_stage_lists_of_the_wrong_length_are_refused(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolve([override])


def test_residual_blocks_follow_nnunet_resenc_for_any_depth():
    assert resolve(["model.encoder=residual"], plan=PLAN_3D).model.n_blocks_per_stage == (1, 3, 4, 6)
    assert resolve(["model.encoder=residual"]).model.n_blocks_per_stage == (1, 3, 4)


def test_patch_not_divisible_by_the_total_stride_names_data_patch_size():
    with pytest.raises(ConfigError, match=r"data\.patch_size \[30, 48\].*total stride \[4, 4\]"):
        resolve(["data.patch_size=[30, 48]"])
    with pytest.raises(ConfigError, match=r"data\.patch_size .* 3 axes"):
        resolve(["data.patch_size=[32, 32, 32]"])


def test_batch_must_split_over_the_mesh_and_the_processes():
    assert resolve(["data.batch_size=8", "augment.mode=none"], devices=8).mesh_shape == (8, 1)
    with pytest.raises(ConfigError, match=r"data\.batch_size=4 .* data axis \(8 of 8"):
        resolve(["augment.mode=none"], devices=8)
    with pytest.raises(ConfigError, match=r"data\.batch_size=4 .* 8 processes"):
        resolve(
            ["augment.mode=none", "mesh.data=1", "mesh.spatial=8", "data.patch_size=[32, 48]"], devices=8, processes=8
        )
    run = resolve(["data.batch_size=8", "augment.mode=none"], devices=8, processes=2)
    assert run.per_process_batch == 4


def test_spatial_sharding_checks_what_reaches_the_device():
    # with device augmentation the crop (48 -> larger) reaches the device; without, the patch
    off = resolve(["augment.mode=none", "mesh.data=1", "mesh.spatial=2"], devices=2)
    assert off.device_input_size == (32, 48) and off.mesh_shape == (1, 2)
    on = resolve(["mesh.data=1", "mesh.spatial=2"], devices=2)
    assert on.device_input_size == on.crop_size and on.crop_size[0] > 32 and on.crop_size[0] % 2 == 0
    cpu = resolve(["augment.mode=cpu"])
    assert cpu.device_input_size == (32, 48) and cpu.crop_size == on.crop_size
    with pytest.raises(ConfigError, match=r"mesh\.spatial=3"):
        resolve(["augment.mode=none", "mesh.data=1", "mesh.spatial=3", "data.batch_size=3"], devices=3)


def test_validation_settings_of_the_other_mode_are_refused():
    with pytest.raises(ConfigError, match=r"train\.val_batches=50 is ignored by train\.val_mode=sliding_window"):
        resolve(["train.val_batches=50"])
    assert resolve(["train.val_mode=patches"]).config.train.val_batches == 4
    assert resolve(["train.val_mode=patches", "train.val_batches=50"]).config.train.val_batches == 50


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.warmup_steps=300", r"train\.warmup_steps=300 must be below train\.steps=300"),
        ("augment.mirror_axes=[2]", r"augment\.mirror_axes: axis 2"),
        ("inference.mirror_axes=[0, 2]", r"inference\.mirror_axes: axis 2"),
        ("augment.in_plane_only=true", r"augment\.in_plane_only"),
    ],
)
def test_settings_that_cannot_apply_to_this_run_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve(["train.steps=300", override])


def test_both_loss_weights_zero_is_refused():
    with pytest.raises(ConfigError, match="nothing to train"):
        resolve(["train.loss.dice_weight=0", "train.loss.ce_weight=0"])


def test_resuming_with_another_network_names_the_changed_fields(tmp_path):
    run = resolve()
    other = dataclasses.replace(run.config, model=dataclasses.replace(run.model, base_features=8, features=(8, 16, 32)))
    with pytest.raises(ConfigError, match=r"model\.base_features, model\.features"):
        check_compatible({"config": to_dict(run.config)}, other, tmp_path)
    check_compatible({"config": to_dict(run.config)}, run.config, tmp_path)


SHIPPED_CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_resolves_against_a_plan(path):
    """A shipped config must not set a field its own settings ignore (e.g. val_batches with whole-case
    validation) nor disagree with a plan's topology."""
    config = load_config(path)
    is_2d = "2d" in path.name or len(config.data.patch_size or ()) == 2
    plan = PLAN_2D if is_2d else PLAN_3D
    if config.data.patch_size is not None:
        plan = plan | {"patch_size": list(config.data.patch_size)}
    run = resolve_run(config, plan, device_count=1, process_count=1)
    assert run.model.spatial_dims == plan["dim"]


@pytest.mark.parametrize("devices, processes", [(3, 2), (0, 1), (4, 0)])
def test_devices_that_the_processes_cannot_share_are_refused(devices, processes):
    with pytest.raises(ConfigError, match=r"cannot be shared by"):
        resolve(["augment.mode=none"], devices=devices, processes=processes)
