"""The time budget: it plans the step count, re-plans it while the machine's speed drifts, ends on
time, and the count it saves repeats the run bit for bit."""

import os

import pytest
import torch

import train
import train_util
from configuration import ConfigError, DEFAULTS, load_config


def run_dir(config):
    return load_config(config)["train"]["out_dir"]


# ----------------------------------------------------------------------------
# The planner on a simulated clock
# ----------------------------------------------------------------------------

class Clock:
    """A fake time.monotonic / time.perf_counter that only moves when told to."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def simulate(monkeypatch, seconds_per_step, budget=600.0, start_up=12.0, calibrated=0.2, eval_s=3.0,
             eval_every=700, **t_overrides):
    """Run BudgetPlanner through a loop shaped like train.py's whose step at time s takes
    seconds_per_step(s). Returns (end time, time the loop had when planned, steps, step at which the count
    was last changed)."""
    clock = Clock()
    monkeypatch.setattr(train_util.time, "monotonic", clock)
    monkeypatch.setattr(train_util.time, "perf_counter", clock)
    t_cfg = {**DEFAULTS["train"], "time_budget": str(budget), "lr_schedule": "wsd", "eval_every": eval_every,
             **t_overrides}
    clock.now = start_up
    planner = train_util.BudgetPlanner(t_cfg, 0.0, calibrated, eval_s, torch.device("cpu"))
    step, last_change = 0, 0
    while step < t_cfg["steps"]:
        if planner.look(step):
            last_change = step
        clock.now += seconds_per_step(clock.now)
        step += 1
        if step % eval_every == 0 or step == t_cfg["steps"]:
            clock.now += eval_s
            planner.evaluated(eval_s)
    return clock.now, planner.finish_at * budget - start_up, t_cfg, last_change


SPEEDS = {  # seconds per step against the time since start, for a run calibrated at 0.2 s per step
    "as calibrated": lambda s: 0.2,
    "calibrated on a loaded machine (30 % slow), then quiet": lambda s: 0.2 / 1.3,
    "20 % slower from the middle on": lambda s: 0.2 if s < 300 else 0.24,
    "20 % faster from the middle on": lambda s: 0.2 if s < 300 else 0.2 / 1.2,
    "drifting 20 % slower over the run": lambda s: 0.2 * (1 + 0.2 * s / 600),
    "20 % slower in the last fifth": lambda s: 0.2 if s < 480 else 0.24,
    "20 % faster in the last fifth": lambda s: 0.2 if s < 480 else 0.2 / 1.2,
}


@pytest.mark.parametrize("speed", SPEEDS, ids=list(SPEEDS))
def test_a_drifting_machine_spends_its_budget_and_does_not_overrun(monkeypatch, speed):
    end, planned, t_cfg, _ = simulate(monkeypatch, SPEEDS[speed])
    assert end <= 1.03 * 600  # train.py never overruns by more than 3 %
    assert end - 12.0 >= 0.95 * planned  # the loop uses at least 95 % of the time planned for it


def test_the_count_changes_only_while_nothing_trained_depends_on_it(monkeypatch):
    end, _, t_cfg, last_change = simulate(monkeypatch, SPEEDS["20 % slower from the middle on"])
    assert last_change > 0  # it did re-plan
    assert last_change <= train_util.first_step_using_steps(t_cfg)  # ... but never past the wsd decay's start
    # while the guide's step follows the count (guide_fraction), the count may not pass it; once the guide
    # is kept (train.py then sets train.guide_step), re-planning goes on to the decay
    _, _, t_cfg, last_change = simulate(monkeypatch, SPEEDS["20 % slower from the middle on"], guide_fraction=0.23)
    assert 0 < last_change <= train_util.guide_step(t_cfg) - 1
    # the cosine schedule depends on the count from the end of its warm-up on: never changed after it
    _, _, t_cfg, last_change = simulate(monkeypatch, SPEEDS["20 % slower from the middle on"], lr_schedule="cosine")
    assert last_change <= t_cfg["warmup_steps"] + 1


@pytest.mark.parametrize("lr_schedule, guide_fraction, guide_min_step, guide_at", [
    ("wsd", 0.0, 0, 0), ("wsd", 0.23, 400, 0), ("constant", 0.3, 0, 0), ("cosine", 0.0, 0, 0), ("wsd", 0.23, 0, 230)])
def test_first_step_using_steps_is_where_the_count_first_matters(lr_schedule, guide_fraction, guide_min_step, guide_at):
    """Checked against the quantities themselves: below the step returned, the learning rate and the guide's
    step are the same for any count at least this large; at it, one of them differs for some count."""
    def cfg(steps):
        return dict(DEFAULTS["train"], lr_schedule=lr_schedule, steps=steps, guide_fraction=guide_fraction,
                    guide_min_step=guide_min_step, guide_step=guide_at, warmup_steps=100)

    first = train_util.first_step_using_steps(cfg(1000))
    for other in [1000, 1100, 1500, 3000]:
        guide = train_util.guide_step(cfg(other))
        assert all(train_util.lr_at(s, cfg(other)) == train_util.lr_at(s, cfg(1000)) for s in range(first))
        assert guide in (None, train_util.guide_step(cfg(1000))) or guide - 1 >= first
    differs = [other for other in range(1001, 3000, 7)
               if train_util.lr_at(first, cfg(other)) != train_util.lr_at(first, cfg(1000))
               or train_util.guide_step(cfg(other)) not in (None, train_util.guide_step(cfg(1000)))]
    assert differs or first == 1000  # constant schedule without a guide: nothing depends on the count


@pytest.mark.parametrize("seconds, step_s, eval_s, eval_every, done", [(577.0, 0.213, 3.5, 700, 0),
                                                                       (60, 0.05, 0.3, 3, 0), (1, 0.5, 3, 700, 0),
                                                                       (25, 0.1, 20.0, 50, 0),
                                                                       (100, 0.2, 3.0, 700, 1234)])
def test_the_step_count_is_the_largest_that_fits(seconds, step_s, eval_s, eval_every, done):
    def cost(n):  # the steps after `done` and the evaluations the loop makes among them (counted as the loop does)
        loop_evals = sum(1 for s in range(done + 1, n + 1) if s % eval_every == 0 or s == n)
        return (n - done) * step_s + loop_evals * eval_s

    n = train_util.steps_that_fit(seconds, step_s, eval_s, eval_every, done)
    assert n == done or cost(n) <= seconds
    assert all(cost(m) > seconds for m in range(n + 1, n + 2 * eval_every + 2))


# ----------------------------------------------------------------------------
# Real runs
# ----------------------------------------------------------------------------

def test_evaluation_count_is_what_the_loop_does(tiny_config):
    train.main(["--config", tiny_config, "--train.steps=7", "--train.eval_every=3"])
    grids = [f for f in os.listdir(os.path.join(run_dir(tiny_config), "samples")) if f.startswith("step_")]
    assert len(grids) == train_util.evaluations_between(0, 7, 3) == 3  # steps 3, 6 and the last, 7


@pytest.mark.parametrize("guide", ["0", "0.1"])
def test_a_re_planned_run_is_repeated_bit_for_bit_by_its_saved_count(tiny_config, capsys, monkeypatch, guide):
    """The machine slows down mid-run: the planner lowers the count while nothing trained depends on it,
    saves it (and the guide's step, once kept), and those flags train the same weights to the bit."""
    step_call = train_util.StepRunner.__call__
    calls = {"n": 0}

    def slowing_step(self, *args):  # steps that take 30 ms, and 90 ms from the 40th on: slow enough to be
        calls["n"] += 1             # the same on any machine, loaded or not
        train_util.time.sleep(0.03 if calls["n"] <= 40 else 0.09)
        return step_call(self, *args)

    monkeypatch.setattr(train, "time_step_and_evaluation", lambda *args: (0.03, 0.2))  # as calibrated
    monkeypatch.setattr(train_util.StepRunner, "__call__", slowing_step)
    budget = run_dir(tiny_config) + "_budget"
    common = ["--config", tiny_config, "--train.lr_schedule=wsd", f"--train.guide_fraction={guide}",
              "--train.eval_every=1000"]
    train.main(common + ["--train.time_budget=15s", f"--train.out_dir={budget}"])
    out = capsys.readouterr().out
    first_plan = int(out.split("so about ")[1].split(" steps")[0])
    ckpt = torch.load(os.path.join(budget, "last.pt"), weights_only=True)
    steps = ckpt["config"]["train"]["steps"]
    assert steps < 0.9 * first_plan  # it re-planned for the slower steps
    again = out.split(f"trained {steps} steps (saved in config.yaml; ")[1].split(" repeats this run")[0].split()
    assert ckpt["step"] == steps and again[0] == f"--train.steps={steps}"
    saved = load_config(os.path.join(budget, "config.yaml"))["train"]
    assert saved["steps"] == steps
    if guide != "0":  # kept at 10 % of the first plan, not of the final count: saved, and given again
        assert again[1] == f"--train.guide_step={saved['guide_step']}" and ckpt["guide"] is not None
        assert saved["guide_step"] != round(0.1 * steps)
    monkeypatch.setattr(train_util.StepRunner, "__call__", step_call)
    train.main(common + ["--train.time_budget=15s"] + again)
    assert "train.time_budget=15s is not used" in capsys.readouterr().out
    repeat = torch.load(os.path.join(run_dir(tiny_config), "last.pt"), weights_only=True)
    for key in ["model", "ema"] + (["guide"] if guide != "0" else []):
        for name, value in ckpt[key].items():
            assert torch.equal(value, repeat[key][name]), (key, name)


def test_a_budget_too_small_for_one_step_is_a_clear_error(tiny_config, monkeypatch):
    monkeypatch.setattr(train, "time_step_and_evaluation", lambda *args: (5.0, 1.0))  # a slow machine, whatever this one is
    with pytest.raises(ConfigError, match=r"train.time_budget=3s is too small.*ask for more time, or set train.steps"):
        train.main(["--config", tiny_config, "--train.time_budget=3s"])
