"""Train a DDPM on MNIST.

    python train.py --config config/default.yaml                  # downloads MNIST if missing
    python train.py --config config/default.yaml --val True       # + validation loss, best.pt
    python train.py --config config/default.yaml --train.lr=3e-4  # any config key, dotted
    python train.py --config config/default.yaml --resume         # continue <out_dir>/last.pt
    python train.py --config config/default.yaml --train.amp=bf16 --train.compile=true   # on a GPU
    torchrun --nproc_per_node=4 train.py --config config/large.yaml   # DDP; train.batch_size is global

Writes to train.out_dir: last.pt (and best.pt with --val), log.csv (step, loss, lr,
grad norm, images/s), val.csv, config.yaml and samples/step_*.png, a grid from fixed
noise at every evaluation.
"""

import argparse
import contextlib
import copy
import csv
import functools
import importlib.util
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings

import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from configuration import DEFAULTS, ConfigError, load_config, merge, pick_device, split_overrides, str2bool
from linear_noise_scheduler import min_snr_weight
from mnist import MNIST, to_float
from mnist_downloader import DownloadError, ensure_mnist_present, mirrors_from
from sample import atomic_write, build, digit_rows, generate, guide_step, load_checkpoint, make_grid, save_atomic

LOG_FIELDS = ["step", "loss", "loss_q1", "loss_q2", "loss_q3", "loss_q4", "lr", "grad_norm", "img_per_s"]
VAL_FIELDS = ["step", "val_loss", "val_q1", "val_q2", "val_q3", "val_q4"]


class TrainingDiverged(RuntimeError):
    pass


def lr_at(step, t):
    """Linear warm-up over warmup_steps, then constant or cosine down to min_lr_ratio * lr."""
    warm = min(1.0, (step + 1) / t["warmup_steps"]) if t["warmup_steps"] else 1.0
    if t["lr_schedule"] == "constant":
        return t["lr"] * warm
    progress = min(1.0, max(0, step - t["warmup_steps"]) / max(1, t["steps"] - t["warmup_steps"]))
    return t["lr"] * warm * (t["min_lr_ratio"] + (1 - t["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * progress)))


@functools.lru_cache(maxsize=1)
def epoch_permutation(n, seed, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def batch_indices(step, n, batch_size, seed):
    """Indices of the training batch at `step`: a fresh permutation per epoch, seeded by (seed, epoch).
    A pure function of the step, so a resumed run sees exactly the batches it would have seen."""
    epoch, k = divmod(step, n // batch_size)
    return epoch_permutation(n, seed, epoch)[k * batch_size:(k + 1) * batch_size]


@torch.no_grad()
def ema_update(ema, model, decay):
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


def per_quarter(values, t, num_timesteps):
    """Mean of per-sample values in each quarter of the timestep range (NaN where empty)."""
    q = (t * 4) // num_timesteps
    return [values[q == i].mean().item() if (q == i).any() else float("nan") for i in range(4)]


def sample_timesteps(n, num_timesteps, t_cfg, device):
    """Training timesteps: uniform over 0..T-1 (DDPM), or logit-normal, which puts more of the batch
    on the middle of the chain, where the digit's shape is decided.

    With train.stratified_timesteps the batch takes one draw from each 1/n-quantile band of that
    distribution (u_i = (i + U_i) / n pushed through its inverse CDF), the low-discrepancy sampler
    of Kingma et al. 2021 (VDM, appendix): the same distribution, a lower-variance loss."""
    lognorm = t_cfg["timestep_sampling"] == "logit_normal"
    stratified = t_cfg["stratified_timesteps"]
    if not (lognorm or stratified):
        return torch.randint(0, num_timesteps, (n,), device=device)
    if stratified:
        u = (torch.arange(n, device=device) + torch.rand(n, device=device)) / n
    if lognorm:  # z ~ N(0, 1), through the normal's inverse CDF when stratified
        z = torch.special.ndtri(u) if stratified else torch.randn(n, device=device)
        u = torch.sigmoid(z * t_cfg["logit_normal_std"] + t_cfg["logit_normal_mean"])
    return (u * num_timesteps).long().clamp_(0, num_timesteps - 1)


def drop_labels(y, p, null_class):
    """Classifier-free guidance training: replace each label by the "no label" class with probability p."""
    return torch.where(torch.rand(y.shape, device=y.device) < p, torch.full_like(y, null_class), y)


def diffusion_loss(model, scheduler, x0, t, noise, weighting="none", gamma=5.0, y=None):
    """Per-sample eps-prediction MSE (DDPM eq. 14 'simple' loss) and its (weighted) batch mean."""
    pred = model(scheduler.add_noise(x0, noise, t), t, y)
    per_sample = (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))  # float32 even under autocast
    weight = min_snr_weight(scheduler.snr(t), gamma) if weighting == "min_snr" else 1.0
    return per_sample, (per_sample * weight).mean()


class Validator:
    """Validation loss on fixed test images with fixed noise and timesteps, so evaluations compare.
    Under torchrun each rank scores every world_size-th image and the sums are all-reduced."""

    def __init__(self, root, n, num_timesteps, device, rank=0, world_size=1):
        test = MNIST(root, "test")
        g = torch.Generator().manual_seed(1234)
        x0 = to_float(test.images[:n, None])
        t = torch.randint(0, num_timesteps, (len(x0),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        shard = slice(rank, None, world_size)
        self.x0, self.y = x0[shard].to(device), test.labels[:n][shard].to(device)
        self.t, self.noise = t[shard].to(device), noise[shard].to(device)
        self.num_timesteps = num_timesteps

    @torch.no_grad()
    def __call__(self, model, scheduler, batch_size):
        losses = []
        for i in range(0, len(self.x0), batch_size):
            b = slice(i, i + batch_size)
            y = self.y[b] if model.num_classes else None
            losses.append(diffusion_loss(model, scheduler, self.x0[b], self.t[b], self.noise[b], y=y)[0])
        losses = torch.cat(losses).double()
        q = (self.t * 4) // self.num_timesteps
        sums = torch.stack([losses.sum(), torch.tensor(len(losses), dtype=torch.float64, device=losses.device)]
                           + [x for i in range(4) for x in (losses[q == i].sum(), (q == i).sum().double())])
        if dist.is_initialized():
            dist.all_reduce(sums)
        sums = sums.tolist()
        return [sums[2 * i] / sums[2 * i + 1] if sums[2 * i + 1] else float("nan") for i in range(5)]


@contextlib.contextmanager
def deferred_interrupt():
    """Turn the first Ctrl-C into a flag that the loop reads between steps, so the checkpoint it
    saves is never of a half-done step; a second Ctrl-C interrupts at once."""
    flag = {"set": False}

    def handler(signum, frame):
        if flag["set"]:
            raise KeyboardInterrupt
        flag["set"] = True
        tqdm.write("Ctrl-C: stopping after this step (press again to stop now, without saving)")

    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(amp, device):
    """The autocast dtype for train.amp on this device, or a ConfigError saying why it cannot run."""
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return None
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"train.amp=bf16: {torch.cuda.get_device_name(device)} has no bfloat16; "
                          "use train.amp=fp16 or off")
    try:
        with warnings.catch_warnings():  # unsupported combinations only warn and switch autocast off
            warnings.simplefilter("error")
            with torch.autocast(device.type, dtype=dtype):
                pass
            if dtype == torch.float16:
                torch.amp.GradScaler(device.type)
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, AttributeError or a warning here
        raise ConfigError(f"train.amp={amp} is not supported on {device.type} by torch {torch.__version__} "
                          f"({str(e).splitlines()[0]}); use train.amp=off") from None
    return dtype


def check_compile(device):
    """torch.compile's inductor needs a C++ compiler for CPU code and Triton for CUDA code."""
    if device.type == "cpu" and not any(shutil.which(c) for c in [os.environ.get("CXX", "g++"), "c++", "clang++"]):
        raise ConfigError("train.compile=true needs a C++ compiler on the CPU (none found: install g++), "
                          "or use train.compile=false")
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise ConfigError("train.compile=true needs Triton on CUDA (pip install triton), or use train.compile=false")


class StepRunner:
    """One optimizer step as train.py runs it, shared with benchmark.py: forward under autocast
    (train.amp), backward through a gradient scaler for fp16, clipping, AdamW, then the EMA.
    It owns the EMA copy, the optimizer and the scaler, all built from the train section.

    `model` is the plain UNet whose state_dict is saved; `net` is what the forward runs through:
    the model itself, or DistributedDataParallel around it, or torch.compile of either.
    """

    def __init__(self, model, scheduler, t_cfg, device):
        self.model, self.scheduler, self.t_cfg = model, scheduler, t_cfg
        self.ema = copy.deepcopy(model).eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(model.parameters(), lr=t_cfg["lr"], betas=(0.9, t_cfg["adam_beta2"]),
                                     weight_decay=t_cfg["weight_decay"])
        self.dtype = amp_dtype(t_cfg["amp"], device)
        self.device = device
        self.scaler = torch.amp.GradScaler(device.type) if self.dtype == torch.float16 else None
        self.memory_format = torch.channels_last if t_cfg["channels_last"] else torch.contiguous_format
        if t_cfg["channels_last"]:
            model.to(memory_format=torch.channels_last)
        self.net = model
        if dist.is_initialized():
            self.net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if t_cfg["compile"]:
            check_compile(device)
            self.net = torch.compile(self.net)

    def __call__(self, x0, t, noise, y, lr, ema_decay):
        """(loss, per-sample losses, grad norm) of one step on the batch (x0, t, noise, y)."""
        self.net.train()
        for group in self.opt.param_groups:
            group["lr"] = lr
        x0 = x0.contiguous(memory_format=self.memory_format)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            per_sample, loss = diffusion_loss(self.net, self.scheduler, x0, t, noise, self.t_cfg["loss_weighting"],
                                              self.t_cfg["min_snr_gamma"], y)
        self.opt.zero_grad(set_to_none=True)
        max_norm = self.t_cfg["grad_clip"] or float("inf")
        if self.scaler is None:
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
            self.opt.step()
        else:  # fp16: scale the loss so small gradients survive, unscale before clipping
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
            self.scaler.step(self.opt)  # skipped if the scaled gradients overflowed
            self.scaler.update()
        ema_update(self.ema, self.model, ema_decay)
        return loss, per_sample, grad_norm


def distributed_setup(device_name):
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) this joins the process group:
    nccl with one GPU per process on CUDA, gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ConfigError(f"torchrun training runs on cuda (nccl) or cpu (gloo), not {device.type}")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def save_checkpoint(path, state):
    """torch.save through a temporary file and os.replace: a crash never leaves a half checkpoint."""
    atomic_write(path, lambda f: torch.save(state, f))


def append_csv(path, fields, row):
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerow(row)


def truncate_csv(path, fields, step):
    """On resume, drop log rows written after the checkpoint (they will be logged again)."""
    if not os.path.exists(path):
        return
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any config key can be overridden as --section.key=value; "
                                       "see configuration.py for the list.")
    p.add_argument("--config", default="config/default.yaml", help="YAML config (default: %(default)s)")
    p.add_argument("--val", type=str2bool, default=False, help="True: validation loss at every evaluation, "
                                                               "best checkpoint kept as best.pt")
    p.add_argument("--resume", action="store_true", help="continue from <out_dir>/last.pt with its stored "
                                                         "config (command-line overrides still apply)")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if <out_dir> holds a checkpoint")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, mps")
    p.add_argument("--mirror", action="append", metavar="URL_OR_DIR",
                   help="MNIST mirror tried first if data is missing (repeatable; also $MNIST_MIRROR)")
    rest, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    return p.parse_args(rest), overrides


def main(argv=None):
    args, overrides = parse_args(argv)
    cfg = load_config(args.config, overrides)
    last_path = os.path.join(cfg["train"]["out_dir"], "last.pt")
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(last_path)
        cfg = merge(DEFAULTS, ckpt["config"], overrides, origin=last_path)
    elif os.path.exists(last_path) and not args.overwrite:
        raise ConfigError(f"{last_path} exists: pass --resume to continue that run, --overwrite to start "
                          "again, or --train.out_dir=... for a new run")
    rank, _, device = distributed_setup(args.device)
    if ckpt is not None and rank == 0:
        print(f"resuming {last_path} at step {ckpt['step']} with its stored config")
    try:
        train(cfg, args.val, device, ckpt, mirrors_from(args.mirror))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(cfg, val=False, device=torch.device("cpu"), ckpt=None, mirrors=None):
    """Train from cfg (or continue ckpt); returns (model, ema). Under torchrun (call
    distributed_setup first) each rank takes its share of every global batch."""
    t_cfg, root, out_dir = cfg["train"], cfg["data"]["root"], cfg["train"]["out_dir"]
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    lead = rank == 0  # logs, grids and checkpoints
    T, bs = cfg["diffusion"]["num_timesteps"], t_cfg["batch_size"]
    if bs % world:
        raise ConfigError(f"train.batch_size {bs} is the global batch: it must divide by the {world} processes "
                          f"(e.g. --train.batch_size={bs - bs % world or world})")
    shard = slice(rank * bs // world, (rank + 1) * bs // world)
    if t_cfg["num_threads"]:
        torch.set_num_threads(t_cfg["num_threads"])
    torch.manual_seed(t_cfg["seed"])  # the same on every rank: each draws the global batch's noise, keeps its share
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # one download per machine
        ensure_mnist_present(root, mirrors)
    if world > 1:
        dist.barrier()
    data = MNIST(root, "train")
    images, labels = data.images.to(device), data.labels.to(device)
    if len(images) < bs:
        raise ConfigError(f"train.batch_size {bs} exceeds the {len(images)} training images")
    model, scheduler = build(cfg, device)
    runner = StepRunner(model, scheduler, t_cfg, device)
    ema, opt = runner.ema, runner.opt
    step, best_val = 0, float("inf")
    # Autoguidance: the EMA weights at guide_at, kept beside the final ones (a weaker version of the
    # same model for sample.py to steer away from). Free in training time: a copy of the weights.
    guide_at, guide = guide_step(t_cfg), None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        if runner.scaler is not None and ckpt.get("scaler"):
            runner.scaler.load_state_dict(ckpt["scaler"])
        step, best_val = ckpt["step"], ckpt["best_val"]
        guide = ckpt.get("guide")
        if guide_at is not None and guide is None and step >= guide_at and lead:
            print(f"note: the checkpoint is past train.guide_fraction's step {guide_at} and holds no guide; "
                  "this run will have none (sample it with autoguidance 1)")
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and ckpt["rng"]["cuda"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"][0], device)
    log_path, val_path = os.path.join(out_dir, "log.csv"), os.path.join(out_dir, "val.csv")
    last_path = os.path.join(out_dir, "last.pt")
    if lead:
        os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
        with open(os.path.join(out_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
        for path, fields in [(log_path, LOG_FIELDS), (val_path, VAL_FIELDS)]:
            if ckpt is not None:
                truncate_csv(path, fields, step)
            elif os.path.exists(path):
                os.remove(path)
    validator = Validator(root, t_cfg["val_samples"], T, device, rank, world) if val else None
    if lead:
        n_params = sum(p.numel() for p in model.parameters())
        procs = f" x {world} processes" if world > 1 else ""
        print(f"model: {n_params / 1e6:.2f} M parameters; device {device}{procs}; {len(images)} training images; "
              f"{t_cfg['steps']} steps of {bs}; amp {t_cfg['amp']}, compile {t_cfg['compile']}; output in {out_dir}")

    def checkpoint(path):
        rng = {"torch": torch.get_rng_state(), "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []}
        save_checkpoint(path, {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                               "scaler": runner.scaler.state_dict() if runner.scaler is not None else {},
                               "step": step, "best_val": best_val, "rng": rng, "config": cfg, "guide": guide})

    def evaluate():
        """Validation loss (every rank: it is reduced across them), then rank 0's grid and checkpoints."""
        nonlocal best_val
        msg, is_best = f"step {step}: samples/step_{step:06d}.png", False
        if validator is not None:
            v = validator(ema, scheduler, 500)
            msg += f"; val loss {v[0]:.4f} (quarters of t: " + ", ".join(f"{q:.4f}" for q in v[1:]) + ")"
            is_best = v[0] < best_val
            best_val = min(best_val, v[0])
            if lead:
                append_csv(val_path, VAL_FIELDS, dict(zip(VAL_FIELDS, [step] + v)))
        if lead:
            s = cfg["sample"]
            grid_labels, nrow = digit_rows(64, model.num_classes) if model.num_classes else (None, 8)
            w = s["autoguidance"] if guide is not None else 1.0  # before the guide exists: plain sampling
            grid = generate(ema, scheduler, 64 if grid_labels is None else len(grid_labels), seed=s["seed"],
                            batch_size=64, sampler=s["sampler"], steps=s["steps"], eta=s["eta"], device=device,
                            progress=False, labels=grid_labels, guidance=s["guidance"],
                            guide=guide_model(guide) if w != 1.0 else None, autoguidance=w)
            save_atomic(make_grid(grid, nrow=nrow), os.path.join(out_dir, "samples", f"step_{step:06d}.png"))
            if is_best:
                checkpoint(os.path.join(out_dir, "best.pt"))
                msg += " best"
            checkpoint(last_path)
            tqdm.write(msg)

    def guide_model(state):
        g = copy.deepcopy(ema)
        g.load_state_dict(state)
        return g

    def global_batch(step):
        """The batch of `step` (a pure function of the step and the RNG state), and this rank's share."""
        idx = batch_indices(step, len(images), bs, t_cfg["seed"]).to(device)
        x0 = to_float(images[idx][:, None])
        y = drop_labels(labels[idx], t_cfg["cond_drop_prob"], model.num_classes) if model.num_classes else None
        t = sample_timesteps(bs, T, t_cfg, device)
        noise = torch.randn_like(x0)
        return x0[shard], t[shard], noise[shard], None if y is None else y[shard]

    def mean_over_ranks(value):
        if world > 1:
            dist.all_reduce(value)
            value /= world
        return value

    bar = tqdm(total=t_cfg["steps"], initial=step, desc="train", unit="step", disable=not lead)
    acc_loss, acc_n, acc_q, last_good = torch.zeros((), device=device), 0, [], step
    tic = time.perf_counter()
    stopped_between_steps = False
    with deferred_interrupt() as interrupted:
        try:
            while step < t_cfg["steps"]:
                lr = lr_at(step, t_cfg)
                x0, t, noise, y = global_batch(step)
                loss, per_sample, grad_norm = runner(x0, t, noise, y, lr,
                                                     min(t_cfg["ema_decay"], (1 + step) / (10 + step)))
                step += 1
                if step == guide_at:
                    guide = {k: v.detach().clone() for k, v in ema.state_dict().items()}
                acc_loss += loss.detach()
                acc_n += 1
                acc_q.append((per_sample.detach(), t))
                bar.update(1)
                if step % t_cfg["log_every"] == 0 or step == t_cfg["steps"] or step % t_cfg["eval_every"] == 0:
                    mean_loss = mean_over_ranks(acc_loss / acc_n).item()  # every rank sees a NaN, not just one
                    if not math.isfinite(mean_loss):
                        raise TrainingDiverged(f"loss became {mean_loss} between steps {step - acc_n} and {step}")
                    ips = acc_n * bs / (time.perf_counter() - tic)
                    if lead:  # loss quarters are rank 0's share of the batch
                        quarters = per_quarter(torch.cat([q for q, _ in acc_q]), torch.cat([t for _, t in acc_q]), T)
                        append_csv(log_path, LOG_FIELDS, dict(zip(LOG_FIELDS, [step, mean_loss, *quarters, lr,
                                                                                 grad_norm.item(), ips])))
                        bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{ips:.0f}")
                    acc_loss, acc_n, acc_q, tic = torch.zeros((), device=device), 0, [], time.perf_counter()
                    if step % t_cfg["eval_every"] == 0 or step == t_cfg["steps"]:
                        evaluate()
                        last_good = step
                        tic = time.perf_counter()
                stop = interrupted["set"]
                if world > 1:  # stop together, at the same step, if Ctrl-C reached any rank
                    flag = torch.tensor([float(stop)], device=device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    stop = bool(flag.item())
                if stop:  # Ctrl-C was pressed during this step: stop here, between steps
                    stopped_between_steps = True
                    raise KeyboardInterrupt
        except TrainingDiverged as e:
            raise TrainingDiverged(f"{e}. Stopped; the last good checkpoint is {last_path} (step {last_good}). "
                                   "Try a lower --train.lr or --train.grad_clip, then --resume.") from None
        except KeyboardInterrupt:
            if stopped_between_steps and (acc_n == 0 or math.isfinite((acc_loss / acc_n).item())) and lead:
                checkpoint(last_path)
                tqdm.write(f"interrupted: saved {last_path} at step {step}; continue with --resume")
            raise
        finally:
            bar.close()
    if world > 1:
        dist.barrier()  # rank 0's last checkpoint is written before any process exits
    return model, ema


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DownloadError, FileNotFoundError, TrainingDiverged) as e:
        sys.exit(f"error: {e}" if os.environ.get("RANK", "0") == "0" else 1)  # under torchrun, said once
    except KeyboardInterrupt:
        sys.exit(130)
