"""What the training loop of train.py stands on: the optimizer step, the run's files and checkpoints,
the validation loss, stop signals, mixed precision and compile checks, and torchrun set-up.

Everything here is a named, top-level piece that train.py calls; the loop itself is train.train().
"""

import contextlib
import copy
import csv
import functools
import glob
import importlib.util
import io
import math
import os
import shutil
import signal
import threading
import time
import warnings

import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from configuration import ConfigError, guide_step, parse_duration, pick_device
from fileio import atomic_write, line_plot, make_grid, save_checkpoint, save_image
from linear_noise_scheduler import diffusion_loss
from mnist import MNIST, to_float
from mnist_downloader import ensure_mnist_present
from samplers import digit_rows, generate

LOG_FIELDS = ["step", "loss", "loss_q1", "loss_q2", "loss_q3", "loss_q4", "lr", "grad_norm", "img_per_s"]
VAL_FIELDS = ["step", "val_loss", "val_q1", "val_q2", "val_q3", "val_q4"]


class TrainingDiverged(RuntimeError):
    pass


# ----------------------------------------------------------------------------
# The batch and the step
# ----------------------------------------------------------------------------

def decay_start(t_cfg):
    """The wsd schedule's first step of decay: until then its learning rate does not depend on
    train.steps, so a time budget may still change the step count (see BudgetPlanner)."""
    return t_cfg["steps"] - round(t_cfg["decay_fraction"] * t_cfg["steps"])


def lr_at(step, t_cfg):
    """Linear warm-up over warmup_steps, then constant; or cosine down to min_lr_ratio * lr at the last
    step; or wsd (warm-up, stable, decay; Hagele et al. 2024): constant until decay_start, then linear
    down to min_lr_ratio * lr at the last step."""
    warm = min(1.0, (step + 1) / t_cfg["warmup_steps"]) if t_cfg["warmup_steps"] else 1.0
    low = t_cfg["min_lr_ratio"]
    if t_cfg["lr_schedule"] == "cosine":
        progress = min(1.0, max(0, step - t_cfg["warmup_steps"]) / max(1, t_cfg["steps"] - t_cfg["warmup_steps"]))
        return t_cfg["lr"] * warm * (low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress)))
    if t_cfg["lr_schedule"] == "wsd":
        start = decay_start(t_cfg)
        progress = min(1.0, max(0, step + 1 - start) / max(1, t_cfg["steps"] - start))  # 1 at the last step
        return t_cfg["lr"] * warm * (1 - (1 - low) * progress)
    return t_cfg["lr"] * warm


@functools.lru_cache(maxsize=1)
def epoch_permutation(n, seed, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def batch_indices(step, n, batch_size, seed):
    """Indices of the training batch at `step`: a fresh permutation per epoch, seeded by (seed, epoch).
    A pure function of the step, so a resumed run sees exactly the batches it would have seen."""
    epoch, k = divmod(step, n // batch_size)
    return epoch_permutation(n, seed, epoch)[k * batch_size:(k + 1) * batch_size]


def drop_labels(y, p, null_class):
    """Classifier-free guidance training: replace each label by the "no label" class with probability p."""
    return torch.where(torch.rand(y.shape, device=y.device) < p, torch.full_like(y, null_class), y)


@torch.no_grad()
def ema_update(ema, model, decay):
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


def ema_decay_at(step, t_cfg):
    """EMA decay with warm-up: early steps average over fewer steps."""
    return min(t_cfg["ema_decay"], (1 + step) / (10 + step))


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

    def state(self):
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {}}

    def load_state(self, ckpt):
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.opt.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])


# ----------------------------------------------------------------------------
# A wall-clock budget
# ----------------------------------------------------------------------------

def sync(device):
    """Wait for the device's queued work (CUDA), so that timings are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step_and_evaluation(run, images, labels, shard, warmup=2, measure=8):
    """(seconds per training step, seconds per evaluation), timed on throwaway copies of the model,
    EMA and optimizer with a batch of the run's shape. A rough first figure: BudgetPlanner re-times
    the steps as the run goes. The run itself is untouched and the RNG
    state is put back, so the run trains exactly as one given its step count would."""
    cfg, device = run.cfg, run.device
    rng = torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    trial = StepRunner(copy.deepcopy(run.runner.model), run.scheduler, cfg["train"], device)
    g = torch.Generator().manual_seed(0)
    n = shard.stop - shard.start
    x0 = to_float(images[:n, None])
    t = torch.randint(0, cfg["diffusion"]["num_timesteps"], (n,), generator=g).to(device)
    noise = torch.randn(x0.shape, generator=g).to(device)
    y = labels[:n] if trial.model.num_classes else None
    for i in range(warmup + measure):
        if i == warmup:
            sync(device)
            tic = time.perf_counter()
        trial(x0, t, noise, y, cfg["train"]["lr"], 0.99)
    sync(device)
    step_s, tic = (time.perf_counter() - tic) / measure, time.perf_counter()
    # One evaluation as the run makes them: validation loss, the preview grid (with the guide, the
    # dearer case), a checkpoint. Written to temporary files, then removed.
    timed_run = copy.copy(run)
    timed_run.runner, timed_run.lead = trial, False
    timed_run.validate_and_save(0, float("inf"), None)
    if run.lead:
        guide_state = trial.ema.state_dict() if guide_step(cfg["train"]) is not None else None
        for path, write in [(os.path.join(run.out_dir, "samples", "calibration.tmp.png"),
                             lambda p: run.preview(p, guide_state)),
                            (os.path.join(run.out_dir, "calibration.tmp.pt"),
                             lambda p: timed_run.save(p, 0, 0.0, guide_state))]:
            write(path)
            os.remove(path)
    sync(device)
    eval_s = time.perf_counter() - tic
    torch.set_rng_state(rng[0])
    if rng[1] is not None:
        torch.cuda.set_rng_state(rng[1], device)
    return step_s, eval_s


def evaluations_between(done, steps, eval_every):
    """How many evaluations a run makes after `done` steps until its end at `steps`: every eval_every
    steps, and one at the end."""
    return steps // eval_every - done // eval_every + (steps % eval_every != 0)


def steps_that_fit(seconds, step_s, eval_s, eval_every, done=0):
    """The largest step count N whose steps done+1..N and their evaluations take at most `seconds`
    (`done` if not even one does). The cost grows with N, so a bisection finds it."""
    def cost(n):
        return (n - done) * step_s + evaluations_between(done, n, eval_every) * eval_s

    low, high = done, done + max(1, int(seconds / step_s)) + 1  # cost(low) fits; cost(high) does not
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if cost(mid) <= seconds else (low, mid)
    return low


def first_step_using_steps(t_cfg):
    """The first (0-based) step whose work depends on train.steps: the cosine schedule's first step after
    warm-up, the wsd schedule's first step of decay, and (until train.guide_step fixes it) the step that
    ends by keeping the autoguidance guide at its share of the run. Steps before it train the same
    whatever train.steps is, so a time budget may still change it."""
    first = {"cosine": t_cfg["warmup_steps"] + 1, "wsd": decay_start(t_cfg),
             "constant": t_cfg["steps"]}[t_cfg["lr_schedule"]]
    guide_at = guide_step(t_cfg)
    return first if guide_at is None or t_cfg["guide_step"] else min(first, guide_at - 1)


FINISH_AT = 0.985  # a budgeted run plans to end here: 1.5 % spare for the steps after the count is fixed


class BudgetPlanner:
    """Keeps a run of train.time_budget on time on a machine whose speed drifts: every `every` steps it
    re-times the steps since the last look and re-plans train.steps so that the steps and evaluations
    left end at `finish_at` of the budget. It may change train.steps only while nothing trained so far
    depends on it (first_step_using_steps; with the wsd schedule, until its decay starts) and only to
    a count that keeps it so: the run then equals one given its final count from the start
    (--train.steps=N repeats it bit for bit). After that the count is fixed. Under torchrun rank 0
    plans and every rank takes its count."""

    def __init__(self, t_cfg, started, step_s, eval_s, device, finish_at=FINISH_AT, looks=40):
        self.t_cfg, self.started, self.step_s, self.eval_s, self.device = t_cfg, started, step_s, eval_s, device
        self.budget, self.finish_at = parse_duration(t_cfg["time_budget"]), finish_at
        self.fixed = False
        self.plan(0)
        self.every = max(1, t_cfg["steps"] // looks)  # from the broadcast count: the same on every rank
        self.mark, self.eval_time = (0, time.perf_counter()), 0.0

    def plan(self, done):
        """Set train.steps for what is left of the budget after `done` steps; returns it."""
        t_cfg, left = self.t_cfg, self.finish_at * self.budget - (time.monotonic() - self.started)
        steps = steps_that_fit(left, self.step_s, self.eval_s, t_cfg["eval_every"], done)
        if dist.is_initialized():
            count = torch.tensor([steps], device=self.device)
            dist.broadcast(count, 0)
            steps = int(count.item())
        if done == 0 and steps < 1:
            raise ConfigError(f"train.time_budget={t_cfg['time_budget']} is too small: start-up and calibration "
                              f"took {self.budget - left:.0f} s and one step with its evaluation takes "
                              f"{self.step_s + self.eval_s:.1f} s here; ask for more time, or set train.steps")
        steps = max(steps, done + 1)  # at least one more step, which ends with the final evaluation
        while first_step_using_steps({**t_cfg, "steps": steps}) < done:  # what trained so far must not change
            steps += 1
        t_cfg["steps"] = steps
        return steps

    def evaluated(self, seconds):
        """An evaluation took `seconds`: plan the next ones at that cost, and keep it out of the step time."""
        self.eval_s, self.eval_time = seconds, self.eval_time + seconds

    def look(self, done):
        """Before step `done` (0-based): re-time and re-plan every `every` steps; True if train.steps changed."""
        if self.fixed or done == 0 or done % self.every:
            return False
        now = time.perf_counter()
        self.step_s = max(1e-6, (now - self.mark[1] - self.eval_time) / (done - self.mark[0]))
        self.mark, self.eval_time = (done, now), 0.0
        before = self.t_cfg["steps"]
        self.fixed = first_step_using_steps(self.t_cfg) <= done
        return not self.fixed and self.plan(done) != before


# ----------------------------------------------------------------------------
# Data and torchrun
# ----------------------------------------------------------------------------

def training_data(cfg, mirrors, device):
    """The training images (N, 28, 28) uint8 and labels on the device; downloads MNIST if missing
    (once per machine under torchrun)."""
    root, bs = cfg["data"]["root"], cfg["train"]["batch_size"]
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        ensure_mnist_present(root, mirrors, verify=cfg["data"]["verify"])
    if dist.is_initialized():
        dist.barrier()
    data = MNIST(root, "train")
    if len(data.images) < bs:
        raise ConfigError(f"train.batch_size {bs} exceeds the {len(data.images)} training images")
    return data.images.to(device), data.labels.to(device)


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


def rank_and_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def batch_shard(batch_size, rank, world):
    """This rank's slice of the global batch."""
    if batch_size % world:
        raise ConfigError(f"train.batch_size {batch_size} is the global batch: it must divide by the {world} "
                          f"processes (e.g. --train.batch_size={batch_size - batch_size % world or world})")
    return slice(rank * batch_size // world, (rank + 1) * batch_size // world)


def mean_over_ranks(value):
    if dist.is_initialized():
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


# ----------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------

class Validator:
    """Validation loss on fixed images of the validation split (never trained on) with fixed noise
    and timesteps, so evaluations compare. Under torchrun each rank scores every world_size-th
    image and the sums are all-reduced."""

    def __init__(self, root, n, num_timesteps, device, rank=0, world_size=1):
        held_out = MNIST(root, "val")
        if n > len(held_out):
            raise ConfigError(f"train.val_samples = {n}, but the validation split of {root} holds {len(held_out)} "
                              f"images: set train.val_samples to at most {len(held_out)}")
        g = torch.Generator().manual_seed(1234)
        x0 = to_float(held_out.images[:n, None])
        t = torch.randint(0, num_timesteps, (len(x0),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        shard = slice(rank, None, world_size)
        self.x0, self.y = x0[shard].to(device), held_out.labels[:n][shard].to(device)
        self.t, self.noise = t[shard].to(device), noise[shard].to(device)
        self.num_timesteps = num_timesteps

    @torch.no_grad()
    def __call__(self, model, scheduler, batch_size):
        """[overall loss, loss in each quarter of the timestep range]."""
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


# ----------------------------------------------------------------------------
# Stop signals
# ----------------------------------------------------------------------------

STOP_SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


@contextlib.contextmanager
def deferred_interrupt():
    """Turn the first Ctrl-C or SIGTERM (what SLURM and cloud preemption send) into a flag that the
    loop reads between steps, so the checkpoint it saves is never of a half-done step; a second one
    interrupts at once. flag["signal"] is the signal number, or None."""
    flag = {"signal": None}

    def handler(signum, frame):
        if flag["signal"] is not None:
            raise KeyboardInterrupt
        flag["signal"] = signum
        tqdm.write(f"{STOP_SIGNALS[signum]}: stopping after this step (again to stop now, without saving)")

    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def stop_now(flag):
    """Leave the loop the way the signal asks: Ctrl-C as KeyboardInterrupt (exit 130), SIGTERM as exit 143."""
    if flag["signal"] == signal.SIGTERM:
        raise SystemExit(128 + signal.SIGTERM)
    raise KeyboardInterrupt


def stop_requested(flag, device):
    """True if a stop was asked for on any rank (so all ranks stop at the same step)."""
    stop = flag["signal"] is not None
    if dist.is_initialized():
        t = torch.tensor([float(stop)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        stop = bool(t.item())
    return stop


# ----------------------------------------------------------------------------
# The run's files: logs, grids, checkpoints
# ----------------------------------------------------------------------------

def append_csv(path, fields, row):
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerow(row)


def truncate_csv(path, fields, step):
    """On resume, drop log rows written after the checkpoint (they will be logged again); the
    shortened log replaces the old one atomically."""
    if not os.path.exists(path):
        return
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= step]
    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def per_quarter(values, t, num_timesteps):
    """Mean of per-sample values in each quarter of the timestep range (NaN where empty)."""
    q = (t * 4) // num_timesteps
    return [values[q == i].mean().item() if (q == i).any() else float("nan") for i in range(4)]


# What train.py, sample.py (editing.py), likelihood.py and evaluate.py write beside a checkpoint.
RUN_OUTPUTS = ["*.pt", "log.csv", "val.csv", "loss.png", "samples/step_*.png", "samples_*", "eval_*.json", "nll_*", "inpaint_*",
               "encode_*", "interpolate_*", "every_digit_*"]


def clear_outputs(out_dir, fresh):
    """Remove what a killed write left behind (`*.tmp*`) and, for a fresh run, the outputs of the run
    that was there before, so that neither --from_val nor a crash can pick them up."""
    for pattern in ["*.tmp*", "samples/*.tmp*"] + (RUN_OUTPUTS if fresh else []):
        for path in glob.glob(os.path.join(glob.escape(out_dir), pattern)):
            if os.path.isfile(path):
                os.remove(path)


class Run:
    """One training run's outputs in train.out_dir, written by rank 0: config.yaml, log.csv,
    val.csv, samples/step_*.png, last.pt and best.pt. It also holds what they are made from
    (label_counts: of the training labels, for a labelled model)."""

    def __init__(self, cfg, runner, scheduler, device, validator=None, step=0, resumed=False, label_counts=None):
        self.cfg, self.runner, self.scheduler, self.device, self.validator = cfg, runner, scheduler, device, validator
        self.label_counts = label_counts  # of the training labels: saved, so that a sampler can draw p(y)
        self.out_dir = cfg["train"]["out_dir"]
        self.lead = rank_and_world()[0] == 0
        self.last_path = os.path.join(self.out_dir, "last.pt")
        self.log_path, self.val_path = os.path.join(self.out_dir, "log.csv"), os.path.join(self.out_dir, "val.csv")
        self.last_good = step  # the step of the newest checkpoint
        self._reset_meter()
        if self.lead:
            os.makedirs(os.path.join(self.out_dir, "samples"), exist_ok=True)
            clear_outputs(self.out_dir, fresh=not resumed)
            self.write_config()
            if resumed:
                for path, fields in [(self.log_path, LOG_FIELDS), (self.val_path, VAL_FIELDS)]:
                    truncate_csv(path, fields, step)

    def write_config(self):
        """config.yaml: the resolved config (rank 0)."""
        if self.lead:
            atomic_write(os.path.join(self.out_dir, "config.yaml"),
                         lambda f: f.write(yaml.safe_dump(self.cfg, sort_keys=False).encode()))

    def _reset_meter(self):
        self.acc_loss, self.acc_n, self.acc_q = torch.zeros((), device=self.device), 0, []
        self.tic = time.perf_counter()

    def add(self, loss, per_sample, t):
        """Accumulate one step's loss (and per-sample losses by timestep) for the next log row."""
        self.acc_loss += loss.detach()
        self.acc_n += 1
        self.acc_q.append((per_sample.detach(), t))

    def loss_is_finite(self):
        return self.acc_n == 0 or math.isfinite((self.acc_loss / self.acc_n).item())

    def write_log(self, step, lr, grad_norm, bar):
        """A log.csv row (mean loss, and per quarter of t, over the steps since the last row);
        a NaN or infinite loss stops training, on every rank."""
        mean_loss = mean_over_ranks(self.acc_loss / self.acc_n).item()
        if not math.isfinite(mean_loss):
            raise TrainingDiverged(f"loss became {mean_loss} between steps {step - self.acc_n} and {step}. Stopped; "
                                   f"the last good checkpoint is {self.last_path} (step {self.last_good}). "
                                   "Try a lower --train.lr or --train.grad_clip, then --resume.")
        ips = self.acc_n * self.cfg["train"]["batch_size"] / (time.perf_counter() - self.tic)
        if self.lead:  # loss quarters are rank 0's share of the batch
            T = self.cfg["diffusion"]["num_timesteps"]
            quarters = per_quarter(torch.cat([q for q, _ in self.acc_q]), torch.cat([t for _, t in self.acc_q]), T)
            append_csv(self.log_path, LOG_FIELDS, dict(zip(LOG_FIELDS, [step, mean_loss, *quarters, lr,
                                                                     grad_norm.item(), ips])))
            bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{ips:.0f}")
        self._reset_meter()

    def save(self, path, step, best_val, guide_state):
        """A checkpoint with everything needed to continue exactly."""
        rng = {"torch": torch.get_rng_state(),
               "cuda": [torch.cuda.get_rng_state(self.device)] if self.device.type == "cuda" else []}
        save_checkpoint(path, {**self.runner.state(), "step": step, "best_val": best_val, "rng": rng,
                               "config": self.cfg, "guide": guide_state, "label_counts": self.label_counts})

    def validate_and_save(self, step, best_val, guide_state):
        """Validation loss (every rank: it is reduced across them), then rank 0's grid, loss.png and checkpoints.
        Returns the best validation loss so far."""
        msg, is_best = f"step {step}: samples/step_{step:06d}.png", False
        if self.validator is not None:
            v = self.validator(self.runner.ema, self.scheduler, 500)
            msg += f"; val loss {v[0]:.4f} (quarters of t: " + ", ".join(f"{q:.4f}" for q in v[1:]) + ")"
            is_best, best_val = v[0] < best_val, min(best_val, v[0])
            if self.lead:
                append_csv(self.val_path, VAL_FIELDS, dict(zip(VAL_FIELDS, [step] + v)))
        if self.lead:
            self.preview(os.path.join(self.out_dir, "samples", f"step_{step:06d}.png"), guide_state)
            self.plot_losses()
            if is_best:
                self.save(os.path.join(self.out_dir, "best.pt"), step, best_val, guide_state)
                msg += " best"
            self.save(self.last_path, step, best_val, guide_state)
            tqdm.write(msg)
        self.last_good = step
        self.tic = time.perf_counter()
        return best_val

    def plot_losses(self):
        """loss.png: the training loss of log.csv (and the validation loss of val.csv) against the step."""
        series = {}
        for path, column, label in [(self.log_path, "loss", "training (loss as weighted)"),
                                    (self.val_path, "val_loss", "validation (unweighted)")]:
            if os.path.exists(path):
                with open(path, newline="") as f:
                    series[label] = [(int(r["step"]), float(r[column])) for r in csv.DictReader(f)]
        plot = line_plot(series, f"{self.out_dir}: loss against training steps (log.csv, val.csv)", "step",
                         "loss (log scale)")
        save_image(plot, os.path.join(self.out_dir, "loss.png"))

    def preview(self, path, guide_state):
        """A grid from fixed noise with the EMA weights and the config's sampler (one row per digit
        for a conditional model; without autoguidance until the guide exists)."""
        s, ema = self.cfg["sample"], self.runner.ema
        labels, nrow = digit_rows(64, ema.num_classes) if ema.num_classes else (None, 8)
        w, guide = s["autoguidance"] if guide_state is not None else 1.0, None
        if w != 1.0:
            guide = copy.deepcopy(ema)
            guide.load_state_dict(guide_state)
        grid = generate(ema, self.scheduler, 64 if labels is None else len(labels), seed=s["seed"], batch_size=64,
                        sampler=s["sampler"], steps=s["steps"], eta=s["eta"], device=self.device, progress=False,
                        labels=labels, guidance=s["guidance"], guide=guide, autoguidance=w)
        save_image(make_grid(grid, nrow=nrow), path)
