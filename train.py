"""Train a DDPM on MNIST.

    python train.py --config config/default.yaml                  # downloads MNIST if missing
    python train.py --config config/default.yaml --val True       # + validation loss, best.pt
    python train.py --config config/default.yaml --train.lr=3e-4  # any config key, dotted
    python train.py --config config/default.yaml --resume         # continue <out_dir>/last.pt

Writes to train.out_dir: last.pt (and best.pt with --val), log.csv (step, loss, lr,
grad norm, images/s), val.csv, config.yaml and samples/step_*.png, a grid from fixed
noise at every evaluation.
"""

import argparse
import copy
import contextlib
import csv
import functools
import math
import os
import signal
import sys
import threading
import time

import torch
import yaml
from tqdm import tqdm

from configuration import DEFAULTS, ConfigError, load_config, merge, pick_device, split_overrides, str2bool
from linear_noise_scheduler import min_snr_weight
from mnist import MNIST, to_float
from mnist_downloader import FILES, DownloadError, ensure_mnist, mirrors_from
from sample import atomic_write, build, digit_rows, generate, load_checkpoint, make_grid, save_atomic

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


def drop_labels(y, p, null_class):
    """Classifier-free guidance training: replace each label by the "no label" class with probability p."""
    return torch.where(torch.rand(y.shape, device=y.device) < p, torch.full_like(y, null_class), y)


def diffusion_loss(model, scheduler, x0, t, noise, weighting="none", gamma=5.0, y=None):
    """Per-sample eps-prediction MSE (DDPM eq. 14 'simple' loss) and its (weighted) batch mean."""
    pred = model(scheduler.add_noise(x0, noise, t), t, y)
    per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))
    weight = min_snr_weight(scheduler.snr(t), gamma) if weighting == "min_snr" else 1.0
    return per_sample, (per_sample * weight).mean()


class Validator:
    """Validation loss on fixed test images with fixed noise and timesteps, so evaluations compare."""

    def __init__(self, root, n, num_timesteps, device):
        test = MNIST(root, "test")
        g = torch.Generator().manual_seed(1234)
        self.x0 = to_float(test.images[:n, None]).to(device)
        self.y = test.labels[:n].to(device)
        self.t = torch.randint(0, num_timesteps, (len(self.x0),), generator=g).to(device)
        self.noise = torch.randn(self.x0.shape, generator=g).to(device)

    @torch.no_grad()
    def __call__(self, model, scheduler, batch_size):
        losses = []
        for i in range(0, len(self.x0), batch_size):
            b = slice(i, i + batch_size)
            y = self.y[b] if model.num_classes else None
            losses.append(diffusion_loss(model, scheduler, self.x0[b], self.t[b], self.noise[b], y=y)[0])
        losses = torch.cat(losses)
        return [losses.mean().item()] + per_quarter(losses, self.t, scheduler.num_timesteps)


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
        print(f"resuming {last_path} at step {ckpt['step']} with its stored config")
    elif os.path.exists(last_path) and not args.overwrite:
        raise ConfigError(f"{last_path} exists: pass --resume to continue that run, --overwrite to start "
                          "again, or --train.out_dir=... for a new run")
    train(cfg, args.val, pick_device(args.device), ckpt, mirrors_from(args.mirror))


def train(cfg, val=False, device=torch.device("cpu"), ckpt=None, mirrors=None):
    t_cfg, root, out_dir = cfg["train"], cfg["data"]["root"], cfg["train"]["out_dir"]
    if t_cfg["num_threads"]:
        torch.set_num_threads(t_cfg["num_threads"])
    torch.manual_seed(t_cfg["seed"])
    if not all(os.path.exists(os.path.join(root, f)) for f in FILES):
        ensure_mnist(root, mirrors)  # files present were verified when downloaded; MNIST() checks their structure
    data = MNIST(root, "train")
    images, labels = data.images.to(device), data.labels.to(device)
    if len(images) < t_cfg["batch_size"]:
        raise ConfigError(f"train.batch_size {t_cfg['batch_size']} exceeds the {len(images)} training images")
    model, scheduler = build(cfg, device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=t_cfg["lr"], weight_decay=t_cfg["weight_decay"])
    step, best_val = 0, float("inf")
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        step, best_val = ckpt["step"], ckpt["best_val"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and ckpt["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
    with open(os.path.join(out_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    log_path, val_path = os.path.join(out_dir, "log.csv"), os.path.join(out_dir, "val.csv")
    last_path = os.path.join(out_dir, "last.pt")
    for path, fields in [(log_path, LOG_FIELDS), (val_path, VAL_FIELDS)]:
        if ckpt is not None:
            truncate_csv(path, fields, step)
        elif os.path.exists(path):
            os.remove(path)
    validator = Validator(root, t_cfg["val_samples"], scheduler.num_timesteps, device) if val else None
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters; device {device}; {len(images)} training images; "
          f"{t_cfg['steps']} steps of {t_cfg['batch_size']}; output in {out_dir}")

    def checkpoint(path):
        rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}
        save_checkpoint(path, {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                               "step": step, "best_val": best_val, "rng": rng, "config": cfg})

    def evaluate():
        nonlocal best_val
        s = cfg["sample"]
        grid_labels, nrow = digit_rows(64, model.num_classes) if model.num_classes else (None, 8)
        grid = generate(ema, scheduler, 64 if grid_labels is None else len(grid_labels), seed=s["seed"],
                        batch_size=64, sampler=s["sampler"], steps=s["steps"], eta=s["eta"], device=device,
                        progress=False, labels=grid_labels, guidance=s["guidance"])
        save_atomic(make_grid(grid, nrow=nrow), os.path.join(out_dir, "samples", f"step_{step:06d}.png"))
        msg = f"step {step}: samples/step_{step:06d}.png"
        if validator is not None:
            v = validator(ema, scheduler, 500)
            append_csv(val_path, VAL_FIELDS, dict(zip(VAL_FIELDS, [step] + v)))
            msg += f"; val loss {v[0]:.4f} (quarters of t: " + ", ".join(f"{q:.4f}" for q in v[1:]) + ")"
            if v[0] < best_val:
                best_val = v[0]
                checkpoint(os.path.join(out_dir, "best.pt"))
                msg += " best"
        checkpoint(last_path)
        tqdm.write(msg)

    T, bs = scheduler.num_timesteps, t_cfg["batch_size"]

    def optimizer_step(step):
        """One step of AdamW on the diffusion loss, then the EMA update."""
        model.train()
        lr = lr_at(step, t_cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = batch_indices(step, len(images), bs, t_cfg["seed"]).to(device)
        x0 = to_float(images[idx][:, None])
        y = drop_labels(labels[idx], t_cfg["cond_drop_prob"], model.num_classes) if model.num_classes else None
        t = torch.randint(0, T, (bs,), device=device)
        per_sample, loss = diffusion_loss(model, scheduler, x0, t, torch.randn_like(x0),
                                          t_cfg["loss_weighting"], t_cfg["min_snr_gamma"], y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t_cfg["grad_clip"] or float("inf"))
        opt.step()
        ema_update(ema, model, min(t_cfg["ema_decay"], (1 + step) / (10 + step)))
        return loss, per_sample, t, lr, grad_norm

    bar = tqdm(total=t_cfg["steps"], initial=step, desc="train", unit="step")
    acc_loss, acc_n, acc_q, last_good = torch.zeros((), device=device), 0, [], step
    tic = time.perf_counter()
    stopped_between_steps = False
    with deferred_interrupt() as interrupted:
        try:
            while step < t_cfg["steps"]:
                loss, per_sample, t, lr, grad_norm = optimizer_step(step)
                step += 1
                acc_loss += loss.detach()
                acc_n += 1
                acc_q.append((per_sample.detach(), t))
                bar.update(1)
                if step % t_cfg["log_every"] == 0 or step == t_cfg["steps"] or step % t_cfg["eval_every"] == 0:
                    mean_loss = (acc_loss / acc_n).item()
                    if not math.isfinite(mean_loss):
                        raise TrainingDiverged(f"loss became {mean_loss} between steps {step - acc_n} and {step}")
                    ips = acc_n * bs / (time.perf_counter() - tic)
                    quarters = per_quarter(torch.cat([q for q, _ in acc_q]), torch.cat([t for _, t in acc_q]), T)
                    append_csv(log_path, LOG_FIELDS, dict(zip(LOG_FIELDS, [step, mean_loss, *quarters, lr,
                                                                             grad_norm.item(), ips])))
                    bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{ips:.0f}")
                    acc_loss, acc_n, acc_q, tic = torch.zeros((), device=device), 0, [], time.perf_counter()
                    if step % t_cfg["eval_every"] == 0 or step == t_cfg["steps"]:
                        evaluate()
                        last_good = step
                        tic = time.perf_counter()
                if interrupted["set"]:  # Ctrl-C was pressed during this step: stop here, between steps
                    stopped_between_steps = True
                    raise KeyboardInterrupt
        except TrainingDiverged as e:
            raise TrainingDiverged(f"{e}. Stopped; the last good checkpoint is {last_path} (step {last_good}). "
                                   "Try a lower --train.lr or --train.grad_clip, then --resume.") from None
        except KeyboardInterrupt:
            if stopped_between_steps and (acc_n == 0 or math.isfinite((acc_loss / acc_n).item())):
                checkpoint(last_path)
                tqdm.write(f"interrupted: saved {last_path} at step {step}; continue with --resume")
            raise
        finally:
            bar.close()
    return model, ema


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DownloadError, FileNotFoundError, TrainingDiverged) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)
