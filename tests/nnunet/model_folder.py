"""Small nnU-Net v2 model folders written without torch or nnU-Net (test helper).

``plans.json`` and ``dataset.json`` as nnU-Net writes them, and ``fold_X/checkpoint_final.pth`` whose
``network_weights`` are medseg-jax parameters mapped back to nnU-Net's state-dict keys and layouts
(with the alias keys nnU-Net's modules register twice). The parity with real nnU-Net is tested on the
fixtures of ``make_fixtures.py``; these folders exercise everything else (the CLI, errors, ensembles).
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np

from medseg_jax.nnunet.convert import weight_map
from tests.nnunet.torch_format import write_pth


def arch_kwargs(dims: int = 3, encoder: str = "plain", n_stages: int = 3, features=(4, 8, 8)) -> dict:
    """``arch_kwargs`` of a small PlainConvUNet / ResidualEncoderUNet as nnU-Net's planners write them."""
    strides = [[1] * dims] + [[2] * dims] * (n_stages - 1)
    kwargs = {
        "n_stages": n_stages,
        "features_per_stage": list(features),
        "conv_op": f"torch.nn.modules.conv.Conv{dims}d",
        "kernel_sizes": [[3] * dims] * n_stages,
        "strides": strides,
        "n_conv_per_stage_decoder": [1] * (n_stages - 1),
        "conv_bias": True,
        "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dims}d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    if encoder == "plain":
        kwargs["n_conv_per_stage"] = [2] * n_stages
    else:
        kwargs["n_blocks_per_stage"] = [1] + [2] * (n_stages - 1)
    return kwargs


CLASS = {
    "plain": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "residual": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
}


def plans(configuration: str, kwargs: dict, encoder: str, patch, spacing, transpose=(0, 1, 2)) -> dict:
    return {
        "dataset_name": "Dataset999_Test",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": list(spacing),
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": list(transpose),
        "transpose_backward": [int(i) for i in np.argsort(transpose)],
        "configurations": {
            configuration: {
                "data_identifier": f"nnUNetPlans_{configuration}",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": list(patch),
                "median_image_size_in_voxels": list(patch),
                "spacing": list(spacing),
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {
                    "is_seg": False,
                    "order": 1,
                    "order_z": 0,
                    "force_separate_z": None,
                },
                "architecture": {
                    "network_class_name": CLASS[encoder],
                    "arch_kwargs": kwargs,
                    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
                },
                "batch_dice": False,
            }
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {
                "max": 400.0,
                "mean": 60.0,
                "median": 58.0,
                "min": -200.0,
                "percentile_00_5": -100.0,
                "percentile_99_5": 250.0,
                "std": 45.0,
            }
        },
    }


DATASET_JSON = {
    "channel_names": {"0": "CT"},
    "labels": {"background": 0, "liver": 1, "tumour": 2},
    "numTraining": 4,
    "file_ending": ".nii.gz",
}


def state_dict(arch, in_channels: int, num_classes: int, seed: int) -> collections.OrderedDict:
    """Random weights in nnU-Net's keys and PyTorch layouts (aliases included, as nnU-Net saves them)."""
    rng = np.random.default_rng(seed)
    out: collections.OrderedDict = collections.OrderedDict()
    for weight in weight_map(arch, in_channels, num_classes):
        if weight.key is None:
            continue
        scale = 1.0 if weight.kind == "vector" else 0.3
        value = rng.normal(size=weight.torch_shape).astype(np.float32) * scale
        if weight.key.endswith("norm.weight"):
            value = 1.0 + 0.1 * value
        out[weight.key] = value
        if ".conv." in weight.key or ".norm." in weight.key:  # ConvDropoutNormReLU.all_modules duplicates
            index = "0" if ".conv." in weight.key else "1"
            alias = weight.key.replace(".conv.", f".all_modules.{index}.").replace(".norm.", f".all_modules.{index}.")
            out[alias] = value
        if weight.key.startswith("encoder."):  # the decoder keeps a reference to the encoder
            out["decoder." + weight.key] = value
    return out


def write_model_folder(
    root: Path,
    arch,
    kwargs: dict,
    configuration: str,
    patch,
    spacing,
    folds=(0,),
    mirror_axes=(0, 1, 2),
    transpose=(0, 1, 2),
    trainer: str = "nnUNetTrainer",
) -> Path:
    """``root/Dataset999_Test/{trainer}__nnUNetPlans__{configuration}`` with one checkpoint per fold."""
    folder = root / "Dataset999_Test" / f"{trainer}__nnUNetPlans__{configuration}"
    folder.mkdir(parents=True)
    plan = plans(configuration, kwargs, arch.encoder, patch, spacing, transpose)
    (folder / "plans.json").write_text(json.dumps(plan, indent=2))
    (folder / "dataset.json").write_text(json.dumps(DATASET_JSON, indent=2))
    for fold in folds:
        (folder / f"fold_{fold}").mkdir()
        checkpoint = {
            "network_weights": state_dict(arch, 1, 3, seed=fold),
            "optimizer_state": {"state": {}, "param_groups": [{"lr": 0.01, "momentum": 0.99, "nesterov": True}]},
            "logging": {"train_losses": [np.float64(0.8)], "ema_fg_dice": [np.float64(0.1)]},
            "_best_ema": None,
            "current_epoch": 1,
            "init_args": {"plans": plan, "configuration": configuration, "fold": fold, "dataset_json": DATASET_JSON},
            "trainer_name": trainer,
            "inference_allowed_mirroring_axes": None if mirror_axes is None else tuple(mirror_axes),
        }
        write_pth(folder / f"fold_{fold}" / "checkpoint_final.pth", checkpoint)
    return folder
