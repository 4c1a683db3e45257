"""Files: atomic writes, image grids, checkpoints, and the model rebuilt from a checkpoint.

Every file is written through a temporary file beside it, flushed to disk, then renamed over the
old one, and the folder is flushed too: a crash or a power cut leaves the old file or the new one,
never half of one. Checkpoints hold tensors, numbers and the resolved config only, so they load
with torch.load(weights_only=True); anything else (pickled code) is refused.
"""

import math
import os

import torch
from PIL import Image, ImageDraw, ImageFont

from configuration import DEFAULTS, ConfigError, guide_step, merge
from linear_noise_scheduler import LinearNoiseScheduler
from mnist import MNIST, to_uint8
from mnist_downloader import atomic_write, fsync_dir  # noqa: F401 (atomic_write is used from here)
from unet import UNet

CHECKPOINT_KEYS = {"model", "ema", "optimizer", "step", "config"}


def save_image(image, path, **kwargs):
    """Save a PIL image (format from the file's extension) through atomic_write."""
    fmt = os.path.splitext(path)[1][1:].upper().replace("JPG", "JPEG")
    atomic_write(path, lambda f: image.save(f, format=fmt, **kwargs))


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


PLOT_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]


def line_plot(series, title, x_label, y_label, log_x=False, size=(760, 480), marks=0):
    """PIL image of lines {label: [(x, y), ...]} on a logarithmic y axis (decades marked), x linear or
    logarithmic in x + 1; the first `marks` points of each line get a dot. Points with y <= 0 are left out."""
    width, height = size
    left, right, top, bottom = 70, 20, 40, 50
    series = {k: [(x, y) for x, y in p if y is not None and y > 0 and math.isfinite(y)] for k, p in series.items()}
    xs = [x for p in series.values() for x, _ in p] or [0, 1]
    ys = [y for p in series.values() for _, y in p] or [1.0]
    lo, hi = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
    hi = max(hi, lo + 1)
    fx = (lambda x: math.log10(x + 1)) if log_x else (lambda x: x)
    x0, x1 = fx(min(xs)), max(fx(max(xs)), fx(min(xs)) + 1e-9)

    def xy(x, y):
        return (left + (width - left - right) * (fx(x) - x0) / (x1 - x0),
                top + (height - top - bottom) * (hi - math.log10(y)) / (hi - lo))

    img = Image.new("RGB", size, "white")
    d, font = ImageDraw.Draw(img), ImageFont.load_default()
    for e in range(lo, hi + 1):
        y = xy(min(xs), 10.0 ** e)[1]
        d.line([(left, y), (width - right, y)], fill=(225, 225, 225))
        d.text((8, y - 6), f"1e{e}", fill="black", font=font)
    ticks = ([t for t in [0, 1, 4, 9, 19, 49, 99, 199, 499, 999, 1999, 4999, 9999, 99999] if min(xs) <= t <= max(xs)]
             if log_x else [min(xs) + (max(xs) - min(xs)) * i / 5 for i in range(6)])
    for t in ticks:
        x = xy(t, 1.0)[0]
        d.line([(x, height - bottom), (x, height - bottom + 4)], fill="black")
        d.text((x - 8, height - bottom + 8), f"{t:.0f}" if max(xs) - min(xs) >= 10 else f"{t:.3g}", fill="black", font=font)
    d.rectangle([left, top, width - right, height - bottom], outline="black")
    for i, (label, points) in enumerate(series.items()):
        colour, line = PLOT_COLOURS[i % len(PLOT_COLOURS)], [xy(x, y) for x, y in points]
        if len(line) > 1:
            d.line(line, fill=colour, width=1)
        for x, y in line[:marks]:
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        d.line([(width - 170, top + 15 + 15 * i), (width - 150, top + 15 + 15 * i)], fill=colour, width=2)
        d.text((width - 145, top + 9 + 15 * i), label, fill="black", font=font)
    d.text((left, 10), title, fill="black", font=font)
    d.text((left + 5, top + 5), y_label, fill="black", font=font)
    d.text((width // 2 - 3 * len(x_label), height - 20), x_label, fill="black", font=font)
    return img


def save_checkpoint(path, state):
    """torch.save through atomic_write: a crash never leaves a half checkpoint."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path, hint="train first with `python train.py --config config/default.yaml`, or pass --ckpt"):
    """The checkpoint dict at path; a missing, damaged or foreign file is a ConfigError saying so."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found: {hint}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, EOFError, ... here
        why = (str(e) or type(e).__name__).strip().splitlines()[0][:160]
        code = "weights only load failed" in str(e).lower()
        what = "holds pickled code or objects, which are never loaded" if code else "is damaged or not a checkpoint"
        raise ConfigError(f"{path} {what} ({why}); {_other_checkpoints(path)}") from None
    if not isinstance(ckpt, dict) or not CHECKPOINT_KEYS <= set(ckpt):
        raise ConfigError(f"{path} is not a checkpoint of this project (expected the keys "
                          f"{sorted(CHECKPOINT_KEYS)}); {_other_checkpoints(path)}")
    return ckpt


def _other_checkpoints(path):
    """What to do about a bad checkpoint: the other checkpoints of its run folder, if any."""
    folder = os.path.dirname(os.path.abspath(path))
    others = sorted(f for f in os.listdir(folder) if f.endswith(".pt") and f != os.path.basename(path)
                    and not f.startswith("classifier"))
    if others:
        return f"the run folder also holds {', '.join(others)}: pass one with --ckpt, or copy it over {path}"
    return "train again (--overwrite), or pass another checkpoint"


def build(cfg, device="cpu"):
    """Model and scheduler from a resolved config (the sections map 1:1 to the constructors)."""
    return UNet(**cfg["model"]).to(device), LinearNoiseScheduler(**cfg["diffusion"]).to(device)


def load_model(ckpt_path, device="cpu", weights="ema"):
    """(model in eval mode, scheduler, config) from a checkpoint. weights: "ema" (the model to
    sample from) or "guide" (the early EMA snapshot that autoguidance steers away from)."""
    ckpt = load_checkpoint(ckpt_path)
    cfg = merge(DEFAULTS, ckpt["config"], origin=ckpt_path)
    if weights == "guide" and ckpt.get("guide") is None:
        raise ConfigError(f"{ckpt_path} holds no autoguidance guide: it was trained with train.guide_fraction = 0 "
                          f"or saved before step {guide_step(cfg['train'])}; sample it with autoguidance 1")
    model, scheduler = build(cfg, device)
    try:
        model.load_state_dict(ckpt[weights])
    except RuntimeError as e:
        raise ConfigError(f"{ckpt_path}: its {weights} weights do not fit its own model config "
                          f"({str(e).splitlines()[0]})") from None
    return model.eval(), scheduler, cfg


def load_label_counts(ckpt_path, data_root):
    """How often each label occurs in the training split of a labelled checkpoint (train.py saves it),
    for sampling p(x) = sum_y p(y) p(x | y); a checkpoint saved without it has them counted from the
    training split at data_root."""
    counts = load_checkpoint(ckpt_path).get("label_counts")
    if counts is None:
        counts = torch.bincount(MNIST(data_root, "train").labels)
    return counts


def load_guide(ckpt_path, autoguidance, device="cpu"):
    """The guide model of a checkpoint if autoguidance is on (w != 1), else None."""
    return None if autoguidance == 1.0 else load_model(ckpt_path, device, "guide")[0]
