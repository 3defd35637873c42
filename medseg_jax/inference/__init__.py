"""Inference: sliding-window prediction (Gaussian blending, mirroring) and file -> file prediction.

``sliding_window`` needs only JAX; the file-level functions live in :mod:`medseg_jax.inference.predict`
(imported on demand so that using the sliding window does not pull in the data pipeline).
"""

from medseg_jax.inference.sliding_window import (  # noqa: F401  (public API)
    argmax_labels,
    compute_window_starts,
    gaussian_importance_map,
    sliding_window,
)
