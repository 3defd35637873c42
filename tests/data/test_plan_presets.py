"""nnU-Net's ResEnc planner presets and the 3d_lowres configuration (medseg_jax.data.planners) on hand-made
fingerprints, against numbers derived from nnU-Net's planner rules."""

import json
import math

import pytest

from medseg_jax.cli import main
from medseg_jax.data.plan import make_plan, read_plan, write_plan
from medseg_jax.data.planners import CONFIGURATIONS, PRESET_NAMES, PRESETS, resenc_feature_map_size
from medseg_jax.errors import ConfigError, DataError

LABELS = {"background": 0, "liver": 1, "tumour": 2}


def _fingerprint(spacing, shape, cases=10):
    return {
        "dataset_name": "Dataset001_Test",
        "channel_names": ["CT"],
        "labels": dict(LABELS),
        "spacings": [list(spacing)] * cases,
        "shapes_after_crop": [list(shape)] * cases,
        "foreground_intensity_properties_per_channel": {
            "0": {"mean": 50.0, "std": 20.0, "percentile_00_5": -80.0, "percentile_99_5": 250.0}
        },
    }


ISO_128 = _fingerprint([1.0, 1.0, 1.0], [128, 128, 128])
CT_512 = _fingerprint([0.8, 0.8, 0.8], [512, 512, 400])  # a large CT: 3d_fullres patches see little of it
THICK = _fingerprint([0.8, 0.8, 3.0], [512, 512, 100], cases=20)
STRIDES_3D = [[1, 1, 1]] + [[2, 2, 2]] * 5


def test_feature_map_estimate_reproduces_the_values_printed_in_nnunets_source():
    # residual_encoder_unet_planners.py prints compute_conv_feature_map_size of two ResidualEncoderUNets with
    # 3 classes and deep supervision: 558319104 for 128^3 (3D, 6 stages) and 129793792 for 512^2 (2D, 7
    # stages). The planner builds its networks without deep supervision, which drops one 3-class head per
    # lower-resolution decoder stage (at 64^3, 32^3, 16^3, 8^3; at 256^2 ... 16^2).
    ds_heads_3d = 3 * sum((128 // 2**s) ** 3 for s in range(1, 5))
    estimate = resenc_feature_map_size(
        [128] * 3, STRIDES_3D, [32, 64, 128, 256, 320, 320], [1, 3, 4, 6, 6, 6], [1] * 5, 3
    )
    assert estimate + ds_heads_3d == 558319104
    ds_heads_2d = 3 * sum((512 // 2**s) ** 2 for s in range(1, 6))
    estimate = resenc_feature_map_size(
        [512] * 2, [[1, 1]] + [[2, 2]] * 6, [32, 64, 128, 256, 512, 512, 512], [1, 3, 4, 6, 6, 6, 6], [1] * 6, 3
    )
    assert estimate + ds_heads_2d == 129793792


def test_resenc_m_3d_by_hand():
    # nnUNetPlannerResEncM on 10 cases of 128^3 at 1 mm, 3 labels:
    # - initial patch: 256^3 (equal extent per axis), clipped to the median 128^3;
    # - get_pool_and_conv_props: 128 -> 64 -> 32 -> 16 -> 8 -> 4 (pool while >= 8): 5 poolings, 6 stages,
    #   features min(32 * 2^i, 320), blocks (1, 3, 4, 6, 6, 6), one conv per decoder stage;
    # - estimate (V_s = 128^3 / 8^s voxels at stage s): stem 32 V0 + stage 0: 2*1 convs x 32 V0 + stage s > 0:
    #   (2 b_s + 1 projection) f_s V_s, i.e. 7*64 V1 + 9*128 V2 + 13*256 V3 + 13*320 (V4 + V5); decoder:
    #   (1 conv + 1 transposed conv) f_t V_t for t = 4..0; head 3 V0. Sum 557420544 <= 680e6: no shrinking;
    # - batch round(680e6 / 557420544 * 2) = round(2.44) = 2, below the cap round(10 * 128^3 / 128^3) = 10.
    plan = make_plan(ISO_128, preset="resenc-m")
    v = [128**3 // 8**s for s in range(6)]
    hand = 32 * v[0] + 2 * 32 * v[0] + 7 * 64 * v[1] + 9 * 128 * v[2] + 13 * 256 * v[3] + 13 * 320 * (v[4] + v[5])
    hand += 2 * (320 * v[4] + 256 * v[3] + 128 * v[2] + 64 * v[1] + 32 * v[0]) + 3 * v[0]
    assert hand == 557420544
    assert (
        resenc_feature_map_size(
            plan["patch_size"],
            plan["strides"],
            plan["features_per_stage"],
            plan["n_blocks_per_stage"],
            plan["n_conv_per_stage_decoder"],
            3,
        )
        == hand
    )
    assert plan["patch_size"] == [128, 128, 128] and plan["batch_size"] == 2
    assert plan["strides"] == STRIDES_3D and plan["kernel_sizes"] == [[3, 3, 3]] * 6
    assert plan["features_per_stage"] == [32, 64, 128, 256, 320, 320]
    assert plan["encoder"] == "residual" and plan["n_blocks_per_stage"] == [1, 3, 4, 6, 6, 6]
    assert plan["n_conv_per_stage_decoder"] == [1] * 5
    assert plan["target_spacing"] == [1.0, 1.0, 1.0]
    assert (plan["preset"], plan["configuration"]) == ("resenc-m", "3d_fullres")
    # L and XL fill more memory with the same patch: round(2.1e9 / 557420544 * 2) = 8, and
    # round(3.6e9 / 557420544 * 2) = 13 capped to the 10 patches that hold the whole dataset (coverage 100%)
    assert make_plan(ISO_128, preset="resenc-l")["batch_size"] == 8
    assert make_plan(ISO_128, preset="resenc-xl")["batch_size"] == 10


@pytest.mark.parametrize(
    "preset, patch, batch, strides_z",
    [
        # estimate of the final patch / reference: 609969920 / 680e6, 1829036160 / 2.1e9, 3345168384 / 3.6e9
        ("resenc-m", [128, 160, 112], 2, [1, 2, 2, 2, 2, 1]),
        ("resenc-l", [192, 224, 160], 2, [1, 2, 2, 2, 2, 2]),
        ("resenc-xl", [256, 256, 192], 2, [1, 2, 2, 2, 2, 2, 1]),
    ],
)
def test_resenc_3d_patch_shrinks_to_the_presets_memory(preset, patch, batch, strides_z):
    plan = make_plan(CT_512, preset=preset)
    assert plan["patch_size"] == patch and plan["batch_size"] == batch
    assert [s[2] for s in plan["strides"]] == strides_z
    n = len(strides_z)
    assert plan["n_stages"] == n and plan["features_per_stage"] == [min(32 * 2**i, 320) for i in range(n)]
    assert plan["n_blocks_per_stage"] == [1, 3, 4] + [6] * (n - 3) and plan["n_conv_per_stage_decoder"] == [1] * (n - 1)
    reference = PRESETS[preset].reference(3, PRESETS[preset].gpu_memory_gb)
    estimate = resenc_feature_map_size(
        patch, plan["strides"], plan["features_per_stage"], plan["n_blocks_per_stage"], [1] * (n - 1), 3
    )
    assert estimate <= reference and round(reference / estimate * 2) == batch


@pytest.mark.parametrize("preset, batch", [("resenc-m", 12), ("resenc-l", 35), ("resenc-xl", 52)])
def test_resenc_2d_uses_the_2d_reference_and_batch(preset, batch):
    # 512^2 fits every preset: 8 stages (512 -> 4), estimate 129703936; batch round(ref_2d / 129703936 * 12):
    # 135e6 -> 12.49 -> 12, 380e6 -> 35.2 -> 35, 560e6 -> 51.8 -> 52
    plan = make_plan(CT_512, dim=2, preset=preset)
    assert plan["patch_size"] == [512, 512] and plan["batch_size"] == batch and plan["n_stages"] == 8
    assert plan["features_per_stage"] == [32, 64, 128, 256, 512, 512, 512, 512]
    assert plan["n_blocks_per_stage"] == [1, 3, 4, 6, 6, 6, 6, 6] and plan["configuration"] == "2d"


def test_resenc_keeps_the_default_target_spacing_and_thick_slice_topology():
    default, resenc = make_plan(THICK), make_plan(THICK, preset="resenc-m")
    assert resenc["target_spacing"] == default["target_spacing"] == [0.8, 0.8, 3.0]
    assert resenc["kernel_sizes"][0] == [3, 3, 1] and resenc["strides"][1] == [2, 2, 1]
    assert resenc["patch_size"] == [192, 224, 40] and resenc["batch_size"] == 2


def test_gpu_memory_scales_the_reference_and_defaults_to_the_presets():
    assert make_plan(CT_512, preset="resenc-l", gpu_memory_gb=24) == make_plan(CT_512, preset="resenc-l")
    # L at 12 GB: reference 2.1e9 * 12 / 24 = 1.05e9, so the patch shrinks below L's 24 GB one
    small = make_plan(CT_512, preset="resenc-l", gpu_memory_gb=12)
    estimate = resenc_feature_map_size(
        small["patch_size"],
        small["strides"],
        small["features_per_stage"],
        small["n_blocks_per_stage"],
        small["n_conv_per_stage_decoder"],
        3,
    )
    assert estimate <= 1.05e9 and math.prod(small["patch_size"]) < math.prod([192, 224, 160])


def test_3d_lowres_for_a_large_ct_by_hand():
    # default preset: budget 2 * 128^3 voxels per batch, so the 3d_fullres patch is 128^3, which holds
    # 2097152 / (512 * 512 * 400) = 2% of the median image (< 25%). Isotropic: every axis grows 3% per
    # step; the patch stays 128^3 while the median shrinks by 1.03^3 per step, so the patch holds 25% once
    # 1.03^(3k) >= 0.25 * 512 * 512 * 400 / 128^3 = 12.5, i.e. k >= ln(12.5) / (3 ln 1.03) = 28.5: k = 29,
    # spacing 0.8 * 1.03^29 = 1.885 mm, median round(512 / 1.03^29) = 217, round(400 / 1.03^29) = 170 —
    # 12.5x fewer voxels than 3d_fullres (nnU-Net keeps 3d_lowres from 2x)
    plan = make_plan(CT_512, configuration="3d_lowres")
    assert plan["dim"] == 3 and plan["configuration"] == "3d_lowres" and plan["preset"] == "default"
    assert plan["target_spacing"] == pytest.approx([0.8 * 1.03**29] * 3)
    assert plan["fullres_spacing"] == [0.8, 0.8, 0.8]
    assert plan["median_shape"] == [217, 217, 170] and plan["patch_size"] == [128, 128, 128]
    assert plan["batch_size"] == 2


def test_3d_lowres_first_coarsens_the_axes_more_than_2x_finer():
    # 0.8 x 0.8 x 3 mm: only x, y grow (3 / 0.8 > 2) — 21 steps of 3% to 1.488 mm, still more than 2x finer
    plan = make_plan(THICK, configuration="3d_lowres")
    assert plan["target_spacing"] == pytest.approx([0.8 * 1.03**21, 0.8 * 1.03**21, 3.0])
    assert plan["fullres_spacing"] == [0.8, 0.8, 3.0] and plan["median_shape"] == [275, 275, 100]
    assert math.prod(plan["patch_size"]) >= 0.25 * math.prod([512 / 1.03**21, 512 / 1.03**21, 100])


def test_3d_lowres_with_a_resenc_preset_records_its_network():
    # ResEnc M's 3d_fullres patch 128 x 160 x 112 holds 2.19% of the median image. Re-planned at each coarser
    # spacing it stays the same (the median stays larger than it), so it holds 25% once
    # 1.03^(3k) >= 0.25 / 0.0219 = 11.4: k = 28, median round(512 / 1.03^28) = 224, round(400 / 1.03^28) = 175
    plan = make_plan(CT_512, dim=3, configuration="3d_lowres", preset="resenc-m")
    assert plan["fullres_spacing"] == [0.8, 0.8, 0.8] and plan["encoder"] == "residual"
    assert plan["target_spacing"] == pytest.approx([0.8 * 1.03**28] * 3)
    assert plan["median_shape"] == [224, 224, 175] and plan["patch_size"] == [128, 160, 112]
    assert plan["n_blocks_per_stage"] == [1, 3, 4, 6, 6, 6]


def test_3d_lowres_is_refused_naming_the_numbers_when_nnunet_plans_none():
    with pytest.raises(ConfigError, match=r"needs no 3d_lowres: the 3d_fullres patch \[128, 128, 128\] holds 100%"):
        make_plan(ISO_128, configuration="3d_lowres")
    # 220^3: the 128^3 patch holds 19.7%; 3 steps reach 25% at 201^3, only 1.30x fewer voxels: nnU-Net drops it
    with pytest.raises(
        ConfigError, match=r"\[201, 201, 201\] is only 1.30x smaller than 3d_fullres's \[220, 220, 220\]"
    ):
        make_plan(_fingerprint([1.0, 1.0, 1.0], [220, 220, 220]), configuration="3d_lowres")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"preset": "resenc-s"}, r"preset 'resenc-s' is unknown; choose one of default, resenc-m"),
        ({"preset": "resenc-m", "voxel_budget": 1000}, r"voxel_budget sizes the default planner"),
        ({"configuration": "3d_cascade"}, r"configuration '3d_cascade' is unknown"),
        ({"configuration": "3d_cascade_fullres"}, r"no 3d_cascade_fullres without its first stage: this dataset needs"),
        ({"dim": 2, "configuration": "3d_lowres"}, r"dim 2 does not match configuration '3d_lowres', which is 3D"),
        ({"gpu_memory_gb": 0}, r"gpu_memory_gb must be a positive number"),
        ({"preset": "resenc-m", "gpu_memory_gb": 1e-7}, r"gpu_memory_gb=1e-07 is too small for preset 'resenc-m'"),
    ],
)
def test_bad_planner_options_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        make_plan(ISO_128, **options)


def test_preset_plans_round_trip_and_bad_fields_are_refused(tmp_path):
    plan = make_plan(CT_512, configuration="3d_lowres", preset="resenc-l")
    path = write_plan(plan, tmp_path / "plan.json")
    assert read_plan(path) == json.loads(json.dumps(plan))
    broken = {
        "encoder": "dense",
        "n_blocks_per_stage": [1, 3],
        "n_conv_per_stage_decoder": [1, 0, 1, 1, 1],
        "configuration": "2d",
        "preset": "huge",
        "fullres_spacing": [0.8, 0.8],
    }
    for key, value in broken.items():
        bad = tmp_path / f"bad_{key}.json"
        bad.write_text(json.dumps(plan | {key: value}))
        with pytest.raises(DataError, match=rf"bad_{key}\.json: .*'?{key}'?"):
            read_plan(bad)


def test_plan_command_offers_every_preset_and_configuration(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in (*PRESET_NAMES, *CONFIGURATIONS))


def test_plan_command_writes_a_preset_plan_that_config_resolves_and_refuses_what_nnunet_would_not_plan(
    tmp_path, capsys
):
    import yaml

    assert main(["synth", str(tmp_path / "raw"), "--cases", "2", "--shape", "32", "32", "8"]) == 0
    dataset = tmp_path / "raw" / "Dataset001_SynthLiver"
    conflicts = [
        (["--dim", "2", "--configuration", "3d_lowres"], "dim 2 does not match configuration '3d_lowres'"),
        (["--preset", "resenc-l", "--voxel-budget", "1000"], "voxel_budget sizes the default planner"),
        (["--gpu-memory-gb", "0"], "gpu_memory_gb must be a positive number"),
    ]
    for args, message in conflicts:  # refused before the fingerprint: nothing is written
        assert main(["plan", str(dataset), *args]) == 2
        assert message in capsys.readouterr().err
    assert not (dataset / "fingerprint.json").exists()

    assert main(["plan", str(dataset), "--preset", "resenc-m"]) == 0
    plan = json.loads((dataset / "plan_3d_resenc-m.json").read_text())
    assert (plan["preset"], plan["configuration"], plan["encoder"]) == ("resenc-m", "3d_fullres", "residual")
    assert main(["plan", str(dataset), "--configuration", "3d_lowres"]) == 2
    assert "needs no 3d_lowres" in capsys.readouterr().err and not (dataset / "plan_3d_lowres.json").exists()

    capsys.readouterr()
    plan_path = str(dataset / "plan_3d_resenc-m.json")
    assert main(["config", "--plan", plan_path, "--set", "augment.mode=none", "--devices", "1"]) == 0
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    assert model["encoder"] == "residual" and model["n_blocks_per_stage"] == plan["n_blocks_per_stage"]
    assert model["n_conv_per_stage_decoder"] == plan["n_conv_per_stage_decoder"]
