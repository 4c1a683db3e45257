"""Config loading: clear errors for a missing file, an unknown key, a wrong type and a bad value."""

import pytest

from configuration import DEFAULTS, ConfigError, load_config, split_overrides


def test_default_config_loads_and_overrides_apply():
    cfg = load_config("config/default.yaml", ["train.lr=3e-4", "model.dropout=0.1", "train.steps=7"])
    assert cfg["train"]["lr"] == 3e-4 and cfg["model"]["dropout"] == 0.1 and cfg["train"]["steps"] == 7
    assert set(cfg) == set(DEFAULTS)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("config/nope.yaml")


def test_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lrr'.*train\.lr,"):
        load_config("config/default.yaml", ["train.lrr=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  widths: [1, 2]\n")
    with pytest.raises(ConfigError, match="model.widths"):
        load_config(str(bad))


@pytest.mark.parametrize("override, match", [
    ("train.steps=1.5", "train.steps must be a int"),
    ("train.lr=fast", "train.lr must be a float"),
    ("model.channels=16", "model.channels must be a list"),
    ("model.attention=[1, 0, 1]", "model.attention must be a list of bool"),
])
def test_wrong_type(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("config/default.yaml", [override])


@pytest.mark.parametrize("override, match", [
    ("train.lr=-1.0", "train.lr must be > 0"),
    ("train.lr_schedule=linear", "train.lr_schedule must be one of"),
    ("diffusion.beta_end=2.0", "beta_end"),
    ("model.norm_groups=5", "model.norm_groups"),
    ("model.channels=[16, 32, 64, 64]", "model.image_size"),
    ("sample.steps=5000", "sample.steps"),
])
def test_bad_value(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("config/default.yaml", [override])


def test_split_overrides():
    rest, over = split_overrides(["--config", "c.yaml", "--train.lr=1e-3", "--model.dropout", "0.1", "--val", "True"])
    assert rest == ["--config", "c.yaml", "--val", "True"]
    assert over == ["train.lr=1e-3", "model.dropout=0.1"]
