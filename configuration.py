"""Config: defaults in code, a YAML file on top, dotted command-line overrides on top of that.

Every key that exists is listed in DEFAULTS; the `model:` and `diffusion:` sections feed
UNet(**cfg["model"]) and LinearNoiseScheduler(**cfg["diffusion"]) one to one. A key
that is not here, a value of the wrong type, or a value out of range is an error
that names the key.
"""

import copy
import os

import yaml

DEFAULTS = {
    "data": {"root": "data/mnist"},
    "model": {"image_size": 28, "in_channels": 1, "channels": [32, 64, 64], "num_res_blocks": 1,
              "attention": [False, False, True], "mid_attention": True, "num_heads": 4,
              "norm_groups": 8, "dropout": 0.0, "num_classes": 0},
    "diffusion": {"num_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02},
    "train": {
        "out_dir": "runs/default",  # checkpoints, log.csv, sample grids
        "seed": 0,
        "steps": 2000,
        "batch_size": 128,
        "lr": 1e-3,
        "lr_schedule": "cosine",  # constant | cosine (to min_lr_ratio * lr at the last step)
        "min_lr_ratio": 0.1,
        "warmup_steps": 100,
        "weight_decay": 0.0,
        "grad_clip": 1.0,
        "ema_decay": 0.999,  # with warm-up: min(ema_decay, (1 + step) / (10 + step))
        "loss_weighting": "none",  # none | min_snr (Hang et al. 2023, gamma = min_snr_gamma)
        "min_snr_gamma": 5.0,
        "timestep_sampling": "uniform",  # uniform | logit_normal: t/T ~ sigmoid(N(mean, std)) (Esser et al. 2024)
        "logit_normal_mean": 0.0,
        "logit_normal_std": 1.0,
        "stratified_timesteps": False,  # one timestep per 1/batch quantile band of that distribution (VDM)
        "adam_beta2": 0.999,
        "cond_drop_prob": 0.1,  # conditional models: share of labels replaced by "no label"
        "eval_every": 500,  # checkpoint, sample grid and (with --val) validation loss
        "val_samples": 2000,  # test images used for the validation loss
        "log_every": 25,
        "num_threads": 0,  # torch CPU threads; 0 = torch's default
        "amp": "off",  # off | bf16 | fp16 (autocast; fp16 with a gradient scaler)
        "compile": False,  # torch.compile the network for training
        "channels_last": False,  # NHWC memory format (helps convolutions under AMP on GPUs)
        "guide_fraction": 0.0,  # > 0: keep the EMA at this share of the steps as the autoguidance guide
    },
    "sample": {"sampler": "ddim", "steps": 50, "eta": 0.0, "num_samples": 64, "batch_size": 256, "seed": 0,
               "guidance": 1.0,  # conditional models: eps_u + guidance * (eps_c - eps_u)
               "autoguidance": 1.0},  # models with a guide: eps_g + autoguidance * (eps - eps_g); 1 = off
}

CHOICES = {("train", "lr_schedule"): ["constant", "cosine"], ("train", "loss_weighting"): ["none", "min_snr"],
           ("train", "timestep_sampling"): ["uniform", "logit_normal"], ("train", "amp"): ["off", "bf16", "fp16"],
           ("sample", "sampler"): ["ddpm", "ddim", "dpm++"]}
POSITIVE = {("train", k) for k in ["steps", "batch_size", "lr", "eval_every", "log_every", "val_samples",
                                   "min_snr_gamma", "logit_normal_std"]} | {("diffusion", "num_timesteps"), ("diffusion", "beta_start"),
                                                        ("sample", "steps"), ("sample", "num_samples"),
                                                        ("sample", "batch_size")}


class ConfigError(ValueError):
    """A config mistake; the message names the key."""


def _all_keys(d=DEFAULTS):
    return [f"{s}.{k}" for s in d for k in d[s]]


def _set(cfg, dotted, value, origin):
    section, _, key = dotted.partition(".")
    if section not in DEFAULTS or key not in DEFAULTS[section]:
        raise ConfigError(f"unknown config key {dotted!r} ({origin}); valid keys: {', '.join(_all_keys())}")
    default = DEFAULTS[section][key]
    if dotted == "train.amp" and value is False:  # YAML 1.1 reads a bare `off` as false
        value = "off"
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(default, float) and isinstance(value, str):
        try:  # YAML 1.1 reads 3e-4 (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if type(value) is not type(default):
        raise ConfigError(f"{dotted} must be a {type(default).__name__} like {default!r}, "
                          f"got {value!r} ({type(value).__name__}) ({origin})")
    if isinstance(default, list) and value and default and type(value[0]) is not type(default[0]):
        raise ConfigError(f"{dotted} must be a list of {type(default[0]).__name__}, got {value!r} ({origin})")
    cfg[section][key] = value


def read_yaml(path, what="config file", hint=" (try config/default.yaml)"):
    """The YAML document at path ({} if empty); a missing file or bad YAML is a ConfigError."""
    if not os.path.isfile(path):
        raise ConfigError(f"{what} {path!r} not found{hint}")
    with open(path) as f:
        try:
            return yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None


def load_config(path, overrides=()):
    """DEFAULTS <- YAML file at `path` <- overrides ["train.lr=3e-4", ...]; validated."""
    return merge(DEFAULTS, read_yaml(path), overrides, origin=path)


def merge(base, data, overrides=(), origin="config"):
    """Copy of `base` with the nested dict `data` and the dotted overrides applied, validated."""
    cfg = copy.deepcopy(base)
    if not isinstance(data, dict):
        raise ConfigError(f"{origin} must be a mapping of sections, got {type(data).__name__}")
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"section {section!r} in {origin} must be a mapping; valid keys: "
                              f"{', '.join(_all_keys())}")
        for key, value in values.items():
            _set(cfg, f"{section}.{key}", value, origin)
    for item in overrides:
        dotted, eq, text = item.partition("=")
        if not eq:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.lr=3e-4")
        _set(cfg, dotted, yaml.safe_load(text), "command line")
    validate(cfg)
    return cfg


def validate(cfg):
    """Range checks; the model's own structural checks live in unet.check_config."""
    for (section, key), allowed in CHOICES.items():
        if cfg[section][key] not in allowed:
            raise ConfigError(f"{section}.{key} must be one of {allowed}, got {cfg[section][key]!r}")
    for section, key in POSITIVE:
        if not cfg[section][key] > 0:
            raise ConfigError(f"{section}.{key} must be > 0, got {cfg[section][key]!r}")
    d = cfg["diffusion"]
    if not 0 < d["beta_start"] < d["beta_end"] < 1:
        raise ConfigError(f"need 0 < diffusion.beta_start < diffusion.beta_end < 1, "
                          f"got {d['beta_start']} and {d['beta_end']}")
    t = cfg["train"]
    for key in ["warmup_steps", "weight_decay", "grad_clip", "num_threads"]:
        if t[key] < 0:
            raise ConfigError(f"train.{key} must be >= 0, got {t[key]}")
    if not 0 <= t["adam_beta2"] < 1:
        raise ConfigError(f"train.adam_beta2 must be in [0, 1), got {t['adam_beta2']}")
    if not 0 <= t["ema_decay"] < 1:
        raise ConfigError(f"train.ema_decay must be in [0, 1), got {t['ema_decay']}")
    if not 0 <= t["cond_drop_prob"] <= 1:
        raise ConfigError(f"train.cond_drop_prob must be in [0, 1], got {t['cond_drop_prob']}")
    for key in ["guidance", "autoguidance"]:
        if cfg["sample"][key] < 0:
            raise ConfigError(f"sample.{key} must be >= 0, got {cfg['sample'][key]}")
    if not 0 <= t["guide_fraction"] < 1:
        raise ConfigError(f"train.guide_fraction must be in [0, 1) (0 = no guide), got {t['guide_fraction']}")
    if cfg["sample"]["autoguidance"] != 1.0 and not t["guide_fraction"]:
        raise ConfigError(f"sample.autoguidance = {cfg['sample']['autoguidance']} needs a guide: set "
                          "train.guide_fraction > 0, or sample.autoguidance=1 to sample without one")
    if not 0 <= t["min_lr_ratio"] <= 1:
        raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {t['min_lr_ratio']}")
    from unet import check_config  # the model's structural checks, at load time rather than mid-run

    m = cfg["model"]
    check_config(m["image_size"], m["channels"], m["num_res_blocks"], m["attention"], m["mid_attention"],
                 m["num_heads"], m["norm_groups"], m["dropout"], m["num_classes"])
    if cfg["sample"]["steps"] > d["num_timesteps"]:
        raise ConfigError(f"sample.steps ({cfg['sample']['steps']}) cannot exceed diffusion.num_timesteps "
                          f"({d['num_timesteps']})")


def split_overrides(argv):
    """Pull `--section.key=value` and `--section.key value` out of argv; return (rest, overrides)."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        name = arg[2:].partition("=")[0] if arg.startswith("--") else ""
        if "." in name:
            if "=" in arg:
                overrides.append(arg[2:])
            elif i + 1 < len(argv):
                overrides.append(f"{name}={argv[i + 1]}")
                i += 1
            else:
                raise ConfigError(f"{arg} needs a value, e.g. {arg}=...")
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def str2bool(text):
    """argparse type for the README's `--val True` style flags."""
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"expected True or False, got {text!r}")


def pick_device(name="auto"):
    """cuda, then mps, then cpu; or the device named."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:1 or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu")
    return device
