"""Config loading: clear errors for a missing file, an unknown key, a wrong type and a bad value."""

import pytest
import yaml

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


def test_constructor_defaults_are_the_schemas():
    import inspect

    from linear_noise_scheduler import LinearNoiseScheduler
    from unet import UNet

    for cls, section in [(UNet, "model"), (LinearNoiseScheduler, "diffusion")]:
        params = inspect.signature(cls).parameters
        assert set(params) == set(DEFAULTS[section]), cls
        for key, p in params.items():
            default = list(p.default) if isinstance(p.default, tuple) else p.default
            assert default == DEFAULTS[section][key], (cls.__name__, key)


def test_schema_defaults_are_the_papers_method():
    t, s = DEFAULTS["train"], DEFAULTS["sample"]
    assert (t["timestep_sampling"], t["loss_weighting"], t["guide_fraction"]) == ("uniform", "none", 0.0)
    assert (s["sampler"], s["steps"], s["autoguidance"], s["guidance"]) == ("ddpm", 0, 1.0, 1.0)
    assert DEFAULTS["diffusion"] == {"num_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                                    "prediction": "eps"}


def test_configuration_prints_the_resolved_config_and_every_key(capsys):
    import configuration

    configuration.main(["config/default.yaml", "--train.lr=0.003"])
    out = capsys.readouterr().out
    printed = yaml.safe_load(out.split("\n# every key")[0])
    assert printed == load_config("config/default.yaml", ["train.lr=0.003"])
    table = out.split("# every key")[1]
    for section, keys in DEFAULTS.items():
        for key in keys:
            assert f"\n{section}.{key} " in table, f"{section}.{key}"
    assert "0.003 (default 0.0002)" in table


def test_project_modules_import_no_script_and_form_no_cycle():
    """Modules import each other as a DAG; a command-line script is imported by no module."""
    import ast
    import glob
    import os

    names = {os.path.basename(p)[:-3] for p in glob.glob("*.py")}
    imports = {}
    for name in names:
        tree = ast.parse(open(f"{name}.py").read())
        found = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        found |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imports[name] = found & names - {name}
    scripts = {"train", "sample", "evaluate", "benchmark", "sweep"}
    for name, deps in imports.items():
        assert not deps & scripts, f"{name} imports the script(s) {deps & scripts}"
    done, visiting = set(), []

    def visit(name):
        assert name not in visiting, f"import cycle: {' -> '.join(visiting + [name])}"
        if name not in done:
            visiting.append(name)
            for dep in imports[name]:
                visit(dep)
            visiting.pop()
            done.add(name)

    for name in imports:
        visit(name)
