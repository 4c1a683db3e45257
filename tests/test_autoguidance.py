"""Autoguidance (Karras et al. 2024): train.py keeps an early EMA snapshot as the guide, the
samplers steer away from it. Tiny model, synthetic data."""

import os
import shutil

import pytest
import torch

import evaluate
import sample
import train
import train_util
from conftest import randomised
from configuration import ConfigError, guide_step, load_config
from fileio import build, load_guide, load_model
from samplers import generate

GUIDE = ["--train.guide_fraction=0.5"]  # of the tiny config's 6 steps: the EMA of step 3


def run_dir(config):
    return load_config(config)["train"]["out_dir"]


def keep_checkpoints(monkeypatch, tmp_path, steps):
    """Copy last.pt as train.py writes it at each of `steps` to tmp_path/step<k>/last.pt."""
    real_save = train_util.save_checkpoint

    def save_and_keep(path, state):
        real_save(path, state)
        if state["step"] in steps and path.endswith("last.pt"):
            os.makedirs(tmp_path / f"step{state['step']}", exist_ok=True)
            shutil.copy(path, tmp_path / f"step{state['step']}" / "last.pt")

    monkeypatch.setattr(train_util, "save_checkpoint", save_and_keep)
    return real_save


def test_guide_step_follows_the_fraction():
    assert guide_step({"guide_fraction": 0.0, "guide_min_step": 0, "guide_step": 0, "steps": 3900}) is None
    assert guide_step({"guide_fraction": 0.23, "guide_min_step": 0, "guide_step": 0, "steps": 3900}) == 897
    assert guide_step({"guide_fraction": 0.01, "guide_min_step": 0, "guide_step": 0, "steps": 10}) == 1  # never step 0 (the untrained net)


@pytest.mark.parametrize("steps, expected", [(3900, 897),  # 23 % is past the minimum: the fraction rules
                                             (1000, 400),  # 23 % (230) is too early: the minimum
                                             (689, 344),  # the minimum is past half the run: half
                                             (10, 5)])
def test_a_short_runs_guide_is_taken_later(steps, expected):
    assert guide_step({"guide_fraction": 0.23, "guide_min_step": 400, "guide_step": 0, "steps": steps}) == expected
    assert guide_step({"guide_fraction": 0.0, "guide_min_step": 400, "guide_step": 0, "steps": steps}) is None  # no guide asked


def test_guide_is_the_ema_of_its_step_and_is_kept(tiny_config, tmp_path, monkeypatch):
    keep_checkpoints(monkeypatch, tmp_path, {2, 3})
    train.main(["--config", tiny_config, "--train.eval_every=1"] + GUIDE)
    at2 = torch.load(tmp_path / "step2" / "last.pt", weights_only=True)
    at3 = torch.load(tmp_path / "step3" / "last.pt", weights_only=True)
    final = torch.load(os.path.join(run_dir(tiny_config), "last.pt"), weights_only=True)
    assert at2["guide"] is None  # not made yet
    for name, value in at3["ema"].items():
        assert torch.equal(final["guide"][name], value), name
        assert torch.equal(at3["guide"][name], value), name
    assert any(not torch.equal(final["ema"][n], v) for n, v in final["guide"].items())  # the model moved on


@pytest.mark.parametrize("resume_at", [2, 4])  # before the guide is made, after it
def test_resumed_run_has_the_uninterrupted_runs_guide(tiny_config, tmp_path, monkeypatch, resume_at):
    real_save = keep_checkpoints(monkeypatch, tmp_path, {resume_at})
    train.main(["--config", tiny_config, "--train.eval_every=2"] + GUIDE)
    monkeypatch.setattr(train_util, "save_checkpoint", real_save)
    resumed_dir = tmp_path / f"step{resume_at}"
    train.main(["--config", tiny_config, "--resume", f"--train.out_dir={resumed_dir}"])
    full = torch.load(os.path.join(run_dir(tiny_config), "last.pt"), weights_only=True)
    resumed = torch.load(resumed_dir / "last.pt", weights_only=True)
    for key in ["ema", "guide"]:
        for name, value in full[key].items():
            assert torch.equal(value, resumed[key][name]), (key, name)


def test_autoguidance_weights_one_and_zero(tiny_config):
    """w = 1 is the model alone, w = 0 the guide alone; in between, neither."""
    torch.manual_seed(0)
    model, scheduler = build(load_config(tiny_config))
    guide, _ = build(load_config(tiny_config))
    model, guide = randomised(model).eval(), randomised(guide).eval()
    kw = dict(seed=3, sampler="ddpm", steps=5, progress=False, batch_size=4)
    plain = generate(model, scheduler, 4, **kw)
    guide_alone = generate(guide, scheduler, 4, **kw)
    assert torch.equal(generate(model, scheduler, 4, guide=guide, autoguidance=1.0, **kw), plain)
    assert torch.allclose(generate(model, scheduler, 4, guide=guide, autoguidance=0.0, **kw), guide_alone, atol=1e-5)
    guided = generate(model, scheduler, 4, guide=guide, autoguidance=2.0, **kw)
    assert not torch.allclose(guided, plain, atol=1e-3) and not torch.allclose(guided, guide_alone, atol=1e-3)
    with pytest.raises(ConfigError, match="guide"):
        generate(model, scheduler, 4, autoguidance=2.0, **kw)


def test_sample_cli_with_and_without_guide(tiny_config):
    train.main(["--config", tiny_config] + GUIDE)
    out = run_dir(tiny_config)
    sample.main(["--config", tiny_config, "--sampler", "ddpm", "--steps", "4", "--autoguidance", "2"])
    assert os.path.exists(os.path.join(out, "samples_ddpm_4_ag2.png"))
    train.main(["--config", tiny_config, "--overwrite"])  # no guide this time
    with pytest.raises(ConfigError, match="no autoguidance guide.*autoguidance 1"):
        sample.main(["--config", tiny_config, "--autoguidance", "2"])
    sample.main(["--config", tiny_config, "--sampler", "ddpm", "--steps", "4"])  # default autoguidance 1: fine


def test_evaluate_samples_as_the_checkpoints_config_says(tiny_config):
    train.main(["--config", tiny_config, "--sample.sampler=ddpm", "--sample.autoguidance=2.0"] + GUIDE)
    path = os.path.join(run_dir(tiny_config), "last.pt")
    args = evaluate.parse_args(["--ckpt", path, "--num_samples", "4"])
    images, _ = evaluate.sample_from_checkpoint(args)
    assert (args.sampler, args.steps, args.autoguidance) == ("ddpm", 4, 2.0)
    model, scheduler, _ = load_model(path)
    expected = generate(model, scheduler, 4, sampler="ddpm", steps=4, progress=False,
                        guide=load_guide(path, 2.0), autoguidance=2.0)
    assert torch.equal(images, expected)
    args = evaluate.parse_args(["--ckpt", path, "--num_samples", "4", "--autoguidance", "1"])
    assert not torch.equal(evaluate.sample_from_checkpoint(args)[0], expected)


def test_guide_fraction_out_of_range_is_a_config_error(tiny_config):
    with pytest.raises(ConfigError, match="guide_fraction"):
        train.main(["--config", tiny_config, "--train.guide_fraction=1.0"])
    with pytest.raises(ConfigError, match="autoguidance"):
        train.main(["--config", tiny_config, "--sample.autoguidance=-1"] + GUIDE)
    with pytest.raises(ConfigError, match="needs a guide"):
        train.main(["--config", tiny_config, "--sample.autoguidance=2"])  # and no train.guide_fraction
