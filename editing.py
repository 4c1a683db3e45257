"""More than sampling: inpainting, DDIM encoding, interpolation and one noise drawn as every digit.

    python sample.py --config config/default.yaml --inpaint --images 0,1,2,3 --mask bottom   # RePaint
    python sample.py --config config/default.yaml --inpaint --mask center --jumps 5 --resample 3
    python sample.py --config config/default.yaml --encode --images 0,1,2,3 --steps 50       # x_T and back
    python sample.py --config config/default.yaml --interpolate 0,1                          # slerp of x_T
    python sample.py --config config/conditional.yaml --every_digit                          # one noise, 0-9
    python evaluate.py --ckpt runs/default/last.pt --inpaint_eval 300                        # the measurement

Images are float (N, C, H, W) in [-1, 1] like MNIST items; a mask `keep` is (C, H, W) or (N, C, H, W),
1 where a pixel is known and kept, 0 where the model fills it in (RePaint's "gt_keep_mask": in a
PNG mask white is kept, black is filled). Every method runs on the reverse steps of samplers.py
(SAMPLERS, model_eps, so with classifier-free guidance or autoguidance) and on the scheduler's
q(x_t | x_0); nothing here re-implements a step. Completion c of image i depends only on
(seed, i, c), never on the batch.
"""

import os

import torch
from PIL import Image
from tqdm import tqdm

from configuration import ConfigError
from fileio import atomic_write, make_grid, save_image
from linear_noise_scheduler import timestep_list
from mnist import MNIST, to_float
from samplers import SAMPLERS, check_sampling, image_seed, model_eps, randn_per_image, requested_labels, sample_loop

MASKS = ["top", "bottom", "left", "right", "center", "random"]  # the region to fill in


# ----------------------------------------------------------------------------
# Inputs: masks and images
# ----------------------------------------------------------------------------

def make_mask(name, size=28, channels=1, seed=0):
    """keep (channels, size, size) float, 1 = known, 0 = to fill, from a mask name or a PNG file.

    name: top, bottom, left or right (that half is filled), center (the middle half-size box),
    random or random:P (a share P of the pixels, 0.5 by default, drawn with `seed`), or the path
    of a size x size PNG (white = keep, black = fill; thresholded at 128)."""
    h = size // 2
    keep = torch.ones(channels, size, size)
    if name in ("top", "bottom", "left", "right"):
        region = {"top": (slice(0, h), slice(None)), "bottom": (slice(h, None), slice(None)),
                  "left": (slice(None), slice(0, h)), "right": (slice(None), slice(h, None))}[name]
        keep[(slice(None), *region)] = 0
    elif name == "center":
        a = (size - h) // 2
        keep[:, a:a + h, a:a + h] = 0
    elif name == "random" or name.startswith("random:"):
        try:
            share = float(name.partition(":")[2] or 0.5)
        except ValueError:
            raise ConfigError(f"--mask {name!r}: write random:P with P the share of pixels to fill, "
                              "e.g. random:0.8") from None
        if not 0 <= share <= 1:
            raise ConfigError(f"--mask {name!r}: the share of pixels to fill must be in [0, 1]")
        u = torch.rand(1, size, size, generator=torch.Generator().manual_seed(seed))
        keep = (u >= share).float().expand(channels, size, size).clone()
    elif name.lower().endswith(".png") and os.path.isfile(name):
        img = Image.open(name).convert("L")
        if img.size != (size, size):
            raise ConfigError(f"mask {name} is {img.size[0]}x{img.size[1]} pixels; the model's images are "
                              f"{size}x{size}")
        pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(size, size)
        keep = (pixels >= 128).float().expand(channels, size, size).clone()
    else:
        raise ConfigError(f"unknown mask {name!r}: use one of {', '.join(MASKS)} (the region to fill), "
                          f"random:P, or the path of a {size}x{size} PNG (white = keep, black = fill)")
    return keep


def load_images(spec, data_root, size=28):
    """(images (N, 1, size, size) in [-1, 1], labels (N,) with -1 where unknown) from a comma-separated
    list of MNIST test indices ("0,1,2,3") and/or paths of size x size grayscale PNGs."""
    items = [s.strip() for s in str(spec).split(",") if s.strip()]
    if not items:
        raise ConfigError("--images needs MNIST test indices or PNG paths, e.g. --images 0,1,2,3")
    test, images, labels = None, [], []
    for item in items:
        if item.lower().endswith(".png"):
            if not os.path.isfile(item):
                raise ConfigError(f"image {item} not found")
            img = Image.open(item).convert("L")
            if img.size != (size, size):
                raise ConfigError(f"image {item} is {img.size[0]}x{img.size[1]} pixels; the model's images are "
                                  f"{size}x{size}")
            images.append(torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(size, size))
            labels.append(-1)
            continue
        try:
            i = int(item)
        except ValueError:
            raise ConfigError(f"--images: {item!r} is neither an MNIST test index nor a .png file") from None
        test = test or MNIST(data_root, "test")
        if not 0 <= i < len(test):
            raise ConfigError(f"image index {i} is out of range: the MNIST test split in {data_root} holds "
                              f"{len(test)} images (0 to {len(test) - 1})")
        if test.images.shape[1:] != (size, size):
            raise ConfigError(f"MNIST images are 28x28 but the model's are {size}x{size}")
        images.append(test.images[i])
        labels.append(int(test.labels[i]))
    return to_float(torch.stack(images)[:, None]), torch.tensor(labels)


def model_labels(model, labels, digit=None):
    """Labels to condition on: None for an unconditional model; else `digit` (text: "0".."9", or "none"
    for the null class, model.num_classes) for all, or the true label of each image where known and
    the null class where not."""
    if not model.num_classes:
        return None
    if digit is not None:
        return torch.full((len(labels),), model.num_classes if digit == "none" else int(digit))
    return torch.where(labels >= 0, labels, torch.full_like(labels, model.num_classes))


# ----------------------------------------------------------------------------
# Inpainting: RePaint
# ----------------------------------------------------------------------------

# Where a jump back up starts, by schedule: positions p >= jumps of a chain of n steps (so p - jumps >= 0).
JUMP_POINTS = {
    # RePaint's (their get_schedule_jump): every `jumps` positions counted back from the last noisy one.
    "clean_end": lambda n, jumps: range(n - 1, jumps - 1, -jumps),
    # Counted from the noise instead: the stretch that ends at the clean image is never resampled.
    "noisy_end": lambda n, jumps: range(jumps, n, jumps),
}


def repaint_schedule(num_steps, jumps=1, resample=1, schedule="clean_end"):
    """Positions along a respaced chain of num_steps steps with RePaint's jumps back up (Lugmayr et al.
    2022, sec. 4.2): position k is timesteps[k], num_steps the clean image. Consecutive positions differ
    by +1 (a reverse step) or -1 (a forward step). The first resample - 1 times the descent reaches a
    jump point p, it goes back up to p - jumps and down again: the stretch from p - jumps to p is
    traversed `resample` times, every other step once.

    schedule "clean_end" (the paper's, their get_schedule_jump): the jump points are num_steps - 1,
    num_steps - 1 - jumps, ... down to jumps, so the stretches nearest the clean image, where the known
    and the generated region must agree, are resampled. Once only: the first (num_steps - 1) % jumps
    steps from the noise, and the final step to the clean image, which adds no noise (their Algorithm 1
    does not resample at t = 1 either). "noisy_end": the jump points are jumps, 2 jumps, ... below
    num_steps; the 1 to `jumps` steps ending at the clean image are taken once.
    Either way there are (num_steps - 1) // jumps jump points; resample = 1 is the plain descent
    0, 1, ..., num_steps, and jumps = 1 resamples every step but the last."""
    if schedule not in JUMP_POINTS:
        raise ConfigError(f"unknown RePaint schedule {schedule!r}: use one of {', '.join(JUMP_POINTS)}")
    if jumps < 1 or resample < 1:
        raise ConfigError(f"--jumps and --resample must be >= 1, got {jumps} and {resample}")
    if resample > 1 and jumps >= num_steps:
        raise ConfigError(f"--jumps {jumps} must be below the number of steps ({num_steps}) to resample at all")
    left = {p: resample - 1 for p in JUMP_POINTS[schedule](num_steps, jumps)}
    path = [0]
    while path[-1] < num_steps:
        pos = path[-1] + 1
        path.append(pos)
        if left.get(pos, 0):
            left[pos] -= 1
            path += range(pos - 1, pos - jumps - 1, -1)
    return path


def network_steps(num_steps, jumps=1, resample=1, schedule="clean_end"):
    """Reverse steps (network evaluations, without guidance) of a RePaint schedule:
    num_steps + (resample - 1) * jumps * ((num_steps - 1) // jumps) when resampling."""
    path = repaint_schedule(num_steps, jumps, resample, schedule)
    return sum(b > a for a, b in zip(path, path[1:]))


def forward_step(scheduler, x, t_from, t_to, noise):
    """q(x_{t_to} | x_{t_from}) for t_to > t_from: one forward step of the effective beta between the two
    respaced timesteps, x_to = sqrt(1 - beta) x + sqrt(beta) z, beta = 1 - abar_to / abar_from
    (DDPM eq. 2; t_from = -1 is the clean image, abar = 1). x, noise: (B, C, H, W)."""
    ratio = scheduler._abar64(t_to, x) / scheduler._abar64(t_from, x)
    a, b = scheduler._to(x, ratio.sqrt(), (1.0 - ratio).sqrt())
    return a * x + b * noise


def repaint(model, scheduler, x0, keep, timesteps, sampler="ddpm", noise=None, eta=0.0, labels=None, guidance=1.0,
            guide=None, autoguidance=1.0, jumps=1, resample=1, schedule="clean_end"):
    """RePaint (Lugmayr et al. 2022, Algorithm 1) on a respaced chain: inpaint x0 (B, C, H, W) where
    keep (broadcastable to x0) is 0. At every step the known region is x0 forward-noised to the step's
    timestep, q(x_{t_prev} | x_0), the unknown region the model's reverse step from x_t; with
    resample > 1, the jumps of repaint_schedule (`schedule`: a forward step up, with fresh noise) let
    the two regions harmonise. noise() draws (B, C, H, W) from each image's own generator. Returns the
    inpainted batch (B, C, H, W), its known pixels exactly those of x0."""
    check_resampling(sampler, resample)
    known = keep.expand_as(x0) > 0.5
    ts = list(timesteps) + [-1]  # ts[k]: the timestep of position k; the last one is the clean image
    step, state = SAMPLERS[sampler], {}
    x = torch.where(known, scheduler.add_noise(x0, noise(), ts[0]), noise())
    path = repaint_schedule(len(timesteps), jumps, resample, schedule)
    for a, b in zip(path, path[1:]):
        t, t_next = ts[a], ts[b]
        if b < a:  # back up the chain: only forward noise, no network
            x = forward_step(scheduler, x, t, t_next, noise())
            continue
        eps = model_eps(model, scheduler, x, t, labels, guidance, guide, autoguidance)
        x0_pred = scheduler.predict_x0(x, eps, t).clamp(-1.0, 1.0)
        unknown = step(scheduler, x, x0_pred, t, t_next, noise, state, eta)
        x = torch.where(known, x0 if t_next == -1 else scheduler.add_noise(x0, noise(), t_next), unknown)
    return torch.where(known, x0, x.clamp(-1.0, 1.0))


def check_resampling(sampler, resample):
    """RePaint's jumps back up assume the stochastic reverse step that redraws what it fills."""
    if resample > 1 and sampler != "ddpm":
        raise ConfigError(f"RePaint resampling (--resample > 1) needs the stochastic ddpm step (--sampler ddpm); "
                          f"{sampler} cannot redraw the region it fills after a jump back up")


def completion_generators(seed, indices, completions):
    """One generator per (image i, completion c), seeded from (seed, i, c) alone: [i0c0, i0c1, ..., i1c0, ...]."""
    return [torch.Generator().manual_seed(image_seed(image_seed(seed, i), c)) for i in indices
            for c in range(completions)]


@torch.inference_mode()
def inpaint(model, scheduler, images, keep, *, completions=1, seed=0, sampler="ddpm", steps=0, eta=0.0,
            jumps=1, resample=1, schedule="clean_end", labels=None, guidance=1.0, guide=None, autoguidance=1.0,
            batch_size=256, device="cpu", progress=True, first_index=0):
    """`completions` RePaint completions of each of images (N, C, H, W) in [-1, 1] with the mask keep
    ((C, H, W) or (N, C, H, W)); labels (N,) for a conditional model; jumps, resample and schedule as
    repaint_schedule. Returns (N, completions, C, H, W) on the CPU. Completion c of image i (counted
    from first_index) depends only on (seed, i, c)."""
    check_sampling(model, sampler, labels, guidance, guide, autoguidance)
    check_resampling(sampler, resample)
    n, shape = len(images), images.shape[1:]
    keep = keep.expand(n, *shape) if keep.dim() == 3 else keep
    if keep.shape != images.shape:
        raise ConfigError(f"the mask is {tuple(keep.shape[-2:])}, the images {tuple(shape[-2:])}")
    ts = timestep_list(scheduler.num_timesteps, steps or scheduler.num_timesteps)
    x0 = images.repeat_interleave(completions, 0)
    keep = keep.repeat_interleave(completions, 0)
    y = None if labels is None else labels.repeat_interleave(completions, 0)
    out, all_gens = [], completion_generators(seed, range(first_index, first_index + n), completions)
    bar = tqdm(total=len(x0), desc=f"RePaint {sampler} x{len(ts)}", unit="img", disable=not progress, leave=False)
    for start in range(0, len(x0), batch_size):
        part = slice(start, start + batch_size)
        gens = all_gens[part]
        out.append(repaint(model, scheduler, x0[part].to(device), keep[part].to(device), ts, sampler,
                           lambda: randn_per_image(gens, shape, device), eta,
                           None if y is None else y[part].to(device), guidance, guide, autoguidance,
                           jumps, resample, schedule).cpu())
        bar.update(len(x0[part]))
    bar.close()
    return torch.cat(out).reshape(n, completions, *shape)


def masked_view(images, keep, fill=0.0):
    """What the model is given, for pictures: the known pixels, the hole in mid-grey."""
    return torch.where(keep.expand_as(images) > 0.5, images, torch.full_like(images, fill))


# ----------------------------------------------------------------------------
# Encoding and interpolation: DDIM inversion and slerp
# ----------------------------------------------------------------------------

@torch.inference_mode()
def ddim_encode(model, scheduler, x0, timesteps, labels=None, guidance=1.0, guide=None, autoguidance=1.0,
                return_path=False):
    """Deterministic DDIM inversion (Song et al. 2021, sec. 4.3 and 5.4, the encoding of the ODE): run the
    eta = 0 step of DDIM eq. 12 up the chain, x0 (B, C, H, W) -> x_T (B, C, H, W) at timesteps[0].
    Each step up from t_prev to t reuses eps_theta at the point already known, (x_{t_prev}, t_prev):
    x_t = sqrt(abar_t) x0_pred + sqrt(1 - abar_t) eps, the same straight line in (sqrt(abar),
    sqrt(1 - abar)) that the decoding step walks down. The first step, from the clean image
    (abar = 1, where eps is undefined), evaluates eps at (x0, timesteps[-1]). Decoding x_T with
    ddim_decode over the same timesteps returns x0 up to the error of that approximation.
    return_path: also the list of x_t at each timestep, from timesteps[-1] up to timesteps[0]."""
    x, t_prev, path = x0, -1, []
    for t in reversed(list(timesteps)):
        if t_prev == -1:
            x0_pred, eps = x0, model_eps(model, scheduler, x0, t, labels, guidance, guide, autoguidance)
        else:
            eps = model_eps(model, scheduler, x, t_prev, labels, guidance, guide, autoguidance)
            x0_pred = scheduler.predict_x0(x, eps, t_prev).clamp(-1.0, 1.0)
            eps = scheduler.eps_from_x0(x, x0_pred, t_prev)  # the eps consistent with the clipped x0, as ddim_step
        x = scheduler.add_noise(x0_pred, eps, t)  # DDIM eq. 12 with eta = 0, from t_prev up to t
        path.append(x)
        t_prev = t
    return (x, path) if return_path else x


@torch.inference_mode()
def ddim_decode(model, scheduler, x_T, timesteps, labels=None, guidance=1.0, guide=None, autoguidance=1.0):
    """x_T (B, C, H, W) at timesteps[0] -> images (B, C, H, W) by the deterministic DDIM step (eta = 0)
    of samplers.sample_loop; clamped to [-1, 1]."""
    x = x_T
    for _, _, x in sample_loop(model, scheduler, x_T, list(timesteps), "ddim", None, 0.0, labels, guidance, guide,
                               autoguidance):
        pass
    return x.clamp(-1.0, 1.0)


def check_deterministic(sampler, eta, what="DDIM inversion"):
    """Encoding needs the ODE sampler: ddim with eta 0 (the inverse of a stochastic step does not exist)."""
    if sampler != "ddim" or eta != 0:
        raise ConfigError(f"{what} needs the deterministic DDIM step (--sampler ddim --eta 0), got --sampler "
                          f"{sampler}" + (f" --eta {eta:g}" if sampler == "ddim" else ""))


def slerp(z0, z1, alpha, parallel=0.9995):
    """Spherical interpolation (Shoemake 1985; of DDIM latents, Song et al. 2021 sec. 5.3):
    sin((1 - alpha) theta) / sin theta z0 + sin(alpha theta) / sin theta z1, theta the angle between
    the flattened z0 and z1 (any shape, the same for both). alpha = 0 gives z0 and 1 gives z1 exactly;
    for equal norms every point keeps that norm (linear interpolation would shrink it, and shrunken
    Gaussian noise decodes to blurry images). Nearly parallel inputs fall back to the straight line."""
    a, b = z0.double(), z1.double()
    cos = (a.flatten() @ b.flatten() / (a.norm() * b.norm())).clamp(-1.0, 1.0)
    if cos.abs() > parallel:
        return ((1.0 - alpha) * a + alpha * b).to(z0.dtype)
    theta = torch.arccos(cos)
    return ((torch.sin((1.0 - alpha) * theta) * a + torch.sin(alpha * theta) * b) / torch.sin(theta)).to(z0.dtype)


# ----------------------------------------------------------------------------
# Conditional models: one noise as every digit
# ----------------------------------------------------------------------------

@torch.inference_mode()
def every_digit(model, scheduler, rows, *, seed=0, sampler="ddpm", steps=0, eta=0.0, guidance=1.0, guide=None,
                autoguidance=1.0, device="cpu", x_T=None, progress=True):
    """(rows * num_classes, C, H, W): row r is one noise drawn as each digit 0 .. num_classes - 1. Every
    image of row r has a generator seeded from (seed, r) alone, so the same x_T and, for the
    stochastic samplers, the same noise at every step: the label is all that changes along a row.
    x_T (rows, C, H, W): start each row from it instead (e.g. a real digit's DDIM encoding)."""
    if not model.num_classes:
        raise ConfigError("--every_digit needs a conditional checkpoint (model.num_classes > 0); this one is "
                          "unconditional: train one with config/conditional.yaml")
    k = model.num_classes
    labels = torch.arange(k).repeat(rows).to(device)
    check_sampling(model, sampler, labels, guidance, guide, autoguidance)
    shape = (model.in_channels, model.image_size, model.image_size)
    gens = [torch.Generator().manual_seed(image_seed(seed, r)) for r in range(rows) for _ in range(k)]
    x = randn_per_image(gens, shape, device) if x_T is None else x_T.repeat_interleave(k, 0).to(device)
    ts = timestep_list(scheduler.num_timesteps, steps or scheduler.num_timesteps)
    for _, _, x in tqdm(sample_loop(model, scheduler, x, ts, sampler, lambda: randn_per_image(gens, shape, device),
                                    eta, labels, guidance, guide, autoguidance), total=len(ts),
                        desc=f"every digit {sampler} x{len(ts)}", disable=not progress, leave=False):
        pass
    return x.clamp(-1.0, 1.0).cpu()


def round_trip_error(images, decoded):
    """(mean, max) absolute pixel error, in [-1, 1] units (x 127.5 for 8-bit levels)."""
    d = (decoded - images).abs()
    return d.mean().item(), d.max().item()


# ----------------------------------------------------------------------------
# sample.py's modes
# ----------------------------------------------------------------------------

MODES = ["inpaint", "encode", "interpolate", "every_digit"]
MODE_FLAGS = {"mask": "inpaint", "completions": "inpaint", "jumps": "inpaint", "resample": "inpaint",
              "repaint_schedule": "inpaint", "frames": "interpolate"}


def on(labels, device):
    """labels (or None) on the device."""
    return None if labels is None else labels.to(device)


def requested(args):
    """True when sample.py was asked for one of the modes here (or given one of their flags)."""
    return any(getattr(args, m, None) for m in MODES) or any(
        getattr(args, f, None) is not None for f in [*MODE_FLAGS, "images"])


def run(args, model, scheduler, s, steps, guide, device, ckpt_path, data_root):
    """sample.py --inpaint / --encode / --interpolate / --every_digit, with the resolved sample settings s."""
    modes = [m for m in MODES if getattr(args, m)]
    if len(modes) != 1:
        raise ConfigError(f"pick one of --{', --'.join(MODES)}" + (f", not {len(modes)}" if modes else
                                                                  " to use --images, --mask, ..."))
    mode = modes[0]
    for flag, owner in MODE_FLAGS.items():
        if getattr(args, flag) is not None and owner != mode:
            raise ConfigError(f"--{flag} belongs to --{owner}")
    if mode == "interpolate" and args.images is not None:
        raise ConfigError("--interpolate I,J names its two images itself; leave out --images")
    if args.digit is not None and mode not in ("inpaint", "encode"):
        raise ConfigError(f"--digit applies to --inpaint and --encode, not to --{mode}")
    if args.digit == "any":
        raise ConfigError("--digit any draws a new digit for each image: editing takes one digit (0-9) or none")
    if args.digit not in (None, "none"):
        requested_labels(args.digit, 1, model.num_classes)  # an unconditional model, or no such digit: say so
    data_root = args.data or data_root
    size = model.image_size
    kw = dict(guidance=s["guidance"], guide=guide, autoguidance=s["autoguidance"])
    folder = os.path.dirname(ckpt_path)
    if mode in ("encode", "interpolate") or (mode == "every_digit" and args.images):
        # Encoding is the ODE: ddim with eta 0 unless asked otherwise (and then refused).
        s = dict(s, sampler=args.sampler or "ddim", eta=0.0 if args.eta is None else args.eta)
        check_deterministic(s["sampler"], s["eta"])
    ts = timestep_list(scheduler.num_timesteps, steps)
    ag = f"_ag{s['autoguidance']:g}" if guide is not None else ""

    if mode == "inpaint":
        images, labels = load_images(args.images or "0,1,2,3", data_root, size)
        mask = args.mask or "bottom"
        keep = make_mask(mask, size, model.in_channels, s["seed"])
        y = on(model_labels(model, labels, args.digit), device)
        c, j, r = args.completions or 4, args.jumps or 1, args.resample or 1
        schedule = args.repaint_schedule or "clean_end"
        if c < 1:
            raise ConfigError(f"--completions must be >= 1, got {c}")
        out = inpaint(model, scheduler, images, keep, completions=c, seed=s["seed"], sampler=s["sampler"],
                      steps=steps, eta=s["eta"], jumps=j, resample=r, schedule=schedule, labels=y,
                      batch_size=s["batch_size"], device=device, **kw)
        rows = torch.cat([images[:, None], masked_view(images, keep)[:, None], out], 1)
        name = os.path.splitext(os.path.basename(mask))[0].replace(":", "")
        jumped = (f"_j{j}r{r}" + ("" if schedule == "clean_end" else f"_{schedule}")) if r > 1 else ""
        tag = f"inpaint_{name}_{s['sampler']}_{steps}".replace("+", "p") + jumped + ag
        tag += f"_digit{args.digit}" if args.digit is not None else ""
        path = args.out or os.path.join(folder, f"{tag}.png")
        save_image(make_grid(rows.flatten(0, 1), nrow=2 + c), path)
        print(f"{len(images)} images x {c} completions (RePaint, mask {mask}, {s['sampler']} {steps} steps"
              f"{f', jumps {j} resample {r} ({schedule})' if r > 1 else ''}): {path}  "
              "(per row: original, input, completions)")
        return out

    if mode == "every_digit":
        x_T, first = None, []
        if args.images:
            images, labels = load_images(args.images, data_root, size)
            x_T = ddim_encode(model, scheduler, images.to(device), ts, on(model_labels(model, labels), device), **kw)
            first, rows = [images], len(images)
        else:
            rows = max(1, s["num_samples"] // max(model.num_classes, 1))
        out = every_digit(model, scheduler, rows, seed=s["seed"], sampler=s["sampler"], steps=steps, eta=s["eta"],
                          device=device, x_T=x_T, **kw)
        k = model.num_classes
        grid = out if not first else torch.cat([torch.cat([images[i:i + 1], out[i * k:(i + 1) * k]])
                                                for i in range(rows)])
        path = args.out or os.path.join(folder, f"every_digit_{s['sampler']}_{steps}{ag}_w{s['guidance']:g}.png"
                                        .replace("+", "p"))
        save_image(make_grid(grid, nrow=k + bool(first)), path)
        print(f"{rows} rows, each one {'encoded digit' if first else 'noise'} drawn as every digit 0-{k - 1}: {path}")
        return out

    if mode == "encode":
        images, labels = load_images(args.images or "0,1,2,3", data_root, size)
        y = on(model_labels(model, labels), device)
        x_T = ddim_encode(model, scheduler, images.to(device), ts, y, **kw)
        dec_y = on(model_labels(model, labels, args.digit), device) if args.digit is not None else y
        decoded = ddim_decode(model, scheduler, x_T, ts, dec_y, **kw).cpu()
        mean, worst = round_trip_error(images, decoded)
        base = args.out or os.path.join(folder, f"encode_ddim_{steps}{ag}.png")
        save_image(make_grid(torch.stack([images, x_T.cpu(), decoded], 1).flatten(0, 1), nrow=3), base)
        latents = {"x_T": x_T.cpu(), "timesteps": ts, "labels": labels}
        atomic_write(os.path.splitext(base)[0] + "_latents.pt", lambda f: torch.save(latents, f))
        print(f"{len(images)} images encoded to x_T by DDIM inversion ({steps} steps) and decoded back: {base} "
              f"(per row: original, x_T, decoded); x_T in {os.path.splitext(base)[0]}_latents.pt")
        print(f"round trip: mean abs pixel error {mean:.4f}, max {worst:.4f} (pixels in [-1, 1]; "
              f"{mean * 127.5:.2f} and {worst * 127.5:.1f} of 255 levels)")
        return x_T

    # interpolate
    pair = [p.strip() for p in args.interpolate.split(",")]
    if len(pair) != 2:
        raise ConfigError(f"--interpolate needs two images, I,J, got {args.interpolate!r}")
    images, labels = load_images(args.interpolate, data_root, size)
    y = on(None if not model.num_classes else torch.full((1,), model.num_classes), device)  # the unconditional branch
    x_T = ddim_encode(model, scheduler, images.to(device), ts, None if y is None else y.repeat(2), **kw)
    frames = args.frames or 8
    if frames < 2:
        raise ConfigError(f"--frames must be >= 2, got {frames}")
    alphas = torch.linspace(0, 1, frames).tolist()
    z = torch.stack([slerp(x_T[0], x_T[1], a) for a in alphas])
    decoded = ddim_decode(model, scheduler, z, ts, None if y is None else y.repeat(frames), **kw).cpu()
    names = "_".join(os.path.splitext(os.path.basename(p))[0] for p in pair)
    path = args.out or os.path.join(folder, f"interpolate_{names}_ddim_{steps}{ag}.png")
    save_image(make_grid(torch.cat([images[:1], decoded, images[1:]]), nrow=frames + 2), path)
    print(f"slerp between the DDIM encodings of {pair[0]} and {pair[1]}, {frames} points, decoded ({steps} "
          f"steps): {path} (the row: original, interpolation, original)")
    return decoded
