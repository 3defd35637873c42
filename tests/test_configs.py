"""The preset run configs: every YAML in configs/ loads into a RunConfig (so a typo in a shipped config
fails CI), the package carries identical copies, and ``--config`` takes a preset's bare name."""

from pathlib import Path

import pytest

from medseg_jax.cli import main as cli_main
from medseg_jax.config import load_config
from medseg_jax.configs import PRESET_DIR, preset_names, preset_path, resolve_config
from medseg_jax.errors import ConfigError

SOURCE = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(SOURCE.glob("*.yaml"))


def test_configs_folder_is_not_empty():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "2d.yaml", "3d_fullres.yaml", "tpu_pod.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    config = load_config(path)
    assert config.train.steps > 0
    text = path.read_text()
    assert "medseg-jax" in text  # each config says the command that runs it


def test_packaged_presets_are_byte_identical_to_configs():
    packaged = sorted(PRESET_DIR.glob("*.yaml"))
    assert [p.name for p in packaged] == [p.name for p in CONFIGS], "medseg_jax/configs/ must hold every configs/*.yaml"
    for source in CONFIGS:
        assert not source.is_symlink(), f"configs/{source.name} is the source: a file, not a link to the copy"
        assert (PRESET_DIR / source.name).read_bytes() == source.read_bytes(), (
            f"medseg_jax/configs/{source.name} differs from configs/{source.name}: copy configs/{source.name} "
            "over it (the package ships the copy)"
        )


def test_bare_preset_names_resolve_to_the_packaged_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here: as after installing a wheel
    assert preset_names() == sorted(p.stem for p in CONFIGS)
    for name in preset_names():
        packaged = PRESET_DIR / f"{name}.yaml"
        assert resolve_config(name) == resolve_config(f"{name}.yaml") == preset_path(name) == packaged
    own = tmp_path / "demo.yaml"  # a file of the user's with a preset's name wins over the preset
    own.write_text("train:\n  steps: 7\n")
    assert resolve_config("demo.yaml") == Path("demo.yaml")
    assert load_config(resolve_config("demo.yaml")).train.steps == 7


def test_unknown_config_is_an_error_naming_the_presets(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for value in ("3d_fulres", "configs/3d_fullres.yaml", str(tmp_path / "missing.yaml")):
        with pytest.raises(ConfigError, match="not a preset name.*2d, 3d_fullres, demo, tpu_pod"):
            resolve_config(value)
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        preset_path("nope")
    with pytest.raises(SystemExit) as exc:
        cli_main(["config", "--config", "3d_fulres"])
    assert exc.value.code == 2
    assert "argument --config: 3d_fulres: no such config file, and not a preset name" in capsys.readouterr().err


def test_config_command_prints_a_preset_by_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["config", "--config", "3d_fullres"]) == 0
    by_name = capsys.readouterr().out
    assert cli_main(["config", "--config", str(SOURCE / "3d_fullres.yaml")]) == 0
    assert by_name == capsys.readouterr().out
