"""End to end on a tiny model and synthetic data: train, sample, resume, reproducibility, failures."""

import csv
import os
import shutil

import pytest
import torch
from PIL import Image

import sample
import train
import train_util
from configuration import ConfigError, load_config
from fileio import build, load_model
from linear_noise_scheduler import sample_timesteps
from samplers import generate


def run_dir(config):
    return load_config(config)["train"]["out_dir"]


def test_train_then_sample_end_to_end(tiny_config, tmp_path, capsys):
    train.main(["--config", tiny_config, "--val", "True"])
    out = run_dir(tiny_config)
    for name in ["last.pt", "best.pt", "log.csv", "val.csv", "config.yaml", "samples/step_000003.png",
                 "samples/step_000006.png"]:
        assert os.path.exists(os.path.join(out, name)), name
    rows = list(csv.DictReader(open(os.path.join(out, "log.csv"))))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "lr", "grad_norm", "img_per_s"} <= set(rows[0])
    val = list(csv.DictReader(open(os.path.join(out, "val.csv"))))
    assert [int(r["step"]) for r in val] == [3, 6]
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert ckpt["step"] == 6 and {"model", "ema", "optimizer", "rng", "config"} <= set(ckpt)
    assert not [f for f in os.listdir(out) if ".tmp" in f]

    images = tmp_path / "pngs"
    sample.main(["--config", tiny_config, "--num_samples", "5", "--save_images", str(images), "--sampler", "ddpm",
                 "--steps", "20"])
    pngs = sorted(os.listdir(images))
    assert len(pngs) == 5
    img = Image.open(images / pngs[0])
    assert img.size == (28, 28) and img.mode == "L"
    for name in ["samples_ddpm_20.png", "samples_ddpm_20_strip.png", "samples_ddpm_20_denoising.gif"]:
        assert os.path.exists(os.path.join(out, name)), name
    sample.main(["--config", tiny_config, "--from_val", "True", "--num_samples", "2", "--sampler", "dpm++"])
    assert os.path.exists(os.path.join(out, "samples_dpmpp_4.png"))


def test_resumed_run_equals_uninterrupted_run(tiny_config, tmp_path, monkeypatch):
    """Keep the step-3 checkpoint of a 6-step run, resume it elsewhere: same final weights."""
    saved = tmp_path / "resumed"
    saved.mkdir()
    real_save = train_util.save_checkpoint

    def save_and_keep_step_3(path, state):
        real_save(path, state)
        if state["step"] == 3 and path.endswith("last.pt"):
            shutil.copy(path, saved / "last.pt")

    monkeypatch.setattr(train_util, "save_checkpoint", save_and_keep_step_3)
    train.main(["--config", tiny_config])
    monkeypatch.setattr(train_util, "save_checkpoint", real_save)
    train.main(["--config", tiny_config, "--resume", f"--train.out_dir={saved}"])

    full = torch.load(os.path.join(run_dir(tiny_config), "last.pt"), weights_only=True)
    resumed = torch.load(saved / "last.pt", weights_only=True)
    assert resumed["step"] == full["step"] == 6
    for key in ["model", "ema"]:
        for name, value in full[key].items():
            assert torch.equal(value, resumed[key][name]), (key, name)
    rows = list(csv.DictReader(open(saved / "log.csv")))
    assert [int(r["step"]) for r in rows] == [4, 5, 6]


def test_existing_run_is_not_overwritten_silently(tiny_config):
    train.main(["--config", tiny_config, "--train.steps=3"])
    with pytest.raises(ConfigError, match="--resume"):
        train.main(["--config", tiny_config, "--train.steps=3"])
    train.main(["--config", tiny_config, "--train.steps=3", "--overwrite"])


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_config, monkeypatch):
    real_loss, calls = train_util.diffusion_loss, []

    def loss_turning_nan(*args, **kwargs):
        per_sample, loss = real_loss(*args, **kwargs)
        calls.append(1)
        return per_sample, loss * float("nan") if len(calls) > 4 else loss

    monkeypatch.setattr(train_util, "diffusion_loss", loss_turning_nan)
    with pytest.raises(train_util.TrainingDiverged, match=r"nan.*last good checkpoint.*step 3"):
        train.main(["--config", tiny_config])
    ckpt = torch.load(os.path.join(run_dir(tiny_config), "last.pt"), weights_only=True)
    assert ckpt["step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0), ("dpm++", 0.0)])
def test_sampling_is_independent_of_batch_size_and_count(tiny_config, sampler, eta):
    torch.manual_seed(0)
    model, scheduler = build(load_config(tiny_config))
    model.eval()
    kw = dict(seed=7, sampler=sampler, steps=5, eta=eta, progress=False)
    all5 = generate(model, scheduler, 5, batch_size=5, **kw)
    by2 = generate(model, scheduler, 5, batch_size=2, **kw)
    first3 = generate(model, scheduler, 3, batch_size=3, **kw)
    assert torch.allclose(all5, by2, atol=1e-5)
    assert torch.allclose(all5[:3], first3, atol=1e-5)
    other_seed = generate(model, scheduler, 3, batch_size=3, **dict(kw, seed=8))
    assert not torch.allclose(first3, other_seed)
    assert all5.min() >= -1 and all5.max() <= 1


def test_sample_uses_ema_weights_and_rebuilds_from_checkpoint(tiny_config):
    train.main(["--config", tiny_config, "--train.steps=3"])
    path = os.path.join(run_dir(tiny_config), "last.pt")
    model, _, cfg = load_model(path)
    ckpt = torch.load(path, weights_only=True)
    assert cfg == ckpt["config"] == load_config(tiny_config, ["train.steps=3"])
    for name, value in model.state_dict().items():
        assert torch.equal(value, ckpt["ema"][name])


def test_command_line_errors_are_messages(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="unknown config key"):
        train.main(["--config", tiny_config, "--train.nope=1"])
    with pytest.raises(FileNotFoundError, match="train first"):
        sample.main(["--config", tiny_config])
    with pytest.raises(ConfigError, match="not found"):
        train.main(["--config", str(tmp_path / "missing.yaml")])


def test_ctrl_c_stops_between_steps_and_resumes_exactly(tiny_config, tmp_path, monkeypatch):
    """Ctrl-C during step 4 finishes that step, saves it, and a resumed run ends where an
    uninterrupted one does."""
    import signal

    real_ema_update, calls = train_util.ema_update, []
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job

    def ema_update_then_ctrl_c(*args):
        real_ema_update(*args)
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGINT)

    interrupted = tmp_path / "interrupted"
    monkeypatch.setattr(train_util, "ema_update", ema_update_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        train.main(["--config", tiny_config, f"--train.out_dir={interrupted}"])
    assert torch.load(interrupted / "last.pt", weights_only=True)["step"] == 4
    monkeypatch.setattr(train_util, "ema_update", real_ema_update)
    train.main(["--config", tiny_config, f"--train.out_dir={interrupted}", "--resume"])
    train.main(["--config", tiny_config])
    full = torch.load(os.path.join(run_dir(tiny_config), "last.pt"), weights_only=True)
    resumed = torch.load(interrupted / "last.pt", weights_only=True)
    for name, value in full["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back


def test_logit_normal_timesteps_stay_in_range_and_shift_with_the_mean():
    cfg = {"timestep_sampling": "logit_normal", "logit_normal_std": 1.0, "stratified_timesteps": False}
    low = sample_timesteps(20000, 1000, {**cfg, "logit_normal_mean": -1.0}, "cpu")
    mid = sample_timesteps(20000, 1000, {**cfg, "logit_normal_mean": 0.0}, "cpu")
    for t in (low, mid):
        assert t.dtype == torch.long and 0 <= t.min() and t.max() <= 999
    assert abs(mid.float().median() - 500) < 15  # sigmoid(N(0, 1)) has median 1/2
    assert low.float().median() < 300  # sigmoid(-1) = 0.27
    uniform = sample_timesteps(20000, 1000, {"timestep_sampling": "uniform", "stratified_timesteps": False}, "cpu")
    assert uniform.bincount(minlength=1000).min() > 0


def test_uniform_share_mixes_that_share_of_uniform_draws_into_a_logit_normal_batch():
    torch.manual_seed(0)
    cfg = {"timestep_sampling": "logit_normal", "logit_normal_std": 1.0, "logit_normal_mean": -0.5,
           "stratified_timesteps": False}
    # P(t < 50) under the mixture: share * 0.05 + (1 - share) * P(sigmoid(N(-0.5, 1)) < 0.05)
    p_logit = torch.special.ndtr(torch.logit(torch.tensor(0.05)) + 0.5).item()
    for share in (0.0, 0.25, 1.0):
        t = torch.cat([sample_timesteps(64, 1000, {**cfg, "uniform_share": share}, "cpu") for _ in range(400)])
        assert len(t) == 400 * 64 and 0 <= t.min() and t.max() <= 999
        expected = share * 0.05 + (1 - share) * p_logit
        assert abs((t < 50).float().mean().item() - expected) < 0.006
    # stratified: the uniform part of a batch of 8 at share 1/2 is one draw per quarter
    t = sample_timesteps(8, 1000, {**cfg, "uniform_share": 0.5, "stratified_timesteps": True}, "cpu")
    assert sorted((t[:4] // 250).tolist()) == [0, 1, 2, 3]


def test_stratified_timesteps_take_one_draw_per_quantile_band_of_the_same_distribution():
    torch.manual_seed(0)
    uniform = {"timestep_sampling": "uniform", "stratified_timesteps": True}
    assert torch.equal(sample_timesteps(1000, 1000, uniform, "cpu"), torch.arange(1000))  # band i is [i, i+1)
    cfg = {"timestep_sampling": "logit_normal", "logit_normal_std": 1.0, "logit_normal_mean": -1.0}
    strat = torch.stack([sample_timesteps(64, 1000, {**cfg, "stratified_timesteps": True}, "cpu")
                         for _ in range(500)]).float()
    plain = torch.stack([sample_timesteps(64, 1000, {**cfg, "stratified_timesteps": False}, "cpu")
                         for _ in range(500)]).float()
    # draw i of a batch lies in the i-th 1/64 quantile band of sigmoid(N(-1, 1)), scaled to 0..999
    edges = torch.sigmoid(torch.special.ndtri(torch.arange(65) / 64) - 1.0) * 1000
    assert ((strat >= edges[:-1].floor() - 1) & (strat <= edges[1:].ceil())).all()
    assert abs(strat.mean() - plain.mean()) < 10  # the same distribution (mean ~300, batch std ~22)
    assert strat.mean(1).std() < plain.mean(1).std() / 5  # but the batch means barely vary


def test_sample_cli_writes_the_digits_generate_gives_and_repeats_them_under_a_seed(tiny_config, tmp_path):
    """Content, not existence: the saved PNGs are exactly the 8-bit images of generate() from the
    checkpoint's EMA weights, the grid has their layout, and the same seed gives the same files."""
    import numpy as np

    from mnist import to_uint8

    train.main(["--config", tiny_config, "--train.steps=3"])
    out = run_dir(tiny_config)
    args = ["--config", tiny_config, "--num_samples", "6", "--sampler", "ddpm", "--steps", "5", "--seed", "3"]
    sample.main(args + ["--save_images", str(tmp_path / "a")])
    sample.main(args + ["--save_images", str(tmp_path / "b")])
    model, scheduler, _ = load_model(os.path.join(out, "last.pt"))
    want = to_uint8(generate(model, scheduler, 6, seed=3, sampler="ddpm", steps=5, progress=False))[:, 0]
    for i in range(6):
        a = np.array(Image.open(tmp_path / "a" / f"{i:05d}.png"))
        assert a.shape == (28, 28) and a.dtype == np.uint8
        assert np.array_equal(a, want[i].numpy()), i
        assert np.array_equal(a, np.array(Image.open(tmp_path / "b" / f"{i:05d}.png")))
    grid = Image.open(os.path.join(out, "samples_ddpm_5.png"))
    assert grid.size == (2 * (6 * 30 + 2), 2 * 30 + 2 * 2)  # one row of 6 cells of 28 + 2 padding, scaled 2x
    assert len(set(np.array(grid).ravel().tolist())) > 2  # digits, not a blank or binary image


def test_damaged_or_foreign_checkpoints_are_one_line_errors_that_name_a_good_one(tiny_config, tmp_path):
    train.main(["--config", tiny_config, "--train.steps=3", "--val", "True"])
    out = run_dir(tiny_config)
    last = os.path.join(out, "last.pt")
    good = open(last, "rb").read()
    cases = {"truncated": good[: len(good) // 2], "not a checkpoint": b"just some bytes\n" * 100}
    for name, data in cases.items():
        open(last, "wb").write(data)
        for call in (lambda: sample.main(["--config", tiny_config]),
                     lambda: train.main(["--config", tiny_config, "--resume"])):
            with pytest.raises(ConfigError, match=r"last.pt is damaged or not a checkpoint.*best.pt"):
                call()
    # a pickle that would run code on loading is refused, not run
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"model": Payload(), "ema": {}, "optimizer": {}, "step": 1, "config": {}}, last, pickle_module=pickle)
    with pytest.raises(ConfigError, match="holds pickled code or objects, which are never loaded"):
        sample.main(["--config", tiny_config])
    assert not (tmp_path / "pwned").exists()
    torch.save({"weights": torch.zeros(2)}, last)  # a tensor file, but not this project's checkpoint
    with pytest.raises(ConfigError, match="is not a checkpoint of this project"):
        sample.main(["--config", tiny_config])
