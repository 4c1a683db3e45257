"""The sampling loop: from noise x_T to images, with any of the three samplers, guided or not.

    for t, t_prev in timesteps:                              # timestep_list, trailing from T-1 to 0
        eps = model_eps(model, scheduler, x_t, t, ...)       # guided eps: classifier-free or autoguidance
        x0 = scheduler.predict_x0(x_t, eps, t).clamp(-1, 1)  # once per step
        x_t = SAMPLERS[name](scheduler, x_t, x0, t, t_prev, noise, state, eta)

Every sampler takes the same step call; `state` is a dict that lives for one batch (DPM-Solver++
keeps its previous x0 there) and `noise()` draws fresh noise from each image's own generator, only
for the samplers that use it. Image i depends only on (seed, i), never on the batch size.
"""

import hashlib

import torch
from tqdm import tqdm

from configuration import ConfigError
from linear_noise_scheduler import guided_eps, timestep_list


def ddpm(scheduler, x, x0, t, t_prev, noise, state, eta):
    """Ancestral step, DDPM eq. 11 (respaced: the posterior between t and t_prev)."""
    return scheduler.ddpm_step(x, x0, t, t_prev, noise())


def ddim(scheduler, x, x0, t, t_prev, noise, state, eta):
    """DDIM eq. 12; fresh noise only when eta > 0."""
    return scheduler.ddim_step(x, x0, t, t_prev, eta, noise() if eta > 0 else None)


def dpm_solver_pp(scheduler, x, x0, t, t_prev, noise, state, eta):
    """DPM-Solver++(2M): second order from the second step on, with the x0 of the step before."""
    x_prev = scheduler.dpm_solver_pp_step(x, x0, t, t_prev, state.get("x0"), state.get("t"))
    state.update(x0=x0, t=t)
    return x_prev


SAMPLERS = {"ddpm": ddpm, "ddim": ddim, "dpm++": dpm_solver_pp}


def model_eps(model, scheduler, x, t, labels=None, guidance=1.0, guide=None, autoguidance=1.0):
    """eps_theta(x, t) at the int timestep t, guided as guided_output says, whatever the network
    predicts (diffusion.prediction: eps, or v converted to eps)."""
    return scheduler.eps_from_output(guided_output(model, x, t, labels, guidance, guide, autoguidance), x, t)


def guided_output(model, x, t, labels=None, guidance=1.0, guide=None, autoguidance=1.0):
    """The network's output (eps or v) at the int timestep t. For a conditional model with labels,
    the classifier-free-guided output, both branches evaluated in one batched network call. With a
    guide (an early, weaker snapshot of the same model), the autoguided eps of Karras et al.
    2024, "Guiding a diffusion model with a bad version of itself": the guide's eps pushed
    towards the model's, eps_g + w (eps - eps_g), which steers samples away from the guide's
    errors; it costs a second network evaluation. Both mixes are linear, and eps is linear in v
    at fixed x and t, so mixing v outputs mixes the eps they stand for."""
    tt = torch.full((len(x),), t, device=x.device, dtype=torch.long)
    if guide is not None and autoguidance != 1.0:
        return guided_eps(model(x, tt, labels), guide(x, tt, labels), autoguidance)
    if labels is None or guidance == 1.0:
        return model(x, tt, labels)
    null = torch.full_like(labels, model.num_classes)
    eps_cond, eps_uncond = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, null])).chunk(2)
    return guided_eps(eps_cond, eps_uncond, guidance)


def image_seed(seed, i):
    """Seed of image i's generator. torch's CPU generator keeps only 32 bits of a seed,
    so (seed, i) is hashed into 32 bits rather than packed as seed << 32 | i."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=4).digest(), "little")


def randn_per_image(generators, shape, device):
    """One draw per image from that image's own generator (CPU, so results match on every device)."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


def sample_loop(model, scheduler, x, timesteps, sampler, noise, eta=0.0, labels=None, guidance=1.0, guide=None,
                autoguidance=1.0):
    """Run the reverse chain from x at timesteps[0]; yield (x_t, x0_pred, x_prev) at every step.
    The last x_prev is the sample."""
    step, state = SAMPLERS[sampler], {}
    for t, t_prev in zip(timesteps, timesteps[1:] + [-1]):
        eps = model_eps(model, scheduler, x, t, labels, guidance, guide, autoguidance)
        x0 = scheduler.predict_x0(x, eps, t).clamp(-1.0, 1.0)
        x_prev = step(scheduler, x, x0, t, t_prev, noise, state, eta)
        yield x, x0, x_prev
        x = x_prev


def check_sampling(model, sampler, labels, guidance, guide, autoguidance):
    """A clear error for a request the model cannot serve."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"sampler must be one of {list(SAMPLERS)}, got {sampler!r}")
    if autoguidance != 1.0 and guide is None:
        raise ConfigError("autoguidance != 1 needs the checkpoint's guide model (train.guide_fraction > 0)")
    if autoguidance != 1.0 and labels is not None and guidance != 1.0:
        raise ConfigError("use classifier-free guidance or autoguidance, not both: set one of them to 1")
    if labels is not None and not model.num_classes:
        raise ConfigError("this checkpoint is unconditional (model.num_classes = 0): it cannot be asked "
                          "for a digit; train one with config/conditional.yaml")


@torch.inference_mode()
def generate(model, scheduler, num_samples, *, seed=0, batch_size=256, sampler="ddpm", steps=0, eta=0.0,
             device="cpu", progress=True, labels=None, guidance=1.0, guide=None, autoguidance=1.0,
             return_frames=False):
    """num_samples images (float, (N, C, H, W) in [-1, 1], on the CPU).

    sampler: a name of SAMPLERS; steps: sampling steps (0 or None = all T), one network evaluation
    each, two with guidance w != 1 or autoguidance != 1.
    labels (num_samples,): digits asked of a conditional model, sampled with guidance w.
    guide: the checkpoint's guide model (fileio.load_guide), used with autoguidance w != 1.
    return_frames: also return, for the first batch, (x_t, x0_pred) of up to 16 images at every step.
    """
    check_sampling(model, sampler, labels, guidance, guide, autoguidance)
    shape = (model.in_channels, model.image_size, model.image_size)
    ts = timestep_list(scheduler.num_timesteps, steps or scheduler.num_timesteps)
    out, frames = [], []
    bar = tqdm(total=num_samples * len(ts), desc=f"{sampler} x{len(ts)}", unit="img-step",
               disable=not progress, leave=False)
    for start in range(0, num_samples, batch_size):
        idx = range(start, min(start + batch_size, num_samples))
        gens = [torch.Generator().manual_seed(image_seed(seed, i)) for i in idx]
        y = None if labels is None else labels[start:idx.stop].to(device)
        x = randn_per_image(gens, shape, device)
        for x_t, x0, x in sample_loop(model, scheduler, x, ts, sampler, lambda: randn_per_image(gens, shape, device),
                                      eta, y, guidance, guide, autoguidance):
            if return_frames and start == 0:
                frames.append((x_t[:16].cpu(), x0[:16].cpu()))
            bar.update(len(idx))
        out.append(x.clamp(-1.0, 1.0).cpu())
    bar.close()
    images = torch.cat(out)
    return (images, frames) if return_frames else images


def digit_rows(num_samples, num_classes=10):
    """Labels for a grid with one row per digit: (labels, images per row)."""
    per_row = max(1, num_samples // num_classes)
    return torch.arange(num_classes).repeat_interleave(per_row), per_row


def draw_labels(label_counts, num_samples, seed=0):
    """num_samples labels drawn from the label frequencies label_counts (num_classes,), label i from a
    generator of its own (seeded by (seed, i), apart from image i's noise): generate() with them is an
    exact sample of a labelled model's p(x) = sum_y p(y) p(x | y), and image i's label and noise still
    depend only on seed and i."""
    probs = label_counts.double() / label_counts.sum()
    gens = [torch.Generator().manual_seed(image_seed(f"{seed}/labels", i)) for i in range(num_samples)]
    return torch.cat([torch.multinomial(probs, 1, generator=g) for g in gens])


def requested_labels(digit, num_samples, num_classes, label_counts=None, seed=0):
    """(labels or None, images per grid row or None) for sample.py's and evaluate.py's --digit (text):
    None: one row per digit of a labelled model; "0".."9": that digit; "any": digits drawn from the
    training labels' frequencies label_counts (draw_labels); "none": the "no label" class (labels
    None, which a labelled UNet reads as its null class). An unconditional model takes None, "any"
    or "none", each of which means its p(x)."""
    if digit is None:
        return digit_rows(num_samples, num_classes) if num_classes else (None, None)
    if digit not in ("any", "none") and not digit.isdigit():
        raise ConfigError(f"--digit takes a digit such as 7, any or none, got {digit!r}")
    if digit == "none" or digit == "any" and not num_classes:
        return None, None
    if digit == "any":
        if label_counts is None:
            raise ConfigError("--digit any needs the training labels' frequencies; this checkpoint holds none")
        return draw_labels(label_counts, num_samples, seed), None
    if not num_classes:
        raise ConfigError("this checkpoint is unconditional (model.num_classes = 0): it cannot be asked "
                          "for a digit; leave out --digit, or train a labelled model (config/default.yaml)")
    if int(digit) >= num_classes:
        raise ConfigError(f"--digit takes 0-{num_classes - 1}, any or none, got {digit!r}")
    return torch.full((num_samples,), int(digit)), None
