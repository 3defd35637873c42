import pytest

from medseg_jax.config import ConfigError, RunConfig, load_config, save_config


def test_defaults_are_nnunet(tmp_path):
    c = load_config()
    assert c.train.optimizer == "sgd" and c.train.learning_rate == 1e-2 and c.train.momentum == 0.99
    assert c.train.weight_decay == 3e-5 and c.train.grad_clip_norm == 12.0 and c.train.poly_power == 0.9
    assert c.data.foreground_fraction == 0.33 and c.inference.step_size == 0.5


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  spatial_dims: 2\n  features: [8, 16]\n  n_stages: 2\ntrain:\n  steps: 10\n")
    c = load_config(path, ["train.learning_rate=3e-4", "train.loss.batch_dice=true", "data.patch_size=[32, 48]"])
    assert c.model.spatial_dims == 2 and c.model.features == (8, 16)
    assert c.train.learning_rate == pytest.approx(3e-4) and c.train.loss.batch_dice is True
    assert c.data.patch_size == (32, 48) and c.train.steps == 10


def test_loader_workers_default_to_auto_and_take_a_count():
    assert load_config().data.num_workers == "auto"
    assert load_config(None, ["data.num_workers=3"]).data.num_workers == 3
    assert load_config(None, ["data.num_workers=0"]).data.num_workers == 0


def test_round_trip_through_yaml(tmp_path):
    c = load_config(None, ["model.strides=[[1,2,2],[2,2,2]]", "model.n_stages=2", "train.ema_decay=0.999"])
    assert c.model.spatial_dims is None  # topology fields stay null until resolved against a plan
    save_config(c, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == c


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr=1", "unknown config key(s) train.lr"),
        ("train.loss.smoothing=1", "train.loss.smoothing"),
        ("model.spatial_dims=4", "model.spatial_dims: 4 is not one of"),
        ("train.steps=ten", "train.steps: expected an integer"),
        ("train.steps=1.5", "train.steps: expected an integer"),
        ("model.deep_supervision=maybe", "model.deep_supervision: expected true or false"),
        ("data.patch_size=64", "data.patch_size: expected a list"),
        ("data.patch_size=[64, x]", "data.patch_size[1]: expected an integer"),
        ("train.optimizer=adam", "train.optimizer: 'adam' is not one of"),
        ("nosuchsection.x=1", "unknown config key(s) nosuchsection"),
        ("trainsteps", "must look like section.key=value"),
        ("train.learning_rate=-0.01", "train.learning_rate: -0.01 must be > 0.0"),  # gradient ascent
        ("train.steps=-5", "train.steps: -5 must be >= 1"),
        ("train.steps=0", "train.steps: 0 must be >= 1"),
        ("train.learning_rate=.nan", "train.learning_rate: expected a finite number"),
        ("train.weight_decay=.inf", "train.weight_decay: expected a finite number"),
        ("train.momentum=1.0", "train.momentum: 1.0 must be < 1.0"),
        ("train.ema_decay=1", "train.ema_decay: 1.0 must be < 1.0"),
        ("data.foreground_fraction=1.5", "data.foreground_fraction: 1.5 must be <= 1.0"),
        ("data.batch_size=0", "data.batch_size: 0 must be >= 1"),
        ("data.patch_size=[64, -64]", "data.patch_size[1]: -64 must be >= 1"),
        ("model.features=[8, 0]", "model.features[1]: 0 must be >= 1"),
        ("model.num_classes=1", "model.num_classes: 1 must be >= 2"),
        ("inference.step_size=0", "inference.step_size: 0.0 must be > 0.0"),
        ("inference.step_size=1.5", "inference.step_size: 1.5 must be <= 1.0"),
        ("train.val_every=0", "train.val_every: 0 must be >= 1"),
        ("mesh.data=-2", "mesh.data: -2 must be >= -1"),
        ("data.num_workers=-1", "data.num_workers: -1 must be >= 0"),
        ("data.num_workers=many", "data.num_workers: 'many' is not a valid int or 'auto'"),
        ("data.num_workers=1.5", "data.num_workers: 1.5 is not a valid int or 'auto'"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)


def test_bad_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(path)
    path.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key\(s\) train.stepz"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("train: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_every_field_has_help():
    import dataclasses
    import typing

    seen = []

    def walk(cls):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
            seen.append(f.name)
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name])

    walk(RunConfig)
    assert "dice_weight" in seen and "spatial_dims" in seen  # nested sections were visited
