"""Interchangeable implementations of the U-Net's hot operations behind one interface each, and the
selection of the fastest: :mod:`.conv` (3^d convolution), :mod:`.upsample` (kernel == stride
upsampling, with a Pallas kernel in :mod:`.upsample_pallas`), :mod:`.select` (what ``"auto"`` means
per backend) and :mod:`.autotune` (timing, on-disk cache, per-model choice)."""

from medseg_jax.kernels.autotune import OpCase, autotune_case, autotune_model, cache_path, layer_cases  # noqa: F401
from medseg_jax.kernels.conv import CONV_IMPLEMENTATIONS, conv  # noqa: F401
from medseg_jax.kernels.select import BACKEND_DEFAULTS, default_implementation, resolve  # noqa: F401
from medseg_jax.kernels.upsample import UPSAMPLE_IMPLEMENTATIONS, upsample  # noqa: F401
