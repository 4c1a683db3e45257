"""benchmark.py on a tiny config: it runs and reports consistent, positive numbers."""

import json

import benchmark


def test_benchmark_reports_consistent_numbers(tiny_config, tmp_path):
    out = tmp_path / "bench.json"
    r = benchmark.main(["--config", tiny_config, "--seconds", "0.05", "--json", str(out)])
    assert json.loads(out.read_text())["train_img_per_s"] == r["train_img_per_s"]
    assert r["train_img_per_s"] > 0 and r["sample_img_per_s_per_eval"] > 0
    # a training step costs about three forward passes (forward + backward of inputs and weights)
    assert 2.0 < r["train_gflop_per_img"] / r["forward_gflop_per_img"] < 4.0
    assert abs(r["train_gflop_per_s"] - r["train_gflop_per_img"] * r["train_img_per_s"]) < 1e-6 * r["train_gflop_per_s"]
    assert 0 < r["share_of_matmul_peak"] and r["peak_memory_mb"] > 0


def test_benchmark_says_what_the_configs_training_takes(tiny_config):
    r = benchmark.main(["--config", tiny_config, "--seconds", "0.05"])
    assert r["config_train_steps"] == 6  # the tiny config's steps
    step_s = 16 / r["train_img_per_s"]
    assert r["config_train_s"] > 6 * step_s  # the steps, and the two evaluations on top
    budget = benchmark.main(["--config", tiny_config, "--seconds", "0.05", "--train.time_budget=60"])
    assert 0 < budget["config_train_s"] <= 60 and budget["config_train_steps"] > 6
