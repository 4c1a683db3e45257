"""Runs that cannot be lost: killed (kill -9) or preempted (SIGTERM) and resumed, a run ends with the
weights of one that never stopped. Tiny config, real processes, as a cluster would run them."""

import csv
import os
import signal
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ["--train.steps=14", "--train.eval_every=2", "--train.num_threads=1"]


def start(config, out, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    return subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), "--config", config, "--device", "cpu",
                             f"--train.out_dir={out}", *STEPS, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def logged_steps(out):
    try:
        with open(os.path.join(out, "log.csv")) as f:
            return len(list(csv.DictReader(f)))
    except (OSError, csv.Error):
        return 0


def wait_for_step(proc, out, step, timeout=120):
    """Wait until the run has logged `step` steps (or has ended)."""
    deadline = time.monotonic() + timeout
    while logged_steps(out) < step and proc.poll() is None:
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.02)


def final(out):
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert ckpt["step"] == 14
    return ckpt


def assert_same_run(a, b):
    for key in ["model", "ema"]:
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), (key, name)


def test_killed_at_several_points_and_resumed_equals_uninterrupted(tiny_config, tmp_path):
    whole = str(tmp_path / "whole")
    assert start(tiny_config, whole).wait(timeout=300) == 0
    killed = str(tmp_path / "killed")
    args = []
    for kill_at in [3, 6, 11]:  # between checkpoints, and right after one
        proc = start(tiny_config, killed, *args)
        wait_for_step(proc, killed, kill_at)
        proc.kill()  # SIGKILL: no handler runs, whatever was being written stays half written
        proc.wait()
        args = ["--resume"] if os.path.exists(os.path.join(killed, "last.pt")) else ["--overwrite"]
    proc = start(tiny_config, killed, *args)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert_same_run(final(whole), final(killed))
    assert not [f for f in os.listdir(killed) if ".tmp" in f]


def test_sigterm_saves_the_step_exits_143_and_resumes_exactly(tiny_config, tmp_path):
    whole = str(tmp_path / "whole")
    assert start(tiny_config, whole).wait(timeout=300) == 0
    stopped = str(tmp_path / "stopped")
    proc = start(tiny_config, stopped)
    wait_for_step(proc, stopped, 5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    saved = torch.load(os.path.join(stopped, "last.pt"), weights_only=True)
    assert 5 <= saved["step"] < 14 and saved["step"] == logged_steps(stopped)  # the step it was in, not an older one
    assert "SIGTERM: stopping after this step" in out + err and "Traceback" not in err
    proc = start(tiny_config, stopped, "--resume")
    assert proc.wait(timeout=300) == 0
    assert_same_run(final(whole), final(stopped))
