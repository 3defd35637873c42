"""Optional side-by-side baseline: nnU-Net's own network (dynamic-network-architectures'
``PlainConvUNet``) trained in PyTorch with the same topology, patch, batch and dtype.

Never a dependency of medseg-jax: :func:`available` says whether ``torch`` and
``dynamic_network_architectures`` import, and the suite skips the baseline when they do not. On CPU
the network and data are channels-last (``channels_last`` / ``channels_last_3d``, oneDNN's fast path)
and ``torch.set_num_threads`` is set to the JAX run's thread count; bfloat16 runs under
``torch.autocast``.

The step: forward with deep supervision, loss = sum over outputs of nnU-Net's weights x (soft Dice
(foreground classes, smooth 1e-5) + cross-entropy) on nearest-downsampled labels, backward, gradient
norm clip 12, SGD (lr 1e-2, Nesterov momentum 0.99, weight decay 3e-5) -- nnU-Net's trainer step.
"""

from __future__ import annotations

import importlib.util
import os
import re

from medseg_jax.bench.timing import Prepared


def available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "dynamic_network_architectures"))


def versions() -> dict:
    import dynamic_network_architectures
    import torch

    return {
        "torch": torch.__version__,
        "dynamic_network_architectures": getattr(dynamic_network_architectures, "__version__", "unknown"),
    }


def jax_thread_count() -> int:
    """Threads XLA's CPU backend uses: ``intra_op_parallelism_threads=N`` from ``XLA_FLAGS`` when set
    (1 with ``--xla_cpu_multi_thread_eigen=false``), else every core this process may run on."""
    flags = os.environ.get("XLA_FLAGS", "")
    match = re.search(r"intra_op_parallelism_threads=(\d+)", flags)
    if match:
        return int(match.group(1))
    if "xla_cpu_multi_thread_eigen=false" in flags:
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def build_network(topology, deep_supervision: bool = True):
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    conv = torch.nn.Conv3d if topology.dims == 3 else torch.nn.Conv2d
    norm = torch.nn.InstanceNorm3d if topology.dims == 3 else torch.nn.InstanceNorm2d
    return PlainConvUNet(
        input_channels=topology.in_channels,
        n_stages=len(topology.features),
        features_per_stage=topology.features,
        conv_op=conv,
        kernel_sizes=3,
        strides=[list(s) for s in topology.strides],
        n_conv_per_stage=2,
        num_classes=topology.num_classes,
        n_conv_per_stage_decoder=2,
        conv_bias=True,
        norm_op=norm,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=torch.nn.LeakyReLU,
        nonlin_kwargs={"negative_slope": 1e-2, "inplace": True},
        deep_supervision=deep_supervision,
    )


def deep_supervision_loss(outputs, label, num_classes: int):
    """nnU-Net's weighted Dice + CE over the deep-supervision outputs (highest resolution first)."""
    import torch
    import torch.nn.functional as F

    if not isinstance(outputs, (list, tuple)):
        outputs = [outputs]
    weights = [1 / 2**i for i in range(len(outputs))]
    if len(weights) > 1:  # a single output keeps weight 1
        weights[-1] = 0.0
    total_weight = sum(weights)
    loss = 0.0
    for weight, logits in zip(weights, outputs):
        if weight == 0:
            continue
        stride = label.shape[1] // logits.shape[2]
        target = label[(slice(None),) + (slice(None, None, stride),) * (label.ndim - 1)]
        ce = F.cross_entropy(logits.float(), target)
        probs = torch.softmax(logits.float(), 1)
        onehot = F.one_hot(target, num_classes).movedim(-1, 1).float()
        axes = tuple(range(2, probs.ndim))
        inter = (probs * onehot).sum(axes)
        denom = probs.sum(axes) + onehot.sum(axes)
        dice = ((2 * inter + 1e-5) / (denom + 1e-5))[:, 1:].mean()
        loss = loss + weight / total_weight * (ce + 1 - dice)
    return loss


def prepare_train_step(topology, dtype: str, threads: int | None = None, device: str = "cpu") -> Prepared:
    """A PyTorch training step of ``topology`` ready to time; ``info`` has the parameter count.

    ``device="cuda"`` follows nnU-Net's GPU trainer instead: ``cudnn.benchmark``, channels-first
    tensors, and for ``dtype="bfloat16"`` nnU-Net's AMP (float16 autocast with a ``GradScaler``)."""
    import torch

    torch.set_num_threads(threads or jax_thread_count())
    torch.manual_seed(0)
    cuda = device == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    memory_format = torch.channels_last_3d if topology.dims == 3 else torch.channels_last
    if cuda:
        memory_format = torch.contiguous_format
    network = build_network(topology).to(device=device, memory_format=memory_format)
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    image = torch.randn(topology.batch, topology.in_channels, *topology.patch, device=device)
    image = image.to(memory_format=memory_format)
    label = torch.randint(0, topology.num_classes, (topology.batch, *topology.patch), device=device)
    autocast = dtype == "bfloat16"
    autocast_dtype = torch.float16 if cuda else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if cuda and autocast else None

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=autocast_dtype, enabled=autocast):
            outputs = network(image)
        loss = deep_supervision_loss(outputs, label, topology.num_classes)
        if scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), 12.0)
            optimizer.step()
        else:  # nnU-Net's order: scaled backward, unscale, clip, scaler step, update
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(network.parameters(), 12.0)
            scaler.step(optimizer)
            scaler.update()
        return loss.item()  # waits for the device: the step's time includes all of its work

    info = {
        "parameters": sum(p.numel() for p in network.parameters()),
        "threads": torch.get_num_threads(),
        "device": device,
        "autocast": str(autocast_dtype).removeprefix("torch.") if autocast else "off",
        **versions(),
    }
    return Prepared(step, info)


def prepare_forward(topology, dtype: str, threads: int | None = None, device: str = "cpu") -> Prepared:
    """PyTorch inference of ``topology`` ready to time: the network without deep supervision in eval
    mode under ``torch.inference_mode``, channels-last on CPU, ``dtype="bfloat16"`` under autocast
    (float16 on CUDA, as nnU-Net predicts) -- what nnU-Net's predictor runs per sliding window."""
    import torch

    torch.set_num_threads(threads or jax_thread_count())
    torch.manual_seed(0)
    cuda = device == "cuda"
    memory_format = (
        torch.contiguous_format if cuda else (torch.channels_last_3d if topology.dims == 3 else torch.channels_last)
    )
    network = build_network(topology, deep_supervision=False).to(device=device, memory_format=memory_format).eval()
    image = torch.randn(topology.batch, topology.in_channels, *topology.patch, device=device)
    image = image.to(memory_format=memory_format)
    autocast = dtype == "bfloat16"
    autocast_dtype = torch.float16 if cuda else torch.bfloat16

    def forward():
        with torch.inference_mode(), torch.autocast(device, dtype=autocast_dtype, enabled=autocast):
            network(image)
        if cuda:  # CPU calls return when done; a CUDA launch must be waited for, as JAX's side is
            torch.cuda.synchronize()

    info = {
        "threads": torch.get_num_threads(),
        "device": device,
        "autocast": str(autocast_dtype) if autocast else "off",
    }
    return Prepared(forward, {**info, **versions()})
