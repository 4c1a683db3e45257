"""Scale on the CPU: torchrun/DDP (gloo) against a single process, AMP, channels-last, compile."""

import csv
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import train
import train_util
from configuration import ConfigError, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(config, *args, nproc=2):
    """`torchrun --nproc_per_node=nproc train.py --config config ...` on the CPU, as a user runs it."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", os.path.join(REPO, "train.py"), "--config", config,
                           "--device", "cpu", *args], env=env, capture_output=True, text=True, timeout=300)


def weights(path, key="model"):
    return torch.load(path, map_location="cpu", weights_only=True)[key]


def assert_same_weights(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=lambda m: f"{k}: {m}")


def out_dir(config, name):
    return os.path.join(os.path.dirname(load_config(config)["train"]["out_dir"]), name)


def first_moment(path):
    """AdamW's first moment, a fixed mix of the (clipped, unless train.grad_clip=0) gradients of the
    steps so far. Three steps, because the UNet's output layers start at zero: at step 1 only the last
    one has a gradient; each step lets the gradient reach one zero layer further in.""" 
    return {i: s["exp_avg"] for i, s in weights(path, "optimizer")["state"].items()}


def logged(folder, name, column):
    return [float(r[column]) for r in csv.DictReader(open(os.path.join(folder, name)))]


# Why these tolerances hold on any machine. A two-process run averages two half-batch gradients over
# gloo; one process sums the whole batch. The two differ only in the order of float32 additions, by
# far less than 1e-4 of a tensor's largest gradient, so three steps' reduced gradients compare to
# that. Weights after several steps do not: AdamW divides by the root of the second moment, so a
# parameter whose gradient is rounding noise moves by up to a learning-rate-sized step either way,
# on rounding alone. Such a parameter has (by definition) no first-order effect on the loss, so the
# losses of the two runs still agree to 1e-4, while any real difference (another batch, other noise
# or timesteps, a lost RNG state, a wrong shard) changes them by percents.
# Neither clipping nor AdamW's steps show the scale of the reduced gradient (a sum over ranks where a
# mean belongs would double it): the two-process tests turn clipping off, compare AdamW's first moment
# and the logged gradient norm.
GRAD_RTOL, LOSS_RTOL = 1e-4, 1e-4
NO_CLIP = "--train.grad_clip=0"


def test_two_process_step_reduces_the_gradient_a_single_process_takes(tiny_config):
    ddp, single = out_dir(tiny_config, "ddp1"), out_dir(tiny_config, "single1")
    r = torchrun(tiny_config, "--train.steps=3", NO_CLIP, f"--train.out_dir={ddp}")
    assert r.returncode == 0, r.stderr[-3000:]
    train.main(["--config", tiny_config, "--train.steps=3", NO_CLIP, f"--train.out_dir={single}"])
    a, b = first_moment(os.path.join(ddp, "last.pt")), first_moment(os.path.join(single, "last.pt"))
    assert a.keys() == b.keys()
    for i in a:
        scale = b[i].abs().max().item()
        assert scale > 0, i
        torch.testing.assert_close(a[i], b[i], atol=GRAD_RTOL * scale, rtol=0, msg=lambda m: f"param {i}: {m}")
    assert logged(ddp, "log.csv", "grad_norm") == pytest.approx(logged(single, "log.csv", "grad_norm"), rel=GRAD_RTOL)


def test_two_process_run_equals_single_process_run(tiny_config):
    ddp, single = out_dir(tiny_config, "ddp"), out_dir(tiny_config, "single")
    r = torchrun(tiny_config, "--val", "True", NO_CLIP, f"--train.out_dir={ddp}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "x 2 processes" in r.stdout and r.stdout.count("model:") == 1  # rank 0 alone reports
    train.main(["--config", tiny_config, "--val", "True", NO_CLIP, f"--train.out_dir={single}"])

    assert sorted(f for f in os.listdir(ddp) if f.endswith(".pt")) == ["best.pt", "last.pt"]
    # one log, written once, with the losses a single process sees at every step
    for name in ["log.csv", "val.csv"]:
        assert logged(ddp, name, "step") == logged(single, name, "step")
    assert logged(ddp, "log.csv", "loss") == pytest.approx(logged(single, "log.csv", "loss"), rel=LOSS_RTOL)
    # the reduced gradient at every step, by its norm (the weights it acts on agree to rounding)
    assert logged(ddp, "log.csv", "grad_norm") == pytest.approx(logged(single, "log.csv", "grad_norm"), rel=1e-3)
    # the validation loss reduced over both ranks equals the single-process one
    val = [list(csv.DictReader(open(os.path.join(d, "val.csv")))) for d in (ddp, single)]
    for a, b in zip(*val):
        for k in a:
            assert float(a[k]) == pytest.approx(float(b[k]), rel=LOSS_RTOL, abs=1e-6), k
    assert sorted(os.listdir(os.path.join(ddp, "samples"))) == sorted(os.listdir(os.path.join(single, "samples")))


def test_checkpoints_move_between_ddp_and_single_process(tiny_config):
    full, ddp_first, single_first = (out_dir(tiny_config, n) for n in ["full", "ddp_first", "single_first"])
    train.main(["--config", tiny_config, f"--train.out_dir={full}"])
    # DDP for 3 of the 6 steps, then one process for the rest
    assert torchrun(tiny_config, "--train.steps=3", f"--train.out_dir={ddp_first}").returncode == 0
    train.main(["--config", tiny_config, "--resume", "--train.steps=6", f"--train.out_dir={ddp_first}"])
    # and the other way round
    train.main(["--config", tiny_config, "--train.steps=3", f"--train.out_dir={single_first}"])
    r = torchrun(tiny_config, "--resume", "--train.steps=6", f"--train.out_dir={single_first}")
    assert r.returncode == 0, r.stderr[-3000:]
    full_losses = logged(full, "log.csv", "loss")
    for d in (ddp_first, single_first):
        ckpt = torch.load(os.path.join(d, "last.pt"), map_location="cpu", weights_only=True)
        assert ckpt["step"] == 6 and ckpt["model"].keys() == weights(os.path.join(full, "last.pt")).keys()
        assert logged(d, "log.csv", "step") == [1, 2, 3, 4, 5, 6]
        # steps 4-6 ran after the switch: same batches, noise and timesteps, the same losses
        assert logged(d, "log.csv", "loss") == pytest.approx(full_losses, rel=LOSS_RTOL)


def test_global_batch_that_does_not_divide_is_a_clear_error(tiny_config):
    r = torchrun(tiny_config, "--train.batch_size=15", f"--train.out_dir={out_dir(tiny_config, 'odd')}")
    assert r.returncode != 0
    assert "train.batch_size 15 is the global batch: it must divide by the 2 processes" in r.stderr
    assert "Traceback" not in r.stderr.split("error: train.batch_size")[0][-2000:]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_trains_and_keeps_float32_weights(tiny_config, amp):
    train.main(["--config", tiny_config, f"--train.amp={amp}"])
    ckpt = torch.load(os.path.join(load_config(tiny_config)["train"]["out_dir"], "last.pt"), weights_only=True)
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values() if v.is_floating_point())
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    log = list(csv.DictReader(open(os.path.join(load_config(tiny_config)["train"]["out_dir"], "log.csv"))))
    assert len(log) == 6 and all(float(r["loss"]) > 0 for r in log)
    if amp == "fp16":  # the gradient scaler's state travels with the checkpoint
        assert ckpt["scaler"]["scale"] > 0
    else:
        assert ckpt["scaler"] == {}


def test_fp16_run_resumes_exactly_with_its_gradient_scaler(tiny_config, monkeypatch):
    full, resumed = out_dir(tiny_config, "full"), out_dir(tiny_config, "resumed")
    # a growth interval of 2 makes the scale change within 6 steps, so a lost scaler state would show
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device: real(device, init_scale=2.0**4, growth_interval=2))
    train.main(["--config", tiny_config, "--train.amp=fp16", f"--train.out_dir={full}"])
    train.main(["--config", tiny_config, "--train.amp=fp16", "--train.steps=3", f"--train.out_dir={resumed}"])
    scale_at_3 = torch.load(os.path.join(resumed, "last.pt"), weights_only=True)["scaler"]["scale"]
    train.main(["--config", tiny_config, "--resume", "--train.steps=6", f"--train.out_dir={resumed}"])
    a, b = (torch.load(os.path.join(d, "last.pt"), weights_only=True) for d in (full, resumed))
    assert scale_at_3 != a["scaler"]["scale"] == b["scaler"]["scale"]
    assert_same_weights(a["model"], b["model"], atol=0)


def assert_same_training(a, b, steps):
    """Two runs of one config that differ only in how the arithmetic is laid out: AdamW's first moment
    after three steps (when steps == 3) and the same losses, to the rounding bounds argued above."""
    if steps == 3:
        ga, gb = first_moment(os.path.join(a, "last.pt")), first_moment(os.path.join(b, "last.pt"))
        for i in ga:
            torch.testing.assert_close(ga[i], gb[i], atol=GRAD_RTOL * gb[i].abs().max().item(), rtol=0)
    assert logged(a, "log.csv", "loss") == pytest.approx(logged(b, "log.csv", "loss"), rel=LOSS_RTOL)


@pytest.mark.parametrize("steps", [3, 6])
def test_channels_last_gives_the_same_training(tiny_config, steps):
    a, b = out_dir(tiny_config, "nchw"), out_dir(tiny_config, "nhwc")
    train.main(["--config", tiny_config, f"--train.steps={steps}", f"--train.out_dir={a}"])
    train.main(["--config", tiny_config, f"--train.steps={steps}", "--train.channels_last=true",
                f"--train.out_dir={b}"])
    assert_same_training(a, b, steps)


def test_unsupported_amp_is_a_config_error(monkeypatch):
    def autocast_that_warns(device_type, dtype=None, **kwargs):
        warnings.warn("In CPU autocast, but the target dtype is not supported. Disabling autocast.")
        return torch.autocast(device_type, dtype=dtype, **kwargs)

    monkeypatch.setattr(train_util.torch, "autocast", autocast_that_warns)
    with pytest.raises(ConfigError, match=r"train.amp=fp16 is not supported on cpu .*use train.amp=off"):
        train_util.amp_dtype("fp16", torch.device("cpu"))
    assert train_util.amp_dtype("off", torch.device("cpu")) is None


def test_yaml_off_means_amp_off(tmp_path, tiny_config):
    assert load_config(tiny_config, ["train.amp=off"])["train"]["amp"] == "off"
    with pytest.raises(ConfigError, match="train.amp must be one of"):
        load_config(tiny_config, ["train.amp=fp8"])


def test_compile_without_a_compiler_is_a_config_error(monkeypatch):
    monkeypatch.setattr(train_util.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="needs a C.. compiler"):
        train_util.check_compile(torch.device("cpu"))


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_training_matches_eager(tiny_config):
    # One level, no attention: inductor's cold compile is most of this test's time (70 s -> 38 s on
    # 2 cores) and grows with the number of distinct layers, not with what the comparison needs.
    one_level = ["--train.steps=3", "--model.channels=[8]", "--model.attention=[false]", "--model.mid_attention=false"]
    a, b = out_dir(tiny_config, "eager"), out_dir(tiny_config, "compiled")
    train.main(["--config", tiny_config, *one_level, f"--train.out_dir={a}"])
    train.main(["--config", tiny_config, *one_level, "--train.compile=true", f"--train.out_dir={b}"])
    assert_same_training(a, b, 3)


def test_under_torchrun_rank_0_chooses_the_budget_step_count_for_every_rank(tiny_config):
    """Ranks that trained different step counts would hang in a collective or stop apart; with rank 0's
    count broadcast the run ends at that count, once, on both ranks."""
    out = out_dir(tiny_config, "ddp_budget")
    r = torchrun(tiny_config, "--train.time_budget=25s", "--train.eval_every=50", f"--train.out_dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("time budget 25s: trained") == 1
    steps = int(r.stdout.split("time budget 25s: trained ")[1].split(" steps")[0])
    ckpt = torch.load(os.path.join(out, "last.pt"), map_location="cpu", weights_only=True)
    assert ckpt["step"] == steps == ckpt["config"]["train"]["steps"] > 6
    assert logged(out, "log.csv", "step")[-1] == steps
