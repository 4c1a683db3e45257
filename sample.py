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
import os

import torch

import editing
from configuration import DEVICE_HELP, load_config, merge, pick_device, run_cli, str2bool, with_flags
from fileio import load_guide, load_label_counts, load_model, make_grid, save_image
from linear_noise_scheduler import timestep_list
from samplers import SAMPLERS, generate, requested_labels


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
    save_image(make_grid(torch.stack(rows), nrow=len(picks)), strip_path)
    gif = [make_grid(torch.cat([frames[k][0][:16], frames[k][1][:16]]), nrow=8, scale=1)
           for k in evenly(len(frames), gif_frames)]
    save_image(gif[0], gif_path, save_all=True, append_images=gif[1:] + [gif[-1]] * 10, duration=80, loop=0)
    print(f"denoising strip (x_t and predicted x_0 at t = {[ts[k] for k in picks]}): {strip_path}; GIF: {gif_path}")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="config/default.yaml", help="config whose train.out_dir holds the checkpoint")
    p.add_argument("--ckpt", help="checkpoint path (default: <out_dir>/last.pt, or best.pt with --from_val True)")
    p.add_argument("--from_val", type=str2bool, default=False, help="use the best-validation checkpoint")
    p.add_argument("--sampler", choices=list(SAMPLERS), help="default: sample.sampler of the config")
    p.add_argument("--steps", type=int, help="sampling steps, one network evaluation each (two with guidance "
                                             "or autoguidance) (default: sample.steps; all T for --sampler ddpm)")
    p.add_argument("--eta", type=float, help="DDIM noise: 0 deterministic, 1 DDPM-like (default: sample.eta)")
    p.add_argument("--num_samples", type=int, help="default: sample.num_samples")
    p.add_argument("--batch_size", type=int, help="default: sample.batch_size")
    p.add_argument("--seed", type=int, help="default: sample.seed")
    p.add_argument("--digit", metavar="0-9|any|none",
                   help="labelled models: the digit to draw; any: each image's digit drawn from the training "
                        "labels' frequencies, then drawn as the config samples it (a sample of the model's p(x)); "
                        "none: the \"no label\" class, unguided by labels (default: one row per digit; an "
                        "unconditional model draws its p(x) with or without any/none)")
    p.add_argument("--guidance", type=float, help="conditional models: classifier-free guidance w, "
                                                  "eps_u + w (eps_c - eps_u); 1 = plain conditional "
                                                  "(default: sample.guidance)")
    p.add_argument("--autoguidance", type=float, help="checkpoints with a guide (train.guide_fraction > 0): "
                                                      "eps_g + w (eps - eps_g); 1 = off; each step then costs "
                                                      "two network evaluations (default: sample.autoguidance)")
    p.add_argument("--out", help="grid PNG (default: <out_dir>/samples_<sampler>_<steps>.png)")
    p.add_argument("--save_images", metavar="DIR", help="also write one 28x28 PNG per sample into DIR")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    e = p.add_argument_group("editing (editing.py): one of --inpaint, --encode, --interpolate, --every_digit")
    e.add_argument("--inpaint", action="store_true", help="RePaint: fill the --mask region of --images")
    e.add_argument("--encode", action="store_true", help="DDIM inversion of --images to x_T, decoded back "
                                                         "(ddim, eta 0); prints the round-trip error")
    e.add_argument("--interpolate", metavar="I,J", help="slerp between the DDIM encodings of two test digits "
                                                        "(indices or PNGs), decoded along a row")
    e.add_argument("--every_digit", action="store_true", help="conditional models: rows of one noise drawn as "
                                                              "every digit (from the encodings of --images if given)")
    e.add_argument("--images", help="MNIST test indices and/or 28x28 PNG paths, comma-separated (default: 0,1,2,3)")
    e.add_argument("--data", help="MNIST folder for --images indices (default: data.root of --config)")
    e.add_argument("--mask", help="region to fill: top, bottom, left, right, center, random[:P], or a PNG "
                                  "(white = keep, black = fill) (default: bottom)")
    e.add_argument("--completions", type=int, help="completions per image (default: 4)")
    e.add_argument("--jumps", type=int, help="RePaint's j: go back up j steps at a time (default: 1)")
    e.add_argument("--resample", type=int, help="RePaint's r: traverse each resampled stretch r times, r > 1 "
                                                "needs --sampler ddpm (default: 1, no resampling)")
    e.add_argument("--repaint_schedule", choices=list(editing.JUMP_POINTS),
                   help="where RePaint's jumps are counted from: clean_end resamples the stretches nearest the "
                        "clean image, as the paper; noisy_end those nearest the noise (default: clean_end)")
    e.add_argument("--frames", type=int, help="--interpolate: points along the slerp (default: 8)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.config)
    ckpt_path = args.ckpt or os.path.join(cfg["train"]["out_dir"], "best.pt" if args.from_val else "last.pt")
    device = pick_device(args.device)
    model, scheduler, trained = load_model(ckpt_path, device)
    if args.sampler == "ddpm" and args.steps is None:
        args.steps = 0  # the paper's sampler: all T steps
    w = cfg["sample"]["autoguidance"] if args.autoguidance is None else args.autoguidance
    guide = load_guide(ckpt_path, w, device)  # first: a checkpoint without a guide says so
    # The sample section of --config, then the flags, checked against the model the checkpoint trained.
    trained = merge(trained, {"sample": cfg["sample"]}, origin=args.config)
    s = with_flags(trained, "sample", {k: getattr(args, k) for k in cfg["sample"] if hasattr(args, k)})["sample"]
    steps = s["steps"] or scheduler.num_timesteps
    if editing.requested(args):  # --inpaint, --encode, --interpolate, --every_digit: editing.py
        return editing.run(args, model, scheduler, s, steps, guide, device, ckpt_path, cfg["data"]["root"])
    counts = load_label_counts(ckpt_path, cfg["data"]["root"]) if args.digit == "any" and model.num_classes else None
    labels, nrow = requested_labels(args.digit, s["num_samples"], model.num_classes, counts, s["seed"])
    images, frames = generate(model, scheduler, len(labels) if labels is not None else s["num_samples"],
                              seed=s["seed"], batch_size=s["batch_size"], sampler=s["sampler"], steps=steps,
                              eta=s["eta"], device=device, labels=labels, guidance=s["guidance"], guide=guide,
                              autoguidance=s["autoguidance"], return_frames=True)
    tag = f"{s['sampler']}_{steps}".replace("+", "p") + (f"_ag{s['autoguidance']:g}" if guide else "")
    if labels is not None:
        tag += f"_w{s['guidance']:g}"
    if args.digit is not None and model.num_classes:
        tag += f"_digit{args.digit}"
    grid_path = args.out or os.path.join(os.path.dirname(ckpt_path), f"samples_{tag}.png")
    nrow = nrow or (min(8, len(images)) if len(images) < 64 else int(len(images) ** 0.5))
    save_image(make_grid(images, nrow=nrow), grid_path)
    how = f"{s['sampler']}, {steps} steps" + (f", autoguidance {s['autoguidance']:g}" if guide else "")
    print(f"{len(images)} samples ({how}, seed {s['seed']}) from {ckpt_path}: {grid_path}")
    base = os.path.splitext(grid_path)[0]
    save_denoising(frames, timestep_list(scheduler.num_timesteps, steps), f"{base}_strip.png",
                   f"{base}_denoising.gif")
    if args.save_images:
        os.makedirs(args.save_images, exist_ok=True)
        for i, img in enumerate(images):
            save_image(make_grid(img[None], nrow=1, pad=0, scale=1), os.path.join(args.save_images, f"{i:05d}.png"))
        print(f"{len(images)} PNGs (28x28, grayscale): {args.save_images}")


if __name__ == "__main__":
    run_cli(main, FileNotFoundError)
