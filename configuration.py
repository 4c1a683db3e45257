"""The config schema: every key, its default and what it means; YAML files and dotted overrides on top.

    python configuration.py config/default.yaml [--train.lr=3e-4 ...]   # the resolved config and the key table

The defaults are the DDPM paper's choices (Ho et al. 2020: linear betas, uniform timesteps, the plain
eps loss, Adam at 2e-4 with EMA 0.9999, ancestral sampling over all T steps) on the small MNIST UNet
that the configs train; config/*.yaml list only what they change. The `model:` and `diffusion:`
sections feed UNet(**cfg["model"]) and LinearNoiseScheduler(**cfg["diffusion"]) one to one.
A key that is not here, a value of the wrong type, or a value out of range is a ConfigError naming
the key. This module imports nothing of the project, so every other module can import it.
"""

import copy
import os
import sys

import yaml

# section -> key -> (default, meaning)
SCHEMA = {
    "data": {"root": ("data/mnist", "folder of the four MNIST IDX files (downloaded if missing)"),
             "verify": (True, "check the files against MNIST's SHA-256 once (false: other data in MNIST's format)")},
    "model": {
        "image_size": (28, "height and width of the images"),
        "in_channels": (1, "image channels"),
        "channels": ([16, 32, 64], "UNet width per resolution level (28, 14, 7); len - 1 downsamplings"),
        "num_res_blocks": (1, "ResBlocks per level on the way down (one more on the way up)"),
        "attention": ([False, False, False], "self-attention after each ResBlock of that level"),
        "mid_attention": (True, "self-attention between the two middle ResBlocks (7x7)"),
        "num_heads": (4, "attention heads"),
        "norm_groups": (8, "GroupNorm groups"),
        "dropout": (0.0, "dropout inside the ResBlocks"),
        "num_classes": (0, "0 = unconditional; 10 = digits as labels, for classifier-free guidance"),
        "patch_size": (1, "p > 1: the UNet runs on p x p pixel patches (1/p of the resolution, p*p channels)"),
    },
    "diffusion": {
        "num_timesteps": (1000, "T, the length of the forward chain"),
        "beta_start": (1e-4, "beta_1 of the linear schedule"),
        "beta_end": (0.02, "beta_T of the linear schedule"),
        "prediction": ("eps", "what the network outputs: eps (DDPM) or v = sqrt(abar) eps - sqrt(1 - abar) x_0"),
    },
    "train": {
        "out_dir": ("runs/default", "checkpoints, logs, config.yaml and sample grids go here"),
        "seed": (0, "seed of weights, noise, timesteps and batch order"),
        "steps": (800000, "optimizer steps (with a time budget: chosen at start-up, then saved)"),
        "time_budget": ("0", "wall-clock budget such as 600, 90s, 10m or 1.5h: train as many steps as fit (0 = off)"),
        "batch_size": (128, "images per step (global under torchrun)"),
        "lr": (2e-4, "AdamW learning rate after warm-up"),
        "lr_schedule": ("constant", "constant; cosine down to min_lr_ratio * lr at the last step; or wsd: constant, "
                                    "then linear down to min_lr_ratio * lr over the last decay_fraction of the steps"),
        "min_lr_ratio": (0.1, "cosine and wsd schedules: final learning rate / lr"),
        "decay_fraction": (0.2, "wsd schedule: share of the steps over which the learning rate decays"),
        "warmup_steps": (5000, "linear learning-rate warm-up"),
        "weight_decay": (0.0, "AdamW weight decay"),
        "adam_beta2": (0.999, "AdamW second-moment decay"),
        "grad_clip": (1.0, "gradient-norm clipping (0 = off)"),
        "ema_decay": (0.9999, "EMA of the weights, warmed up as min(ema_decay, (1 + step) / (10 + step))"),
        "loss_weighting": ("none", "none (plain eps MSE, DDPM eq. 14) or min_snr (Hang et al. 2023)"),
        "min_snr_gamma": (5.0, "min_snr: weight min(SNR, gamma) / SNR"),
        "timestep_sampling": ("uniform", "uniform over 0..T-1, or logit_normal: t/T = sigmoid(N(mean, std))"),
        "logit_normal_mean": (0.0, "logit_normal: mean of the normal"),
        "logit_normal_std": (1.0, "logit_normal: standard deviation of the normal"),
        "uniform_share": (0.0, "logit_normal: this share of each batch is drawn uniformly over 0..T-1 instead"),
        "stratified_timesteps": (False, "one timestep per 1/batch quantile band of that distribution (VDM)"),
        "cond_drop_prob": (0.1, "conditional models: share of labels replaced by 'no label'"),
        "guide_fraction": (0.0, "> 0: keep the EMA at this share of the steps as the autoguidance guide"),
        "guide_min_step": (0, "the guide's step is at least this, or half the run if shorter (0 = the fraction only)"),
        "guide_step": (0, "> 0: keep the guide at exactly this step (a budgeted run saves the step it took)"),
        "eval_every": (500, "period of checkpoint, sample grid and (with --val) validation loss"),
        "val_samples": (2000, "images of the validation split (the last 5,000 of MNIST train) in the validation loss"),
        "log_every": (25, "period of the log.csv rows"),
        "num_threads": (0, "torch CPU threads (0 = torch's default)"),
        "amp": ("off", "autocast: off, bf16 or fp16 (fp16 with a gradient scaler)"),
        "compile": (False, "torch.compile the network for training"),
        "channels_last": (False, "NHWC memory format: the convolutions skip a layout copy each way (CPU, and GPUs under AMP)"),
    },
    "sample": {
        "sampler": ("ddpm", "ddpm (ancestral), ddim or dpm++ (DPM-Solver++(2M))"),
        "steps": (0, "sampling steps, evenly spaced (0 = all T)"),
        "eta": (0.0, "ddim: 0 deterministic, 1 DDPM-like noise"),
        "num_samples": (64, "images sample.py draws"),
        "batch_size": (256, "images per network call"),
        "seed": (0, "image i depends only on (seed, i)"),
        "guidance": (1.0, "conditional models: eps_u + w (eps_c - eps_u); 1 = plain conditional"),
        "autoguidance": (1.0, "models with a guide: eps_g + w (eps - eps_g); 1 = off"),
    },
}
DEFAULTS = {section: {key: default for key, (default, _) in keys.items()} for section, keys in SCHEMA.items()}

CHOICES = {("diffusion", "prediction"): ["eps", "v"], ("train", "lr_schedule"): ["constant", "cosine", "wsd"], ("train", "loss_weighting"): ["none", "min_snr"],
           ("train", "timestep_sampling"): ["uniform", "logit_normal"], ("train", "amp"): ["off", "bf16", "fp16"],
           ("sample", "sampler"): ["ddpm", "ddim", "dpm++"]}
POSITIVE = {("train", k) for k in ["steps", "batch_size", "lr", "eval_every", "log_every", "val_samples",
                                   "min_snr_gamma", "logit_normal_std"]} | {
    ("diffusion", "num_timesteps"), ("diffusion", "beta_start"), ("sample", "num_samples"), ("sample", "batch_size")}
NON_NEGATIVE = {("train", k) for k in ["warmup_steps", "weight_decay", "grad_clip", "num_threads",
                                       "guide_min_step", "guide_step"]} | {
    ("sample", k) for k in ["steps", "eta", "guidance", "autoguidance"]}
UNIT_INTERVAL = {"adam_beta2": "[0, 1)", "ema_decay": "[0, 1)", "guide_fraction": "[0, 1) (0 = no guide)",
                 "cond_drop_prob": "[0, 1]", "uniform_share": "[0, 1]", "min_lr_ratio": "[0, 1]",
                 "decay_fraction": "[0, 1]"}


class ConfigError(ValueError):
    """A mistake in a config, a flag or an input file; the message says what to change."""


def _all_keys():
    return [f"{s}.{k}" for s in DEFAULTS for k in DEFAULTS[s]]


def _set(cfg, dotted, value, origin):
    section, _, key = dotted.partition(".")
    if section not in DEFAULTS or key not in DEFAULTS[section]:
        raise ConfigError(f"unknown config key {dotted!r} ({origin}); valid keys: {', '.join(_all_keys())}")
    default = DEFAULTS[section][key]
    if dotted == "train.amp" and value is False:  # YAML 1.1 reads a bare `off` as false
        value = "off"
    if dotted == "train.time_budget" and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # 600 means 600 seconds
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


def with_flags(cfg, section, flags):
    """cfg with the command-line flags {key: value or None} of one section applied (None = not given),
    validated exactly as config overrides are."""
    given = {key: value for key, value in flags.items() if value is not None}
    return merge(cfg, {section: given}, origin="command line")


def validate(cfg):
    """Range checks of every section, the model's structural checks included."""
    for (section, key), allowed in CHOICES.items():
        if cfg[section][key] not in allowed:
            raise ConfigError(f"{section}.{key} must be one of {allowed}, got {cfg[section][key]!r}")
    for section, key in POSITIVE:
        if not cfg[section][key] > 0:
            raise ConfigError(f"{section}.{key} must be > 0, got {cfg[section][key]!r}")
    for section, key in NON_NEGATIVE:
        if cfg[section][key] < 0:
            raise ConfigError(f"{section}.{key} must be >= 0, got {cfg[section][key]!r}")
    t, d = cfg["train"], cfg["diffusion"]
    for key, interval in UNIT_INTERVAL.items():
        high_ok = t[key] <= 1 if interval.startswith("[0, 1]") else t[key] < 1
        if not (0 <= t[key] and high_ok):
            raise ConfigError(f"train.{key} must be in {interval}, got {t[key]}")
    if not 0 < d["beta_start"] < d["beta_end"] < 1:
        raise ConfigError(f"need 0 < diffusion.beta_start < diffusion.beta_end < 1, "
                          f"got {d['beta_start']} and {d['beta_end']}")
    parse_duration(t["time_budget"])
    if cfg["sample"]["autoguidance"] != 1.0 and guide_step(t) is None:
        raise ConfigError(f"sample.autoguidance = {cfg['sample']['autoguidance']} needs a guide: set "
                          "train.guide_fraction > 0, or sample.autoguidance=1 to sample without one")
    if cfg["sample"]["steps"] > d["num_timesteps"]:
        raise ConfigError(f"sample.steps ({cfg['sample']['steps']}) cannot exceed diffusion.num_timesteps "
                          f"({d['num_timesteps']})")
    check_model(**cfg["model"])


def check_model(image_size, in_channels, channels, num_res_blocks, attention, mid_attention, num_heads,
                norm_groups, dropout, num_classes, patch_size=1):
    """Reject model sections that cannot build or run, naming the config key to change."""
    if patch_size < 1 or image_size % patch_size:
        raise ConfigError(f"model.patch_size must be a positive divisor of model.image_size ({image_size}), "
                          f"got {patch_size}")
    if not channels or any(int(c) != c or c < 1 for c in channels):
        raise ConfigError(f"model.channels must be a non-empty list of positive ints, got {channels}")
    if in_channels < 1:
        raise ConfigError(f"model.in_channels must be >= 1, got {in_channels}")
    factor, size = 2 ** (len(channels) - 1), image_size // patch_size
    if size % factor:
        levels = max(i for i in range(len(channels)) if size % 2**i == 0) + 1
        raise ConfigError(f"model.image_size {image_size} / model.patch_size {patch_size} = {size} is not divisible "
                          f"by 2**{len(channels) - 1} = {factor} (one downsampling between each of the "
                          f"{len(channels)} levels of model.channels): use at most {levels} levels")
    if channels[0] % 2:
        raise ConfigError(f"model.channels[0] = {channels[0]} must be even (it sizes the sinusoidal time embedding)")
    for c in channels:
        if c % norm_groups:
            raise ConfigError(f"model.channels entry {c} is not divisible by model.norm_groups = {norm_groups}")
    if len(attention) != len(channels):
        raise ConfigError(f"model.attention needs one bool per level of model.channels "
                          f"({len(channels)}), got {len(attention)}")
    for c, on in zip(channels, attention):
        if on and c % num_heads:
            raise ConfigError(f"model.channels entry {c} has attention but is not divisible by "
                              f"model.num_heads = {num_heads}")
    if mid_attention and channels[-1] % num_heads:
        raise ConfigError(f"model.channels[-1] = {channels[-1]} (mid attention) is not divisible by "
                          f"model.num_heads = {num_heads}")
    if num_res_blocks < 1:
        raise ConfigError(f"model.num_res_blocks must be >= 1, got {num_res_blocks}")
    if num_classes < 0:
        raise ConfigError(f"model.num_classes must be 0 (unconditional) or the number of labels, got {num_classes}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {dropout}")


def parse_duration(text):
    """Seconds of "600", "90s", "10m" or "1.5h" (0 = no budget); a ConfigError for anything else."""
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise ConfigError(f"train.time_budget must be seconds or a duration such as 90s, 10m or 1.5h, "
                          f"got {text!r}") from None
    if not seconds >= 0:
        raise ConfigError(f"train.time_budget must be >= 0, got {text!r}")
    return seconds


def guide_step(t_cfg):
    """The step whose EMA weights training keeps as the autoguidance guide (None without one):
    guide_step if set, else guide_fraction of the steps, but not before guide_min_step, or half the
    run if that is shorter.
    A short run's fraction step is too early to help: its EMA has barely learnt digits, and steering
    away from it does little (docs/cpu_recipe.md)."""
    if t_cfg["guide_step"]:
        return t_cfg["guide_step"]
    if not t_cfg["guide_fraction"]:
        return None
    later = min(t_cfg["guide_min_step"], t_cfg["steps"] // 2)  # 0 with no minimum: the fraction rules
    return max(1, round(t_cfg["guide_fraction"] * t_cfg["steps"]), later)


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


DEVICE_HELP = "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps (default: %(default)s)"


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
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("--device mps asked for, but torch sees no MPS device; use --device cpu")
    return device


def run_cli(main, *errors):
    """Run a script's main(); a user's mistake (a ConfigError, or one of `errors`) exits with a
    one-line `error: ...` message instead of a traceback."""
    try:
        return main()
    except (ConfigError, *errors) as e:
        sys.exit(f"error: {e}")


def key_table(cfg):
    """The schema as text: key, value in cfg (with the default where they differ), meaning."""
    rows = []
    for section, keys in SCHEMA.items():
        for key, (default, meaning) in keys.items():
            value = cfg[section][key]
            shown = f"{value!r}" if value == default else f"{value!r} (default {default!r})"
            rows.append((f"{section}.{key}", shown, meaning))
    w1, w2 = (max(len(r[i]) for r in rows) for i in (0, 1))
    return "\n".join(f"{k:<{w1}}  {v:<{w2}}  {m}" for k, v, m in rows)


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="YAML config (default: the schema's defaults alone)")
    rest, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(rest)
    cfg = load_config(args.config, overrides) if args.config else merge(DEFAULTS, {}, overrides)
    print(f"# resolved config{f' of {args.config}' if args.config else ''}")
    print(yaml.safe_dump(cfg, sort_keys=False), end="")
    print("\n# every key: value here (default), meaning\n" + key_table(cfg))


if __name__ == "__main__":
    run_cli(main)
