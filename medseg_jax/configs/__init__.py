"""The preset run configs shipped with the package, so that ``--config 3d_fullres`` works from an
installed wheel as well as from a clone.

The source of each preset is the repository's ``configs/`` folder; the YAML files beside this module
are byte-for-byte copies of it (``tests/test_configs.py`` fails when they differ: after editing a file
in ``configs/``, copy it here). They are package data (``pyproject.toml``), so wheels carry them.
"""

from __future__ import annotations

import os
from pathlib import Path

from medseg_jax.errors import ConfigError

PRESET_DIR = Path(__file__).resolve().parent


def preset_names() -> list[str]:
    """The names ``--config`` accepts instead of a path, e.g. ``["2d", "3d_fullres", "demo", "tpu_pod"]``."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    """The packaged YAML file of preset ``name``; a ConfigError naming the presets otherwise."""
    path = PRESET_DIR / f"{name}.yaml"
    if name not in preset_names():
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(preset_names())}")
    return path


def resolve_config(value: str | os.PathLike) -> Path:
    """What a ``--config`` value names: a file or folder that exists (as given, so a file of the user's
    always wins), else a bare preset name with or without ``.yaml`` (``3d_fullres``,
    ``3d_fullres.yaml``). Anything else is a ConfigError that names the available presets."""
    path = Path(value)
    if path.exists():
        return path
    name = path.name.removesuffix(".yaml")
    if path.parent == Path(".") and name in preset_names():
        return preset_path(name)
    raise ConfigError(
        f"{value}: no such config file, and not a preset name; give the path of a YAML file or "
        f"one of the presets: {', '.join(preset_names())}"
    )
