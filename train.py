"""Train a DDPM on MNIST.

    python train.py --config config/default.yaml                  # downloads MNIST if missing
    python train.py --config config/default.yaml --val True       # + validation loss, best.pt
    python train.py --config config/default.yaml --train.lr=3e-4  # any config key, dotted
    python train.py --config config/default.yaml --resume         # continue <out_dir>/last.pt
    python train.py --config config/default.yaml --train.amp=bf16 --train.compile=true   # on a GPU
    torchrun --nproc_per_node=4 train.py --config config/large.yaml   # DDP; train.batch_size is global

Writes to train.out_dir: last.pt (and best.pt with --val), log.csv (step, loss, lr,
grad norm, images/s), val.csv, config.yaml and samples/step_*.png, a grid from fixed
noise at every evaluation. The loop is train() below; what it stands on is train_util.py.
"""

import time

STARTED = time.monotonic()  # `python train.py`: train.time_budget counts from here, before the imports

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tqdm import tqdm  # noqa: E402

from configuration import (DEFAULTS, DEVICE_HELP, ConfigError, guide_step, load_config, merge,  # noqa: E402
                           parse_duration, split_overrides, str2bool)
from fileio import build, load_checkpoint  # noqa: E402
from linear_noise_scheduler import sample_timesteps  # noqa: E402
from mnist import to_float  # noqa: E402
from mnist_downloader import DownloadError, mirrors_from  # noqa: E402
from train_util import (Run, StepRunner, TrainingDiverged, Validator, batch_indices, batch_shard,  # noqa: E402
                        BudgetPlanner, deferred_interrupt, distributed_setup, drop_labels, ema_decay_at, lr_at,
                        rank_and_world, stop_now, stop_requested, time_step_and_evaluation, training_data)


def train(cfg, val=False, device=torch.device("cpu"), ckpt=None, mirrors=None, started=None):
    """Train from cfg (or continue ckpt); returns (model, ema). Under torchrun (call
    distributed_setup first) each rank takes its share of every global batch. A time budget
    counts from `started` (time.monotonic(); default: now)."""
    t_cfg, T, bs = cfg["train"], cfg["diffusion"]["num_timesteps"], cfg["train"]["batch_size"]
    rank, world = rank_and_world()
    shard = batch_shard(bs, rank, world)
    if t_cfg["num_threads"]:
        torch.set_num_threads(t_cfg["num_threads"])
    torch.manual_seed(t_cfg["seed"])  # the same on every rank: each draws the global batch's noise, keeps its share

    # Data: the whole training split on the device, as uint8 (47 MB).
    images, labels = training_data(cfg, mirrors, device)

    # Model eps_theta, the noise schedule, AdamW and the EMA; a resumed run restores all of them.
    model, scheduler = build(cfg, device)
    runner = StepRunner(model, scheduler, t_cfg, device)
    step, best_val, guide_state = 0, float("inf"), None
    if ckpt is not None:
        runner.load_state(ckpt)
        step, best_val, guide_state = ckpt["step"], ckpt["best_val"], ckpt.get("guide")
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and ckpt["rng"]["cuda"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"][0], device)
    validator = Validator(cfg["data"]["root"], t_cfg["val_samples"], T, device, rank, world) if val else None
    counts = torch.bincount(labels.cpu(), minlength=model.num_classes) if model.num_classes else None
    run = Run(cfg, runner, scheduler, device, validator, step, resumed=ckpt is not None, label_counts=counts)
    planner = None
    if ckpt is None and parse_duration(t_cfg["time_budget"]):  # then plan the step count, and re-plan it as we go
        planner = BudgetPlanner(t_cfg, started or time.monotonic(), *time_step_and_evaluation(run, images, labels, shard),
                                device)
        run.write_config()
        if rank == 0:
            print(f"time budget {t_cfg['time_budget']}: {planner.step_s:.3f} s per step and {planner.eval_s:.1f} s per "
                  f"evaluation here, so about {t_cfg['steps']} steps; re-planned as the run goes")
    if rank == 0:
        procs = f" x {world} processes" if world > 1 else ""
        print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; device {device}{procs}; "
              f"{len(images)} training images; {t_cfg['steps']} steps of {bs}; amp {t_cfg['amp']}, "
              f"compile {t_cfg['compile']}; output in {t_cfg['out_dir']}")

    with deferred_interrupt() as interrupted, \
            tqdm(total=t_cfg["steps"], initial=step, desc="train", unit="step", disable=rank != 0) as bar:
        while step < t_cfg["steps"]:
            # Time budget: re-time the steps and re-plan their count while nothing trained depends on it.
            if planner is not None and planner.look(step):
                bar.total = t_cfg["steps"]
                run.write_config()

            # Learning rate: linear warm-up, then constant, cosine or wsd decay.
            lr = lr_at(step, t_cfg)

            # Batch: images x_0, labels (some dropped to "no label"), timesteps t and noise eps. A pure
            # function of the step and the RNG state, so a resumed run sees the batches it would have seen.
            idx = batch_indices(step, len(images), bs, t_cfg["seed"]).to(device)
            x0 = to_float(images[idx][:, None])
            y = drop_labels(labels[idx], t_cfg["cond_drop_prob"], model.num_classes) if model.num_classes else None
            t = sample_timesteps(bs, T, t_cfg, device)
            noise = torch.randn_like(x0)

            # Step: the loss of DDPM eq. 14 on this rank's share, backward, clipping, AdamW, EMA.
            loss, per_sample, grad_norm = runner(x0[shard], t[shard], noise[shard], None if y is None else y[shard],
                                                 lr, ema_decay_at(step, t_cfg))
            step += 1
            bar.update(1)
            # Autoguidance: the EMA weights of this step are kept beside the final ones, as a weaker version
            # of the same model for the sampler to steer away from. Free in training time: a copy of the weights.
            if step == guide_step(t_cfg):
                guide_state = {k: v.detach().clone() for k, v in runner.ema.state_dict().items()}
                if planner is not None:  # its step no longer follows train.steps, which may still change
                    t_cfg["guide_step"] = step
                    run.write_config()

            # Log: the mean loss (overall and per quarter of t) since the last row; a NaN stops the run.
            run.add(loss, per_sample, t[shard])
            evaluate_now = step % t_cfg["eval_every"] == 0 or step == t_cfg["steps"]
            if step % t_cfg["log_every"] == 0 or evaluate_now:
                run.write_log(step, lr, grad_norm, bar)

            # Evaluate and checkpoint: validation loss, a grid from fixed noise, last.pt (and best.pt).
            if evaluate_now:
                tic = time.perf_counter()
                best_val = run.validate_and_save(step, best_val, guide_state)
                if planner is not None:
                    planner.evaluated(time.perf_counter() - tic)

            # Stop: Ctrl-C or SIGTERM finishes this step, saves last.pt and exits; a second one stops at once.
            if stop_requested(interrupted, device):
                if rank == 0 and run.loss_is_finite():
                    run.save(run.last_path, step, best_val, guide_state)
                    tqdm.write(f"interrupted: saved {run.last_path} at step {step}; continue with --resume")
                stop_now(interrupted)
    if planner is not None and rank == 0:
        again = f"--train.steps={t_cfg['steps']}" + (f" --train.guide_step={t_cfg['guide_step']}" if t_cfg["guide_step"] else "")
        print(f"time budget {t_cfg['time_budget']}: trained {t_cfg['steps']} steps (saved in config.yaml; "
              f"{again} repeats this run)")
    if world > 1:
        dist.barrier()  # rank 0's last checkpoint is written before any process exits
    return model, runner.ema


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any config key can be overridden as --section.key=value; "
                                       "`python configuration.py CONFIG` prints them all.")
    p.add_argument("--config", default="config/default.yaml", help="YAML config (default: %(default)s)")
    p.add_argument("--val", type=str2bool, default=False, help="True: validation loss at every evaluation, "
                                                               "best checkpoint kept as best.pt")
    p.add_argument("--resume", action="store_true", help="continue from <out_dir>/last.pt with its stored "
                                                         "config (command-line overrides still apply)")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if <out_dir> holds a checkpoint")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--mirror", action="append", metavar="URL_OR_DIR",
                   help="MNIST mirror tried first if data is missing (repeatable; also $MNIST_MIRROR)")
    rest, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    return p.parse_args(rest), overrides


def main(argv=None, started=None):
    """The command line; train.time_budget counts from `started` (default: now)."""
    started = time.monotonic() if started is None else started
    args, overrides = parse_args(argv)
    cfg = load_config(args.config, overrides)
    if parse_duration(cfg["train"]["time_budget"]) and any(o.startswith("train.steps=") for o in overrides):
        print(f"note: --train.steps={cfg['train']['steps']} given, so train.time_budget={cfg['train']['time_budget']} "
              "is not used: training exactly that many steps")
        cfg["train"]["time_budget"] = "0"
    last_path = os.path.join(cfg["train"]["out_dir"], "last.pt")
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(last_path, hint="nothing to resume: train without --resume first")
        cfg = merge(DEFAULTS, ckpt["config"], overrides, origin=last_path)
    elif os.path.exists(last_path) and not args.overwrite:
        raise ConfigError(f"{last_path} exists: pass --resume to continue that run, --overwrite to start "
                          "again, or --train.out_dir=... for a new run")
    rank, _, device = distributed_setup(args.device)
    if ckpt is not None and rank == 0:
        print(f"resuming {last_path} at step {ckpt['step']} with its stored config")
        guide_at = guide_step(cfg["train"])
        if guide_at is not None and ckpt.get("guide") is None and ckpt["step"] >= guide_at:
            print(f"note: the checkpoint is past train.guide_fraction's step {guide_at} and holds no guide; "
                  "this run will have none (sample it with autoguidance 1)")
    try:
        train(cfg, args.val, device, ckpt, mirrors_from(args.mirror), started)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(started=STARTED)
    except (ConfigError, DownloadError, FileNotFoundError, TrainingDiverged) as e:
        sys.exit(f"error: {e}" if os.environ.get("RANK", "0") == "0" else 1)  # under torchrun, said once
    except KeyboardInterrupt:
        sys.exit(130)
