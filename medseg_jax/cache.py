"""The per-user cache folder: ``$MEDSEG_JAX_CACHE`` when set, else ``$XDG_CACHE_HOME/medseg_jax``
(``~/.cache/medseg_jax`` without it). It holds autotune timings and compiled native kernels: things
that are slow to make and safe to delete."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    if os.environ.get("MEDSEG_JAX_CACHE"):
        return Path(os.environ["MEDSEG_JAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "medseg_jax"
