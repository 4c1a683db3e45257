"""Files: atomic writes, image grids, checkpoints, and the model rebuilt from a checkpoint.

Every file is written through a temporary file beside it, flushed to disk, then renamed over the
old one, and the folder is flushed too: a crash or a power cut leaves the old file or the new one,
never half of one. Checkpoints hold tensors, numbers and the resolved config only, so they load
with torch.load(weights_only=True); anything else (pickled code) is refused.
"""

import os

import torch
from PIL import Image

from configuration import DEFAULTS, ConfigError, guide_step, merge
from linear_noise_scheduler import LinearNoiseScheduler
from mnist import to_uint8
from mnist_downloader import fsync_dir
from unet import UNet

CHECKPOINT_KEYS = {"model", "ema", "optimizer", "step", "config"}


def atomic_write(path, write):
    """write(file) into path's temporary file, fsync it, rename it to path, fsync the folder."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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


def load_guide(ckpt_path, autoguidance, device="cpu"):
    """The guide model of a checkpoint if autoguidance is on (w != 1), else None."""
    return None if autoguidance == 1.0 else load_model(ckpt_path, device, "guide")[0]
