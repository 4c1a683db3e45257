"""Speed of a config on this machine: training and sampling throughput, FLOPs, memory.

    python benchmark.py --config config/default.yaml [--device cpu] [--json runs/benchmark.json]

Measures, on random data shaped like MNIST (the numbers do not depend on the data):
  - training images/s: forward, backward, gradient clipping, AdamW step and EMA update,
    exactly the step train.py runs, with the config's train.amp, train.compile and
    train.channels_last (e.g. --train.amp=bf16 --train.compile=true on a GPU);
  - sampling images/s per network evaluation (one forward pass of the batch);
  - FLOPs per image of a training step and of a forward pass (torch's FlopCounterMode:
    matmuls and convolutions, the bulk of the work);
  - the machine's fp32 matmul throughput (2048 x 2048), and the share of it training reaches;
  - peak memory (CUDA: max allocated; CPU: the process's peak resident set);
  - how long the config's training would take here (with a time budget: how many steps it buys);
  - where a training step's time goes (torch.profiler, self time per op): convolutions (forward and
    backward, with the rate they reach), normalisation, activations, attention, optimizer with
    clipping and EMA, and the rest (residual adds, concatenations, copies, the loss).
"""

import argparse
import json
import os
import platform
import resource
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from configuration import DEVICE_HELP, load_config, parse_duration, pick_device, run_cli, split_overrides
from fileio import build
from linear_noise_scheduler import diffusion_loss
from train_util import FINISH_AT, StepRunner, evaluations_between, steps_that_fit, sync


def timed(fn, device, min_seconds, warmup=2):
    """Seconds per call of fn, after warm-up, over at least min_seconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    n, start = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - start < min_seconds:
        fn()
        n += 1
    sync(device)
    return (time.perf_counter() - start) / n


def matmul_gflops(device, min_seconds):
    a, b = torch.randn(2048, 2048, device=device), torch.randn(2048, 2048, device=device)
    return 2 * 2048**3 / timed(lambda: a @ b, device, min_seconds) / 1e9


def benchmark(cfg, device, min_seconds=5.0, batch_size=None, profile_steps=10):
    t = cfg["train"]
    bs = batch_size or t["batch_size"]
    model, scheduler = build(cfg, device)
    runner = StepRunner(model, scheduler, t, device)  # train.amp, train.compile, channels_last apply
    ema = runner.ema
    x0 = torch.rand(bs, model.in_channels, model.image_size, model.image_size, device=device) * 2 - 1
    steps = torch.randint(0, scheduler.num_timesteps, (bs,), device=device)
    y = torch.randint(0, model.num_classes, (bs,), device=device) if model.num_classes else None

    def train_step():
        runner(x0, steps, torch.randn_like(x0), y, t["lr"], t["ema_decay"])

    sample_bs = cfg["sample"]["batch_size"]
    xs = torch.randn(sample_bs, *x0.shape[1:], device=device)
    ts = torch.full((sample_bs,), scheduler.num_timesteps // 2, device=device)

    def forward():
        with torch.inference_mode():
            ema(xs, ts)

    with FlopCounterMode(display=False) as counter:  # eager forward + backward: the FLOPs of a step
        diffusion_loss(model, scheduler, x0, steps, torch.randn_like(x0), y=y)[1].backward()
    model.zero_grad(set_to_none=True)
    train_flops = counter.get_total_flops() / bs
    conv_flops = sum(n for op, n in counter.get_flop_counts()["Global"].items() if "convolution" in str(op))
    with FlopCounterMode(display=False) as counter:
        forward()
    fwd_flops = counter.get_total_flops() / sample_bs

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train_s = timed(train_step, device, min_seconds)
    sample_s = timed(forward, device, min_seconds)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    parts = step_breakdown(train_step, device, profile_steps)
    peak_gflops = matmul_gflops(device, min_seconds / 2)
    achieved = train_flops * bs / train_s / 1e9
    return {
        "device": str(device), "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "amp": t["amp"], "compile": t["compile"],
        "channels_last": t["channels_last"], "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "params": sum(p.numel() for p in model.parameters()),
        "train_batch_size": bs, "train_img_per_s": bs / train_s,
        "sample_batch_size": sample_bs, "sample_img_per_s_per_eval": sample_bs / sample_s,
        "train_gflop_per_img": train_flops / 1e9, "forward_gflop_per_img": fwd_flops / 1e9,
        "train_gflop_per_s": achieved, "matmul_fp32_gflop_per_s": peak_gflops,
        "share_of_matmul_peak": achieved / peak_gflops, "peak_memory_mb": peak / 2**20,
        **training_time(cfg, bs / train_s, sample_bs / sample_s),
        "step_breakdown_s": parts, "conv_gflop_per_s": conv_flops / parts["convolutions"] / 1e9,
    }


# Op-name fragments (any case) of each part of a step; an op inside the optimizer's step (or a foreach
# op, the clipping's norm) counts as optimizer. Checked in this order; what matches none is "other".
PARTS = [("convolutions", ("conv",)),
         ("normalisation", ("group_norm", "groupnorm", "layer_norm", "layernorm", "batch_norm", "batchnorm")),
         ("activations", ("silu", "gelu", "relu", "sigmoid")),
         ("attention", ("scaled_dot_product", "bmm", "softmax")),
         ("optimizer, clipping, EMA", ("foreach", "vector_norm", "clip_grad"))]
OTHER = "other (adds, concatenation, copies, loss)"


def part_of(event):
    """The PARTS name of a profiler event: by its own name, or by the optimizer step it runs in."""
    e = event
    while e is not None:
        if e.name.startswith("Optimizer."):
            return PARTS[-1][0]
        e = e.cpu_parent
    name = event.name.lower()  # autograd nodes too: ConvolutionBackward0, NativeGroupNormBackward0
    return next((part for part, keys in PARTS if any(k.lower() in name for k in keys)), OTHER)


def step_breakdown(step, device, steps=10):
    """{part: seconds per step} of `step`, from the profiler's self time of every op (CPU time on a
    CPU, kernel time on a GPU); the parts add up to the profiled total."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()
    sync(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    parts = dict.fromkeys([p for p, _ in PARTS] + [OTHER], 0.0)
    for e in prof.events():
        us = e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total
        if us > 0:
            parts[part_of(e)] += us / 1e6 / steps
    return parts


def training_time(cfg, train_img_per_s, sample_img_per_s):
    """What the config's training would take here: its step count (or, with train.time_budget, the
    count the budget buys) and the seconds of steps plus evaluations (each a 64-image preview grid
    with the config's sampler; validation and checkpoints are small beside it)."""
    t, s, T = cfg["train"], cfg["sample"], cfg["diffusion"]["num_timesteps"]
    step_s = t["batch_size"] / train_img_per_s
    evals_per_image = (s["steps"] or T) * (2 if s["autoguidance"] != 1.0 or s["guidance"] != 1.0 else 1)
    eval_s = 64 * evals_per_image / sample_img_per_s
    budget = parse_duration(t["time_budget"])
    steps = steps_that_fit(FINISH_AT * budget, step_s, eval_s, t["eval_every"]) if budget else t["steps"]
    return {"config_train_steps": steps,
            "config_train_s": steps * step_s + evaluations_between(0, steps, t["eval_every"]) * eval_s}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="config/default.yaml")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--seconds", type=float, default=5.0, help="minimum timing per measurement")
    p.add_argument("--json", help="also write the numbers here (default: print only)")
    p.add_argument("--profile_steps", type=int, default=10, help="training steps profiled for the breakdown")
    rest, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(rest)
    cfg = load_config(args.config, overrides)
    if cfg["train"]["num_threads"]:
        torch.set_num_threads(cfg["train"]["num_threads"])
    r = benchmark(cfg, pick_device(args.device), args.seconds, profile_steps=args.profile_steps)
    r["config"] = args.config
    print(f"{args.config} on {r['device']} ({r['gpu'] or r['cpu']}, {r['threads']} threads, torch {r['torch']}; "
          f"amp {r['amp']}, compile {r['compile']}, channels_last {r['channels_last']})")
    rows = [("parameters", f"{r['params'] / 1e6:.2f} M"),
            (f"training images/s (batch {r['train_batch_size']})", f"{r['train_img_per_s']:.0f}"),
            (f"sampling images/s per network evaluation (batch {r['sample_batch_size']})",
             f"{r['sample_img_per_s_per_eval']:.0f}"),
            ("training GFLOP per image (fwd + bwd)", f"{r['train_gflop_per_img']:.3f}"),
            ("forward GFLOP per image", f"{r['forward_gflop_per_img']:.3f}"),
            ("training GFLOP/s achieved", f"{r['train_gflop_per_s']:.1f}"),
            ("fp32 matmul GFLOP/s (2048^2) on this machine", f"{r['matmul_fp32_gflop_per_s']:.1f}"),
            ("share of matmul peak reached by training", f"{100 * r['share_of_matmul_peak']:.0f} %"),
            ("peak memory", f"{r['peak_memory_mb']:.0f} MB"),
            ("this config's training here" + (f" (time budget {cfg['train']['time_budget']})"
                                              if parse_duration(cfg["train"]["time_budget"]) else ""),
             f"{r['config_train_steps']} steps in about {r['config_train_s'] / 60:.1f} min")]
    total = sum(r["step_breakdown_s"].values())
    rows.append(("where a training step's time goes (profiled)", f"{1000 * total:.1f} ms per step"))
    for part, s in r["step_breakdown_s"].items():
        rate = (f"; {r['conv_gflop_per_s']:.0f} GFLOP/s, {100 * r['conv_gflop_per_s'] / r['matmul_fp32_gflop_per_s']:.0f} %"
                f" of matmul" if part == "convolutions" else "")
        rows.append((f"  {part}", f"{1000 * s:5.1f} ms  {100 * s / total:3.0f} %{rate}"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
        print(f"wrote {args.json}")
    return r


if __name__ == "__main__":
    run_cli(main)
