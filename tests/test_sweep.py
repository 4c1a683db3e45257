"""sweep.py end to end on the tiny config: every run trained, scored and tabulated."""

import os

import pytest
import yaml

import sweep
from configuration import ConfigError


def write_sweep(tmp_path, tiny_config, runs):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"config": tiny_config, "out_dir": str(tmp_path / "sweep"), "runs": runs,
                                    "evaluate": ["--sampler", "ddpm", "--steps", "4", "--num_samples", "16"]}))
    return str(path)


def test_sweep_trains_scores_and_tabulates_each_run(tmp_path, tiny_config, capsys):
    path = write_sweep(tmp_path, tiny_config, {"base": {}, "short": {"train.steps": 3, "train.lr": 0.002}})
    sweep.main([path, "--jobs", "2", "--train.num_threads=1"])
    table = open(tmp_path / "sweep" / "summary.md").read().splitlines()
    assert len(table) == 4  # header, rule, one row per run
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table[2:]}
    assert sorted(rows["short"][1].split()) == ["train.lr=0.002", "train.steps=3"] and rows["short"][2] == "16 x 3"
    assert rows["base"][2] == "16 x 6"
    for name in ["base", "short"]:
        float(rows[name][4])  # an FID, not a failure note
        assert os.path.exists(tmp_path / "sweep" / name / "last.pt")


def test_sweep_file_mistakes_are_errors_before_any_training(tmp_path, tiny_config):
    with pytest.raises(ConfigError, match="unknown config key 'train.lrr'"):
        sweep.main([write_sweep(tmp_path, tiny_config, {"typo": {"train.lrr": 1}})])
    with pytest.raises(ConfigError, match="--only names unknown runs"):
        sweep.main([write_sweep(tmp_path, tiny_config, {"base": {}}), "--only", "bse"])
    assert not os.path.exists(tmp_path / "sweep" / "base")
