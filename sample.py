"""Generate digits from a trained checkpoint.

    python sample.py --config config/default.yaml                     # last checkpoint, config's sampler
    python sample.py --config config/default.yaml --from_val True     # best-validation checkpoint
    python sample.py --config config/default.yaml --sampler dpm++ --steps 20 --save_images out/
    python sample.py --config config/default.yaml --autoguidance 1 --steps 50   # without the guide

The model is rebuilt from the config stored in the checkpoint and runs with its EMA
weights; with autoguidance (sample.autoguidance != 1) also the checkpoint's guide, an early
EMA snapshot kept by train.py (train.guide_fraction). Image i depends only on --seed and i,
never on the batch size or on how many images are asked for: each image has its own
random-number generator.
"""

import argparse
import hashlib
import os
import sys

import torch
from PIL import Image
from tqdm import tqdm

from configuration import DEFAULTS, ConfigError, load_config, merge, pick_device, str2bool
from linear_noise_scheduler import LinearNoiseScheduler, guided_eps, timestep_list
from mnist import to_uint8
from unet import UNet

SAMPLERS = ["ddpm", "ddim", "dpm++"]


def build(cfg, device="cpu"):
    """Model and scheduler from a resolved config (the sections map 1:1 to the constructors)."""
    return UNet(**cfg["model"]).to(device), LinearNoiseScheduler(**cfg["diffusion"]).to(device)


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found: train first with "
                                "`python train.py --config config/default.yaml`, or pass --ckpt")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_model(ckpt_path, device="cpu", weights="ema"):
    """(model in eval mode, scheduler, config) from a checkpoint. weights: "ema" (the model to
    sample from) or "guide" (the early EMA snapshot that autoguidance steers away from)."""
    ckpt = load_checkpoint(ckpt_path)
    cfg = merge(DEFAULTS, ckpt["config"], origin=ckpt_path)  # keys added since it was saved get defaults
    if weights == "guide" and ckpt.get("guide") is None:
        raise ConfigError(f"{ckpt_path} holds no autoguidance guide: it was trained with train.guide_fraction = 0 "
                          f"or saved before step {guide_step(cfg['train'])}; sample it with autoguidance 1")
    model, scheduler = build(cfg, device)
    model.load_state_dict(ckpt[weights])
    return model.eval(), scheduler, cfg


def guide_step(t_cfg):
    """The step whose EMA weights train.py keeps as the guide (None without one)."""
    return max(1, round(t_cfg["guide_fraction"] * t_cfg["steps"])) if t_cfg["guide_fraction"] else None


def load_guide(ckpt_path, autoguidance, device="cpu"):
    """The guide model of a checkpoint if autoguidance is on (w != 1), else None."""
    return None if autoguidance == 1.0 else load_model(ckpt_path, device, "guide")[0]


def image_seed(seed, i):
    """Seed of image i's generator. torch's CPU generator keeps only 32 bits of a seed,
    so (seed, i) is hashed into 32 bits rather than packed as seed << 32 | i."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=4).digest(), "little")


def _randn(generators, shape, device):
    """One draw per image from that image's own generator (CPU, so results match on every device)."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


def predict_eps(model, x, t, labels=None, guidance=1.0, guide=None, autoguidance=1.0):
    """eps_theta(x, t) at the int timestep t. For a conditional model with labels, the
    classifier-free-guided eps, both branches evaluated in one batched network call. With a
    guide (an early, weaker snapshot of the same model), the autoguided eps of Karras et al.
    2024, "Guiding a diffusion model with a bad version of itself": the guide's eps pushed
    towards the model's, eps_g + w (eps - eps_g), which steers samples away from the guide's
    errors; it costs a second network evaluation."""
    tt = torch.full((len(x),), t, device=x.device, dtype=torch.long)
    if guide is not None and autoguidance != 1.0:
        return guided_eps(model(x, tt, labels), guide(x, tt, labels), autoguidance)
    if labels is None or guidance == 1.0:
        return model(x, tt, labels)
    null = torch.full_like(labels, model.num_classes)
    eps_cond, eps_uncond = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, null])).chunk(2)
    return guided_eps(eps_cond, eps_uncond, guidance)


@torch.inference_mode()
def generate(model, scheduler, num_samples, *, seed=0, batch_size=256, sampler="ddim", steps=50, eta=0.0,
             device="cpu", progress=True, record=None, labels=None, guidance=1.0, guide=None, autoguidance=1.0):
    """num_samples images (float, (N, C, H, W) in [-1, 1], on the CPU).

    sampler: "ddpm" (ancestral, DDPM eq. 11 / respaced posterior), "ddim" (DDIM eq. 12 with eta)
    or "dpm++" (DPM-Solver++(2M)); steps: sampling steps (None = all T), one network evaluation
    each, two with guidance w != 1 or autoguidance != 1.
    labels (num_samples,): digits asked of a conditional model, sampled with guidance w.
    guide: the checkpoint's guide model (load_guide), used with autoguidance w != 1.
    record(index, x_t, x0_pred), if given, is called for the first batch at every step.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if autoguidance != 1.0 and guide is None:
        raise ConfigError("autoguidance != 1 needs the checkpoint's guide model (train.guide_fraction > 0)")
    if autoguidance != 1.0 and labels is not None and guidance != 1.0:
        raise ConfigError("use classifier-free guidance or autoguidance, not both: set one of them to 1")
    if labels is not None and not model.num_classes:
        raise ConfigError("this checkpoint is unconditional (model.num_classes = 0): it cannot be asked "
                          "for a digit; train one with config/conditional.yaml")
    shape = (model.in_channels, model.image_size, model.image_size)
    ts = timestep_list(scheduler.num_timesteps, steps or scheduler.num_timesteps)
    prevs = ts[1:] + [-1]
    out = []
    bar = tqdm(total=num_samples * len(ts), desc=f"{sampler} x{len(ts)}", unit="img-step",
               disable=not progress, leave=False)
    for start in range(0, num_samples, batch_size):
        idx = range(start, min(start + batch_size, num_samples))
        gens = [torch.Generator().manual_seed(image_seed(seed, i)) for i in idx]
        y = None if labels is None else labels[start:idx.stop].to(device)
        x = _randn(gens, shape, device)
        x0_last = t_last = None
        for k, (t, t_prev) in enumerate(zip(ts, prevs)):
            eps = predict_eps(model, x, t, y, guidance, guide, autoguidance)
            x0 = scheduler.predict_x0(x, eps, t).clamp(-1.0, 1.0)
            if record is not None and start == 0:
                record(k, x, x0)
            if sampler == "ddpm":
                x = scheduler.ddpm_step(x, eps, t, t_prev, _randn(gens, shape, device))
            elif sampler == "ddim":
                x = scheduler.ddim_step(x, eps, t, t_prev, eta, _randn(gens, shape, device) if eta > 0 else None)
            else:
                x = scheduler.dpm_solver_pp_step(x, x0, t, t_prev, x0_last, t_last)
                x0_last, t_last = x0, t
            bar.update(len(idx))
        out.append(x.clamp(-1.0, 1.0).cpu())
    bar.close()
    return torch.cat(out)


def digit_rows(num_samples, num_classes=10):
    """Labels for a grid with one row per digit: (labels, images per row)."""
    per_row = max(1, num_samples // num_classes)
    return torch.arange(num_classes).repeat_interleave(per_row), per_row


def make_grid(images, nrow=8, pad=2, scale=2):
    """PIL grid of images in [-1, 1] shaped (N, 1, H, W); white padding between cells."""
    pixels = to_uint8(images)[:, 0]
    n, h, w = pixels.shape
    rows = (n + nrow - 1) // nrow
    grid = torch.full((rows * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = pixels[i]
    img = Image.fromarray(grid.numpy(), mode="L")
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale != 1 else img


def atomic_write(path, write):
    """write(file) into a temporary file beside path, then rename: a crash never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_atomic(image, path, **kwargs):
    """Save a PIL image (format from the file's extension) through atomic_write."""
    fmt = os.path.splitext(path)[1][1:].upper().replace("JPG", "JPEG")
    atomic_write(path, lambda f: image.save(f, format=fmt, **kwargs))


def evenly(n, k):
    """k (or fewer) indices spread evenly over range(n), first and last included."""
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})


def save_denoising(frames, ts, strip_path, gif_path, num_frames=10, num_samples=4, gif_frames=50):
    """Strip: for each of num_samples images, a row of x_t and a row of predicted x_0 at chosen steps.
    GIF: x_t (upper half) and predicted x_0 (lower half) of 16 images, at up to gif_frames steps."""
    picks = evenly(len(frames), num_frames)
    rows = []
    for s in range(min(num_samples, frames[0][0].shape[0])):
        rows += [frames[k][0][s] for k in picks] + [frames[k][1][s] for k in picks]
    save_atomic(make_grid(torch.stack(rows), nrow=len(picks)), strip_path)
    gif = [make_grid(torch.cat([frames[k][0][:16], frames[k][1][:16]]), nrow=8, scale=1)
           for k in evenly(len(frames), gif_frames)]
    save_atomic(gif[0], gif_path, save_all=True, append_images=gif[1:] + [gif[-1]] * 10, duration=80, loop=0)
    print(f"denoising strip (x_t and predicted x_0 at t = {[ts[k] for k in picks]}): {strip_path}; GIF: {gif_path}")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="config/default.yaml", help="config whose train.out_dir holds the checkpoint")
    p.add_argument("--ckpt", help="checkpoint path (default: <out_dir>/last.pt, or best.pt with --from_val True)")
    p.add_argument("--from_val", type=str2bool, default=False, help="use the best-validation checkpoint")
    p.add_argument("--sampler", choices=SAMPLERS, help="default: sample.sampler of the config")
    p.add_argument("--steps", type=int, help="sampling steps, one network evaluation each (two with guidance "
                                             "or autoguidance) (default: sample.steps; all T for ddpm)")
    p.add_argument("--eta", type=float, help="DDIM noise: 0 deterministic, 1 DDPM-like (default: sample.eta)")
    p.add_argument("--num_samples", type=int, help="default: sample.num_samples")
    p.add_argument("--batch_size", type=int, help="default: sample.batch_size")
    p.add_argument("--seed", type=int, help="default: sample.seed")
    p.add_argument("--digit", type=int, choices=range(10), metavar="0-9",
                   help="conditional models: the digit to draw (default: one row per digit)")
    p.add_argument("--guidance", type=float, help="conditional models: classifier-free guidance w, "
                                                  "eps_u + w (eps_c - eps_u); 1 = plain conditional "
                                                  "(default: sample.guidance)")
    p.add_argument("--autoguidance", type=float, help="checkpoints with a guide (train.guide_fraction > 0): "
                                                      "eps_g + w (eps - eps_g); 1 = off; each step then costs "
                                                      "two network evaluations (default: sample.autoguidance)")
    p.add_argument("--out", help="grid PNG (default: <out_dir>/samples_<sampler>_<steps>.png)")
    p.add_argument("--save_images", metavar="DIR", help="also write one 28x28 PNG per sample into DIR")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, mps")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.config)
    out_dir = cfg["train"]["out_dir"]
    ckpt_path = args.ckpt or os.path.join(out_dir, "best.pt" if args.from_val else "last.pt")
    device = pick_device(args.device)
    model, scheduler, _ = load_model(ckpt_path, device)
    s = {**cfg["sample"], **{k: v for k, v in vars(args).items() if k in cfg["sample"] and v is not None}}
    if args.sampler == "ddpm" and args.steps is None:
        s["steps"] = scheduler.num_timesteps
    if not 1 <= s["steps"] <= scheduler.num_timesteps:
        raise ConfigError(f"--steps must be in [1, {scheduler.num_timesteps}], got {s['steps']}")
    if s["num_samples"] < 1 or s["batch_size"] < 1:
        raise ConfigError("--num_samples and --batch_size must be >= 1")
    if s["eta"] < 0 or s["guidance"] < 0 or s["autoguidance"] < 0:
        raise ConfigError("--eta, --guidance and --autoguidance must be >= 0")
    guide = load_guide(ckpt_path, s["autoguidance"], device)
    labels, nrow = None, None
    if args.digit is not None:  # generate() refuses it for an unconditional model
        labels = torch.full((s["num_samples"],), args.digit)
    elif model.num_classes:
        labels, nrow = digit_rows(s["num_samples"], model.num_classes)
    frames = []
    images = generate(model, scheduler, len(labels) if labels is not None else s["num_samples"], seed=s["seed"],
                      batch_size=s["batch_size"], sampler=s["sampler"], steps=s["steps"], eta=s["eta"],
                      device=device, labels=labels, guidance=s["guidance"], guide=guide, autoguidance=s["autoguidance"],
                      record=lambda k, x_t, x0: frames.append((x_t[:16].cpu(), x0[:16].cpu())))
    tag = f"{s['sampler']}_{s['steps']}".replace("+", "p") + (f"_ag{s['autoguidance']:g}" if guide else "")
    if labels is not None:
        tag += f"_w{s['guidance']:g}" + (f"_digit{args.digit}" if args.digit is not None else "")
    grid_path = args.out or os.path.join(os.path.dirname(ckpt_path), f"samples_{tag}.png")
    nrow = nrow or (min(8, len(images)) if len(images) < 64 else int(len(images) ** 0.5))
    save_atomic(make_grid(images, nrow=nrow), grid_path)
    how = f"{s['sampler']}, {s['steps']} steps" + (f", autoguidance {s['autoguidance']:g}" if guide else "")
    print(f"{len(images)} samples ({how}, seed {s['seed']}) from {ckpt_path}: {grid_path}")
    ts = timestep_list(scheduler.num_timesteps, s["steps"])
    base = os.path.splitext(grid_path)[0]
    save_denoising(frames, ts, f"{base}_strip.png", f"{base}_denoising.gif")
    if args.save_images:
        os.makedirs(args.save_images, exist_ok=True)
        for i, img in enumerate(images):
            save_atomic(make_grid(img[None], nrow=1, pad=0, scale=1), os.path.join(args.save_images, f"{i:05d}.png"))
        print(f"{len(images)} PNGs (28x28, grayscale): {args.save_images}")


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
