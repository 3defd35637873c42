"""Interchangeable implementations of the U-Net's hot operations behind one interface each:
:mod:`.conv` (3^d convolution), :mod:`.upsample` (kernel == stride upsampling, with a Pallas kernel in
:mod:`.upsample_pallas`, imported only when that implementation is called) and :mod:`.select` (what
``"auto"`` means per backend).

Timing lives in modules imported on request only, so that importing a model stays light:
:mod:`.timing` (the round-robin timer) and :mod:`.autotune` (per-op timings and their on-disk cache);
a whole model's layers are tuned above the models, in :mod:`medseg_jax.bench.model_tuning`.
"""

from medseg_jax.kernels.conv import CONV_IMPLEMENTATIONS, conv  # noqa: F401
from medseg_jax.kernels.select import AUTO_PREFERENCES, default_implementation, resolve  # noqa: F401
from medseg_jax.kernels.upsample import UPSAMPLE_IMPLEMENTATIONS, upsample  # noqa: F401
