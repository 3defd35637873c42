"""Interchangeable implementations of the U-Net's hot operations behind one interface each."""

from medseg_jax.kernels.upsample import UPSAMPLE_IMPLEMENTATIONS, upsample  # noqa: F401
