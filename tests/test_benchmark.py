"""benchmark.py on a tiny config: it runs and reports consistent, positive numbers."""

import json

import torch
from torch.profiler import ProfilerActivity, profile

import benchmark

# Short timings, a small sampling batch and two profiled steps: each call then takes a few seconds
# (about 15 s with the defaults, most of it the batch-256 sampling and parsing ten steps' profile).
QUICK = ["--seconds", "0.05", "--sample.batch_size=16", "--profile_steps", "2"]


def test_benchmark_reports_consistent_numbers(tiny_config, tmp_path):
    out = tmp_path / "bench.json"
    r = benchmark.main(["--config", tiny_config, *QUICK, "--json", str(out)])
    assert json.loads(out.read_text())["train_img_per_s"] == r["train_img_per_s"]
    assert r["train_img_per_s"] > 0 and r["sample_img_per_s_per_eval"] > 0
    # a training step costs about three forward passes (forward + backward of inputs and weights)
    assert 2.0 < r["train_gflop_per_img"] / r["forward_gflop_per_img"] < 4.0
    assert abs(r["train_gflop_per_s"] - r["train_gflop_per_img"] * r["train_img_per_s"]) < 1e-6 * r["train_gflop_per_s"]
    assert 0 < r["share_of_matmul_peak"] and r["peak_memory_mb"] > 0
    # the step's breakdown: every part, none negative; the tiny UNet's convolutions, GroupNorm, SiLU
    # and optimizer each take some time
    parts = r["step_breakdown_s"]
    assert list(parts) == [p for p, _ in benchmark.PARTS] + [benchmark.OTHER]
    assert all(s >= 0 for s in parts.values())
    for part in ["convolutions", "normalisation", "activations", "optimizer, clipping, EMA"]:
        assert parts[part] > 0, part
    assert r["conv_gflop_per_s"] > 0


def test_benchmark_says_what_the_configs_training_takes(tiny_config):
    r = benchmark.main(["--config", tiny_config, *QUICK])
    assert r["config_train_steps"] == 6  # the tiny config's steps
    step_s = 16 / r["train_img_per_s"]
    assert r["config_train_s"] > 6 * step_s  # the steps, and the two evaluations on top
    budget = benchmark.main(["--config", tiny_config, *QUICK, "--train.time_budget=60"])
    assert 0 < budget["config_train_s"] <= 60 and budget["config_train_steps"] > 6


def test_the_step_breakdown_puts_each_op_in_its_part():
    # A step with one op of each part, profiled; every event lands where its name says.
    torch.manual_seed(0)
    conv, norm = torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.GroupNorm(2, 4)
    opt = torch.optim.AdamW([*conv.parameters(), *norm.parameters()], lr=1e-3)
    x = torch.randn(2, 2, 6, 6)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        h = torch.nn.functional.silu(norm(conv(x)))
        loss = (h.flatten(1).softmax(-1) + h.flatten(1)).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(conv.parameters(), 1.0)
        opt.step()
    expected = {"aten::convolution": "convolutions", "aten::convolution_backward": "convolutions",
                "aten::native_group_norm": "normalisation", "aten::native_group_norm_backward": "normalisation",
                "aten::silu": "activations", "aten::silu_backward": "activations",
                "aten::_softmax": "attention", "ConvolutionBackward0": "convolutions",
                "NativeGroupNormBackward0": "normalisation", "aten::_foreach_norm": "optimizer, clipping, EMA"}
    seen = {}
    for e in prof.events():
        seen.setdefault(e.name, set()).add(benchmark.part_of(e))
    for name, part in expected.items():
        assert seen[name] == {part}, name
    # the AdamW step's own arithmetic (adds, multiplies) is optimizer; the loss's add is "other"
    in_step = [e for e in prof.events() if e.cpu_parent is not None and e.cpu_parent.name.startswith("Optimizer.")]
    assert in_step and {benchmark.part_of(e) for e in in_step} == {"optimizer, clipping, EMA"}
    assert benchmark.OTHER in seen["aten::add"]

