"""Score generated MNIST digits against real ones.

    python evaluate.py --ckpt runs/default/last.pt     # sampled as its config's sample section says
    python evaluate.py --ckpt runs/default/last.pt --sampler ddpm --steps 50 --autoguidance 1
    python evaluate.py --images some/folder/of/pngs

Inception features mean little on 28x28 digits, so every feature-based metric
here lives in the 128-d penultimate layer of a small CNN trained on the first 45,000
MNIST training images. It is trained once (1.5 minutes on 2 idle CPU cores) and cached as
<data>/classifier_45k.pt. Metrics (their maths, with the papers, is in metrics.py), each for the
samples and for real data:

    fid              Frechet distance between Gaussians fitted to the features
    kid, kid_se      unbiased MMD^2, cubic polynomial kernel (Binkowski et al. 2018), over the
                     full sets, on features divided by the RMS of the real ones; kid_se is its
                     jackknife standard error
    precision        share of samples inside the manifold of real digits, and
    recall           share of real digits inside the manifold of the samples
                     (k = 3 nearest neighbours, Kynkaanniemi et al. 2019)
    mean_confidence  mean max-softmax probability of the classifier
    frac_confident   share of samples with max-softmax > 0.9
    class_hist       share of samples per predicted digit; class_entropy is
                     its entropy / log(10): 1 = all digits equally often
    nearest_train_l2 mean pixel-space L2 distance to the nearest training image

All of them compare against a reference set: the 10k test images (--split test, for final
numbers) or the 5k validation images (--split val, for choosing and tuning: sweep.py uses it).
The "real floor" column scores the same number of real digits that neither the classifier nor
the reference set contains (partition() below), so floor and samples are scored alike: as good
as a generator can hope to do with that many samples (FID and KID depend on the sample count,
so only compare numbers for equal counts). For the floor of nearest_train_l2 we use digits the
DDPM never trained on instead: train digits would be at distance 0 from themselves. Samples much
closer to the training set than held-out digits are copies, not new digits.
"""

import argparse
import glob
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import editing
from configuration import DEVICE_HELP, ConfigError, pick_device, str2bool, with_flags
from fileio import atomic_write, load_guide, load_label_counts, load_model
from linear_noise_scheduler import timestep_list
from metrics import (CONFIDENT, class_histogram, confidence_stats, fid, kid, nearest_train_distance,
                     normalized_entropy, precision_recall)
from mnist import MNIST
from mnist import to_float as mnist_to_float
from mnist_downloader import DownloadError, ensure_mnist_present
from samplers import SAMPLERS, generate, requested_labels

CLASSIFIER_FILE = "classifier_45k.pt"  # trained on the first 45,000 training images only (see partition)
FLOOR_CACHE_FILE = "eval_floor_cache.json"
FLOOR_VERSION = 3  # part of the floor cache key: bump it when a metric or the floor's images change
ARCH = {"c1": 32, "c2": 64, "hidden": 128}  # changing it invalidates the cache
TRAIN = {"epochs": 3, "batch_size": 64, "lr": 2e-3, "seed": 0}
# A second classifier that judges a conditional model's read-back: another width and seed, the same 45,000
# images. A guidance weight chosen with the first classifier's readings is checked against this one's.
JUDGE_FILE, JUDGE_ARCH, JUDGE_TRAIN = "classifier_judge_45k.pt", {"c1": 16, "c2": 48, "hidden": 256}, dict(TRAIN, seed=1)
FEATURE_BATCH = 1000  # classifier forward passes only, memory is not a concern


def to_float(images_uint8):
    """uint8 pixels (N, 28, 28) -> float (N, 1, 28, 28) in [-1, 1], like MNIST items."""
    return mnist_to_float(images_uint8[:, None])


# ----------------------------------------------------------------------------
# The feature extractor: a small CNN classifier
# ----------------------------------------------------------------------------

class Classifier(nn.Module):
    """conv-bn-pool-conv-bn-pool-fc-fc; features() is the penultimate (hidden-d) layer.

    BatchNorm is what gets this small net past 99% test accuracy in 3 epochs.
    """

    def __init__(self, c1=32, c2=64, hidden=128, num_classes=10):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1)
        self.conv2, self.bn2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2)
        self.fc1 = nn.Linear(c2 * 7 * 7, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def features(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)  # 28 -> 14
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)  # 14 -> 7
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x):
        return self.fc2(self.features(x))


@torch.no_grad()
def classifier_outputs(model, images, device="cpu", batch_size=FEATURE_BATCH):
    """Penultimate features and softmax probabilities, both float32 on the CPU."""
    model.eval()
    feats, probs = [], []
    for i in range(0, len(images), batch_size):
        h = model.features(images[i:i + batch_size].to(device))
        feats.append(h.cpu())
        probs.append(model.fc2(h).softmax(1).cpu())
    return torch.cat(feats), torch.cat(probs)


def accuracy(model, images, labels, device="cpu"):
    _, probs = classifier_outputs(model, images, device)
    return (probs.argmax(1) == labels).float().mean().item()


def train_classifier(train_x, train_y, test_x, test_y, *, arch=ARCH, epochs=3,
                     batch_size=64, lr=2e-3, seed=0, device="cpu", log=print):
    """Train a Classifier(**arch) with Adam; returns (model, test accuracy).

    Images are float (N, 1, 28, 28) in [-1, 1]. The learning rate decays
    linearly to 0, which buys the last few tenths of a percent in 3 epochs.
    """
    torch.manual_seed(seed)  # weight init
    shuffle = torch.Generator().manual_seed(seed)
    model = Classifier(**arch).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = math.ceil(len(train_x) / batch_size)
    total, step = epochs * steps_per_epoch, 0
    for epoch in range(epochs):
        model.train()
        t0, loss_sum = time.time(), 0.0
        for idx in torch.randperm(len(train_x), generator=shuffle).split(batch_size):
            for group in opt.param_groups:
                group["lr"] = lr * (1 - step / total)
            loss = F.cross_entropy(model(train_x[idx].to(device)), train_y[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_sum += loss.item()
            step += 1
        log(f"  epoch {epoch + 1}/{epochs}: loss {loss_sum / steps_per_epoch:.4f} "
            f"({time.time() - t0:.0f} s)")
    return model.eval(), accuracy(model, test_x, test_y, device)


def save_classifier(path, model, test_acc, arch):
    checkpoint = {"state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
                  "test_acc": float(test_acc), "arch": dict(arch)}
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def load_classifier(path, arch=None, device="cpu"):
    """(model, test_acc) from a cache file; raises if it is unusable or built with another arch."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or set(checkpoint) != {"state_dict", "test_acc", "arch"}:
        raise ValueError("unexpected contents")
    if arch is not None and checkpoint["arch"] != dict(arch):
        raise ValueError(f"built with {checkpoint['arch']}, want {dict(arch)}")
    model = Classifier(**checkpoint["arch"])
    model.load_state_dict(checkpoint["state_dict"])  # raises on missing keys / wrong shapes
    return model.to(device).eval(), float(checkpoint["test_acc"])


def get_classifier(path, train_x, train_y, test_x, test_y, *, arch=ARCH, device="cpu",
                   log=print, **train_kw):
    """Load the cached classifier, or train one (and cache it) if that fails."""
    if os.path.exists(path):
        try:
            model, acc = load_classifier(path, arch, device)
            log(f"classifier: {path} (held-out accuracy {acc:.4f})")
            return model, acc
        # A corrupt file can fail in many ways inside torch.load (unpickling,
        # zip, EOF errors...); all of them mean "train a new one".
        except Exception as err:
            why = (str(err) or "?").splitlines()[0][:200]  # state_dict errors run to many lines
            log(f"classifier: cache {path} is unusable ({type(err).__name__}: {why}); retraining")
    else:
        log(f"classifier: no cache at {path}; training one on {len(train_x)} images")
    t0 = time.time()
    model, acc = train_classifier(train_x, train_y, test_x, test_y, arch=arch,
                                  device=device, log=log, **train_kw)
    log(f"classifier: held-out accuracy {acc:.4f} after {time.time() - t0:.0f} s, saved to {path}")
    if acc < 0.99:
        log("classifier: warning: held-out accuracy below 99%, features may be poor")
    save_classifier(path, model, acc, arch)
    return model, acc


# ----------------------------------------------------------------------------
# Scoring a set of images
# ----------------------------------------------------------------------------

def score(images, classifier, real_feats, train_images=None, *, device="cpu", labels=None):
    """All metrics of images (N, 1, 28, 28) in [-1, 1] against real_feats (the
    classifier features of the real test set). Returns a dict of plain floats.

    nearest_train_l2 is only computed when train_images are given. Metrics
    that need labels (e.g. per-digit accuracy of a class-conditional model)
    can be added here from `probs`.
    """
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 28, 28):
        raise ValueError(f"expected images of shape (N, 1, 28, 28), got {tuple(images.shape)}")
    feats, probs = classifier_outputs(classifier, images, device)
    # The cubic kernel (x.y/d + 1)^3 expects features of order 1; ours are
    # sparse ReLUs with x.x/d ~ 30, which make KID noisy. Divide both sets by
    # one number fixed by the real set, the RMS of its features.
    rms = real_feats.double().square().mean().sqrt()
    kid_value, kid_se = kid(feats / rms, real_feats / rms)
    precision, recall = precision_recall(real_feats, feats)
    mean_conf, frac_conf = confidence_stats(probs)
    hist = class_histogram(probs.argmax(1))
    result = {"n": len(images), "fid": fid(feats, real_feats), "kid": kid_value, "kid_se": kid_se,
              "precision": precision, "recall": recall,
              "mean_confidence": mean_conf, "frac_confident": frac_conf,
              "class_entropy": normalized_entropy(hist), "class_hist": hist.tolist()}
    if labels is not None:  # a conditional model: does the classifier read the digit that was asked for?
        hits = (probs.argmax(1) == labels.to(probs.device)).float()
        result["label_accuracy"] = hits.mean().item()
        result["per_digit_accuracy"] = [hits[labels == d].mean().item() if (labels == d).any() else float("nan")
                                        for d in range(10)]
    if train_images is not None:
        result["nearest_train_l2"] = nearest_train_distance(images, train_images,
                                                            device=device).mean().item()
    return result


def real_floor(classifier, pool_x, ref_feats, held_out_x, train_x, n, *, seed=0, device="cpu"):
    """score() of n random digits of pool_x (real images the classifier never saw, as it never saw
    the samples), with nearest_train_l2 from n held-out digits (which the DDPM never saw)."""
    gen = torch.Generator().manual_seed(seed)
    subset = torch.randperm(len(pool_x), generator=gen)[:n]
    floor = score(pool_x[subset], classifier, ref_feats, device=device)
    held_out = torch.randperm(len(held_out_x), generator=gen)[:n]
    floor["nearest_train_l2"] = nearest_train_distance(held_out_x[held_out], train_x,
                                                       device=device).mean().item()
    return floor


def cached_floor(cache_path, key, compute, log=print):
    """Look key up in a small JSON cache; compute() and store it if absent."""
    cache = {}
    if os.path.exists(cache_path):
        try:
            with open(cache_path) as f:
                cache = json.load(f)
        except (OSError, ValueError):
            log(f"note: ignoring unreadable floor cache {cache_path}")
    if isinstance(cache, dict) and key in cache:
        return cache[key]
    cache = cache if isinstance(cache, dict) else {}
    cache[key] = compute()
    atomic_write(cache_path, lambda f: f.write(json.dumps(cache, indent=1).encode()))
    return cache[key]


def partition(data_root, split):
    """The real images evaluate.py uses, so that nothing is scored on what it was fitted to:
    the DDPM's train split (55,000) minus its last 10,000 trains the classifier; those 10,000 are the
    floor's pool; the reference set is `split` ("test" for final numbers, "val" for tuning), and the
    other held-out split gives the floor of nearest_train_l2."""
    if split not in ("test", "val"):
        raise ConfigError(f"--split must be test or val, got {split!r}")
    train, val, test = (MNIST(data_root, s) for s in ("train", "val", "test"))
    train_x = to_float(train.images)
    pool = len(train_x) * 2 // 11  # 10,000 of 55,000
    ref, other = (test, val) if split == "test" else (val, test)
    return {"train_x": train_x, "fit_x": train_x[:-pool], "fit_y": train.labels[:-pool], "pool_x": train_x[-pool:],
            "val_x": to_float(val.images), "val_y": val.labels, "ref_x": to_float(ref.images), "ref_y": ref.labels,
            "other_x": to_float(other.images)}


def evaluate_images(images, data_root="data/mnist", *, seed=0, device="cpu", classifier=None,
                    log=print, labels=None, split="test"):
    """Score generated images (N, 1, 28, 28) in [-1, 1] against the `split` images, and the real
    floor for N (see partition()).

    Reads MNIST from data_root (run mnist_downloader.ensure_mnist first),
    trains or loads the cached classifier unless classifier=(model, accuracy)
    is given. Returns {"samples": {...}, "floor": {...}, "classifier_val_acc",
    "timings_s": {...}}.
    """
    timings, t0 = {}, time.time()
    d = partition(data_root, split)
    if classifier is None:
        classifier = get_classifier(os.path.join(data_root, CLASSIFIER_FILE), d["fit_x"], d["fit_y"],
                                    d["val_x"], d["val_y"], device=device, log=log, **TRAIN)
    model, acc = classifier
    ref_feats, _ = classifier_outputs(model, d["ref_x"], device)
    timings["data_and_classifier"], t0 = time.time() - t0, time.time()

    samples = score(images, model, ref_feats, d["train_x"], device=device, labels=labels)
    timings["samples"], t0 = time.time() - t0, time.time()

    n = min(len(images), len(d["pool_x"]))
    key = f"v{FLOOR_VERSION} split={split} n={n} seed={seed} acc={acc:.6f}"
    floor = cached_floor(os.path.join(data_root, FLOOR_CACHE_FILE), key,
                         lambda: real_floor(model, d["pool_x"], ref_feats, d["other_x"], d["train_x"], n, seed=seed,
                                            device=device), log)
    timings["floor"] = time.time() - t0
    return {"samples": samples, "floor": floor, "classifier_val_acc": acc, "split": split, "timings_s": timings}


# ----------------------------------------------------------------------------
# Inpainting read back, and the DDIM round trip (editing.py)
# ----------------------------------------------------------------------------

def nearest_fill(images, keep, train_x, chunk=2000):
    """Baseline: fill each image's hole with the pixels of the training image nearest on the known
    pixels (L2). images (N, C, H, W), keep (C, H, W), train_x (M, C, H, W)."""
    k = keep.flatten() > 0.5
    q = images.flatten(1)[:, k].double()
    best_d, best_i = torch.full((len(q),), math.inf, dtype=torch.float64), torch.zeros(len(q), dtype=torch.long)
    for start in range(0, len(train_x), chunk):
        r = train_x[start:start + chunk].flatten(1)[:, k].double()
        d = (q.pow(2).sum(1, keepdim=True) - 2 * q @ r.T + r.pow(2).sum(1)[None])
        m, i = d.min(1)
        better = m < best_d
        best_d[better], best_i[better] = m[better], i[better] + start
    return torch.where(keep.expand_as(images) > 0.5, images, train_x[best_i])


def baseline_fills(images, keep, train_x, seed=0):
    """The fills RePaint is measured against, by name: the original (what a perfect fill reads back
    as), the hole left black (MNIST's background), Gaussian noise clipped to [-1, 1], and nearest_fill."""
    hole = keep.expand_as(images) < 0.5
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)
    return {"original (upper bound)": images,
            "hole left black (background)": torch.where(hole, torch.full_like(images, -1.0), images),
            "noise fill": torch.where(hole, noise, images),
            "nearest training image on the known half": nearest_fill(images, keep, train_x)}


def check_known_pixels_kept(completions, images, hole):
    """completions (N, K, C, H, W) must hold images' known pixels exactly: a fill that changed them
    would be read back with help from pixels it was not asked to make."""
    known = ~hole[:, None].expand_as(completions)
    if not torch.equal(completions[known], images[:, None].expand_as(completions)[known]):
        raise RuntimeError("editing.inpaint changed known pixels of the images, so its read back would not measure "
                           "the fill; this is a bug in editing.py (RePaint must return the known region exactly), "
                           "and no numbers are reported")


def round_trips(model, scheduler, s, guide, x, steps_list, autoguidance_list=None, device="cpu", log=print):
    """DDIM encode then decode of x at each number of steps and autoguidance weight (default: 1 and
    the sample section's), unconditionally: {name: {"mean_abs", "max_abs", "seconds"}}."""
    out, x = {}, x.to(device)
    for n in steps_list:
        for w in autoguidance_list or sorted({1.0, s["autoguidance"]}):
            g = guide if w != 1.0 else None
            t0 = time.time()
            ts = timestep_list(scheduler.num_timesteps, n)
            x_T = editing.ddim_encode(model, scheduler, x, ts, None, s["guidance"], g, w)
            dec = editing.ddim_decode(model, scheduler, x_T, ts, None, s["guidance"], g, w).cpu()
            mean, worst = editing.round_trip_error(x.cpu(), dec)
            out[f"{n} steps, autoguidance {w:g}"] = {"mean_abs": mean, "max_abs": worst, "seconds": time.time() - t0}
            log(f"round trip {n} steps, autoguidance {w:g}: mean {mean:.4f} max {worst:.4f} "
                f"({time.time() - t0:.0f} s)")
    return out


def repaint_settings(text):
    """--repaint's "25:1:1,25:5:3:noisy_end" as [(25, 1, 1), (25, 5, 3, "noisy_end")]."""
    settings = []
    for run in filter(None, text.split(",")):
        parts = run.split(":")
        try:
            setting = tuple(int(v) for v in parts[:3])
        except ValueError:
            setting = ()
        if len(setting) != 3 or len(parts) > 4 or min(setting) < 1 or parts[3:] and parts[3] not in editing.JUMP_POINTS:
            raise argparse.ArgumentTypeError(f"{run!r} is not STEPS:JUMPS:RESAMPLE[:{'|'.join(editing.JUMP_POINTS)}] "
                                             "with positive integers")
        settings.append(setting + tuple(parts[3:]))
    return settings


def measure_editing(ckpt, data_root, num_images=300, mask="bottom", seed=0, settings=((25, 1, 1), (25, 5, 3)),
                    baselines=True, round_trip_steps=(20, 50, 200), round_trip_images=64,
                    round_trip_autoguidance=None, completions=1, split="test", device="cpu", log=print):
    """How often the classifier reads back the true digit of the first num_images images of `split`
    ("val" to tune, "test" for final numbers) once the mask's hole is filled: by the baseline_fills
    (if baselines) and by RePaint with each
    (steps, jumps, resample[, schedule]) of settings; then the round_trips of the first round_trip_images at each
    of round_trip_steps and round_trip_autoguidance (default: 1 and the checkpoint's).

    Sampling follows the checkpoint's sample section (sampler, eta, guidance, autoguidance); a
    conditional model gets no label (the null class), so that the digit is read from the known part
    alone. With completions > 1 each image gets that many, and the RePaint rows add the share of
    images whose most frequent reading is right. Returns {"classifier_val_acc", "num_images", "split", "mask",
    "rows": {name: {"read_back", "hole_abs_err", "seconds"[, "network_steps", "majority"]}},
    "round_trip": round_trips(...)}."""
    model, scheduler, cfg = load_model(ckpt, device)
    s = cfg["sample"]
    guide = load_guide(ckpt, s["autoguidance"], device)
    d = partition(data_root, split)
    clf, acc = get_classifier(os.path.join(data_root, CLASSIFIER_FILE), d["fit_x"], d["fit_y"],
                              d["val_x"], d["val_y"], device=device, log=log, **TRAIN)
    images, labels = d["ref_x"][:num_images], d["ref_y"][:num_images]  # the split's first images
    keep = editing.make_mask(mask, model.image_size, model.in_channels, seed)
    hole = keep.expand_as(images) < 0.5

    def read_back(x, per_image=1):
        pred = classifier_outputs(clf, x, device)[1].argmax(1).reshape(-1, per_image)
        return (pred == labels[:, None]).float().mean().item(), (pred.mode(1).values == labels).float().mean().item()

    def hole_error(x, per_image=1):
        err = (x.reshape(-1, per_image, *x.shape[1:]) - images[:, None]).abs()
        return err[hole[:, None].expand_as(err)].mean().item()

    res = {"classifier_val_acc": acc, "num_images": len(images), "split": split, "mask": mask, "rows": {}}
    for name, x in baseline_fills(images, keep, d["train_x"], seed).items() if baselines else ():
        res["rows"][name] = {"read_back": read_back(x)[0], "hole_abs_err": hole_error(x), "seconds": 0.0}
        log(f"{name}: read back {res['rows'][name]['read_back']:.3f}")
    for steps, jumps, resample, *schedule in settings:
        schedule = schedule[0] if schedule else "clean_end"
        t0 = time.time()
        out = editing.inpaint(model, scheduler, images, keep, completions=completions, seed=seed, sampler=s["sampler"],
                              steps=steps, eta=s["eta"], jumps=jumps, resample=resample, schedule=schedule, labels=None,
                              guidance=s["guidance"], guide=guide, autoguidance=s["autoguidance"],
                              batch_size=s["batch_size"], device=device)
        check_known_pixels_kept(out, images, hole)
        out = out.flatten(0, 1)
        each, majority = read_back(out, completions)
        name = f"RePaint, {s['sampler']} {steps} steps" + (f", jumps {jumps}, resample {resample}, {schedule}"
                                                            if resample > 1 else ", no resampling")
        res["rows"][name] = {"read_back": each, "hole_abs_err": hole_error(out, completions),
                             "seconds": time.time() - t0,
                             "network_steps": editing.network_steps(steps, jumps, resample, schedule)}
        if completions > 1:
            res["rows"][name]["majority"] = majority
        log(f"{name}: read back {res['rows'][name]['read_back']:.3f} ({res['rows'][name]['seconds']:.0f} s)")
    res["round_trip"] = round_trips(model, scheduler, s, guide, images[:round_trip_images], round_trip_steps,
                                    round_trip_autoguidance, device, log)
    return res


def print_editing(res):
    """measure_editing's result as two markdown tables."""
    print(f"\n{res['num_images']} MNIST {res['split']} images, mask {res['mask']} (classifier held-out accuracy "
          f"{res['classifier_val_acc']:.4f})\n\n| fill | read back as the true digit | mean abs error in the hole "
          f"| time |\n|---|---|---|---|")
    for name, r in res["rows"].items():
        when = f"{r['seconds']:.0f} s, {r['network_steps']} steps" if r["seconds"] else ""
        vote = f" (majority vote: {r['majority']:.3f})" if "majority" in r else ""
        print(f"| {name} | {r['read_back']:.3f}{vote} | {r['hole_abs_err']:.3f} | {when} |")
    print("\n| DDIM encode + decode | mean abs pixel error | max | time |\n|---|---|---|---|")
    for name, r in res["round_trip"].items():
        print(f"| {name} | {r['mean_abs']:.4f} | {r['max_abs']:.4f} | {r['seconds']:.0f} s |")


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------

ROWS = [("FID (lower is better)", "fid"), ("KID", "kid"), ("KID standard error", "kid_se"),
        ("precision", "precision"), ("recall", "recall"), ("mean confidence", "mean_confidence"),
        (f"confidence > {CONFIDENT}", "frac_confident"), ("class entropy / log 10", "class_entropy"),
        ("nearest train L2 (pixels)", "nearest_train_l2")]


def format_table(result):
    samples, floor = result["samples"], result["floor"]
    lines = [f"{'metric':<28}{'samples':>12}{'real floor':>12}", "-" * 52]
    for name, key in ROWS:
        lines.append(f"{name:<28}{samples[key]:>12.4g}{floor[key]:>12.4g}")
    for name, res in (("samples", samples), ("real floor", floor)):
        lines.append(f"class histogram, {name:<11}" + " ".join(f"{p:.3f}" for p in res["class_hist"]))
    if "label_accuracy" in samples:
        lines.append(f"{'asked-for digit read back':<28}{samples['label_accuracy']:>12.4g}")
        lines.append("  per digit 0-9: " + " ".join(f"{a:.3f}" for a in samples["per_digit_accuracy"]))
    lines.append(f"(n = {samples['n']} against the {result['split']} split; classifier accuracy on the "
                 f"validation split {result['classifier_val_acc']:.4f})")
    return "\n".join(lines)


def load_png_folder(folder, limit=None):
    """Every *.png in folder (sorted by name) as (N, 1, 28, 28) float in [-1, 1]."""
    paths = sorted(glob.glob(os.path.join(folder, "*.png")))
    if not paths:
        raise ConfigError(f"no .png files in {folder}")
    if limit is not None:
        if len(paths) < limit:
            raise ConfigError(f"--num_samples {limit}, but {folder} holds only {len(paths)} .png files")
        paths = paths[:limit]
    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                if im.size != (28, 28):
                    raise ConfigError(f"{p} is {im.size[0]}x{im.size[1]}; expected one 28x28 digit per file")
                images.append(np.array(im.convert("L")))
        except (OSError, SyntaxError) as e:  # PIL: UnidentifiedImageError (an OSError), truncated data, bad chunks
            raise ConfigError(f"{p} is not a readable PNG ({e}); remove it or write it again") from None
    return to_float(torch.from_numpy(np.stack(images)))


def sample_from_checkpoint(args, guidance=None):
    """(images, labels): labels are the digits asked of a conditional model (0..9 in turn), else None.
    Sampler settings not given on the command line come from the checkpoint's config and are filled
    into args; given ones are validated as config overrides are."""
    model, scheduler, cfg = load_model(args.ckpt, args.device)
    flags = {key: getattr(args, key) for key in ["sampler", "steps", "eta", "autoguidance"]}
    s = with_flags(cfg, "sample", dict(flags, guidance=guidance))["sample"]
    for key in flags:
        setattr(args, key, s[key])
    args.steps = args.steps or scheduler.num_timesteps
    if args.digit is None:  # each digit in turn, equally often
        labels = torch.arange(args.num_samples) % model.num_classes if model.num_classes else None
    else:
        counts = load_label_counts(args.ckpt, args.data) if args.digit == "any" and model.num_classes else None
        labels = requested_labels(args.digit, args.num_samples, model.num_classes, counts, args.seed)[0]
    guide = load_guide(args.ckpt, args.autoguidance, args.device)
    images = generate(model, scheduler, args.num_samples, seed=args.seed, batch_size=args.batch_size,
                      sampler=args.sampler, steps=args.steps, eta=args.eta, device=args.device,
                      labels=labels, guidance=s["guidance"], guide=guide, autoguidance=args.autoguidance)
    return images, labels


def load_judge(data_root, device="cpu", log=print):
    """(the judge classifier, its held-out accuracy): loaded from its cache, or trained and cached."""
    d = partition(data_root, "test")
    return get_classifier(os.path.join(data_root, JUDGE_FILE), d["fit_x"], d["fit_y"], d["val_x"], d["val_y"],
                          arch=JUDGE_ARCH, device=device, log=log, **JUDGE_TRAIN)


def judge_read_back(judge, images, labels, device="cpu"):
    """Per digit 0-9, the share of images the judge reads as their label."""
    hits = (classifier_outputs(judge, images, device)[1].argmax(1).cpu() == labels.cpu()).float()
    return [hits[labels.cpu() == digit].mean().item() for digit in range(10)]


def guidance_sweep(args, weights):
    """Quality against read-back over guidance weights w (conditional checkpoints): FID and the
    asked-for digit read back by the evaluation classifier, and per digit by the judge."""
    rows, (judge, judge_acc) = [], load_judge(args.data, args.device)
    for w in weights:
        images, labels = sample_from_checkpoint(args, w)
        if labels is None:
            raise ConfigError("--guidance_sweep needs a conditional checkpoint (model.num_classes > 0)")
        r = evaluate_images(images, args.data, seed=args.seed, device=args.device, labels=labels,
                            split=args.split)["samples"]
        judged = judge_read_back(judge, images, labels, args.device)
        rows.append({"guidance": w, **{k: r[k] for k in ["fid", "label_accuracy", "per_digit_accuracy",
                                                          "frac_confident", "precision", "recall"]},
                     "judge_val_acc": judge_acc, "judge_per_digit": judged})
        print(f"w = {w:g}: FID {r['fid']:.4g}, asked-for digit read back {r['label_accuracy']:.3f}, "
              f"confidence > {CONFIDENT} {r['frac_confident']:.3f}, precision {r['precision']:.3f}, "
              f"recall {r['recall']:.3f}; the judge reads per digit 0-9: " + " ".join(f"{a:.2f}" for a in judged))
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Score MNIST samples (from a checkpoint or a folder of 28x28 PNGs) with FID, "
        "KID, precision/recall, classifier confidence, class balance and distance to the "
        "training set, next to the same numbers for real data.",
        epilog="Features come from a small CNN trained on MNIST on first use and cached in "
        "DATA/classifier_45k.pt; real-data numbers are cached in DATA/eval_floor_cache.json.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="checkpoint to sample from (EMA weights)")
    source.add_argument("--images", metavar="DIR", help="folder of 28x28 grayscale .png digits")
    parser.add_argument("--sampler", choices=list(SAMPLERS), help="sampler for --ckpt (default: the checkpoint's "
                                                                  "sample.sampler)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the checkpoint's sample.steps)")
    parser.add_argument("--eta", type=float, help="DDIM eta (default: the checkpoint's sample.eta)")
    parser.add_argument("--guidance", type=float,
                        help="conditional checkpoints: guidance w (default: the checkpoint's sample.guidance)")
    parser.add_argument("--autoguidance", type=float,
                        help="checkpoints with a guide: autoguidance w, 1 = off (default: the checkpoint's "
                             "sample.autoguidance)")
    parser.add_argument("--digit", metavar="0-9|any|none",
                        help="labelled checkpoints: the digits to ask for: one digit; any, drawn from the training "
                             "labels' frequencies (the model's p(x)); none, the \"no label\" class (default: each "
                             "digit in turn)")
    parser.add_argument("--guidance_sweep", type=lambda text: [float(w) for w in text.split(",")],
                        metavar="W1,W2,...", help="conditional checkpoints: also score each guidance w")
    parser.add_argument("--num_samples", type=int,
                        help="samples to score (default: 10000 for --ckpt, every .png for --images)")
    parser.add_argument("--batch_size", type=int, default=256,
                        help="sampling batch size (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for sampling and the real subset (default: %(default)s)")
    parser.add_argument("--split", default="test", choices=["test", "val"],
                        help="real images to compare with: test for final numbers, val for tuning "
                             "(default: %(default)s)")
    parser.add_argument("--data", default="data/mnist", help="MNIST folder (default: %(default)s)")
    parser.add_argument("--verify_data", type=str2bool, default=True,
                        help="check the MNIST files' SHA-256 once (False: other data in MNIST's format, "
                             "as data.verify: false) (default: %(default)s)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)

    def nll_timesteps(text):
        return None if text == "all" else int(text)

    nll = parser.add_argument_group(
        "log-likelihood (likelihood.py)",
        "--nll turns evaluate.py into a likelihood run: no sampling, no FID. It reports the variational bound "
        "of the checkpoint (DDPM eq. 5) on random --split images in bits/dim, total and L_T, sum of L_1..L_T-1, "
        "L_0, for the reverse variances beta~_t and beta_t, each with its standard error over images, and writes "
        "nll_*.json, nll_*_per_t.csv and nll_*_per_t.png next to the checkpoint. It uses --seed, --batch_size, "
        "--data and --device too. The default takes 20 network passes per image, about a minute in all on 2 CPU "
        "cores, for a standard error near 0.01 bits/dim.")
    nll.add_argument("--nll", action="store_true", help="compute the variational bound instead of sample metrics")
    nll.add_argument("--nll_images", type=int, default=1000, metavar="N",
                     help="random images of the split to average over (default: %(default)s)")
    nll.add_argument("--nll_timesteps", type=nll_timesteps, default=16, metavar="K|all",
                     help="strata, evenly spaced in log t, over the terms after the exact ones: one random t per "
                          "stratum and image, weighted by the stratum's size (unbiased); `all` computes all T terms "
                          "for every image (default: %(default)s)")
    nll.add_argument("--nll_exact_first", type=int, default=4, metavar="E",
                     help="the first E terms (L_0, the decoder, and L_1..L_E-1), the largest, are computed for "
                          "every image (default: %(default)s)")
    nll.add_argument("--nll_unconditional", action="store_true",
                     help="conditional checkpoints: the bound of the no-label branch (by default each image is "
                          "given its true label)")
    ed = parser.add_argument_group(
        "inpainting read back (editing.py)",
        "--inpaint_eval N fills the --mask region of the first N images of --split with RePaint for each --repaint "
        "setting and reports how often the classifier reads back the true digit, beside nearest-training-image, "
        "noise and black fills, then the DDIM encode-decode error at --round_trip_steps (64 images).")
    ed.add_argument("--inpaint_eval", type=int, metavar="N", help="images of --split to inpaint and read back")
    ed.add_argument("--mask", default="bottom", help="top, bottom, left, right, center or random[:P] (default: %(default)s)")
    ed.add_argument("--repaint", type=repaint_settings, default="25:1:1,25:5:3", metavar="STEPS:J:R[:SCHEDULE],...",
                    help="RePaint runs as steps:jumps:resample (resample 1 = none), optionally :clean_end (the "
                         "paper's jump schedule, the default) or :noisy_end (default: %(default)s)")
    ed.add_argument("--completions", type=int, default=1, help="completions per image; > 1 adds a majority vote")
    ed.add_argument("--round_trip_steps", default="20,50,200", help="DDIM steps of the round trips (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.inpaint_eval and not args.ckpt:
        parser.error("--inpaint_eval needs --ckpt")
    if args.nll and not args.ckpt:
        parser.error("--nll needs --ckpt (the bound is a property of a model, not of a folder of images)")
    if args.nll and args.nll_images < 2:
        parser.error("--nll_images must be at least 2 (the standard error is over images)")
    if args.ckpt and args.num_samples is None:
        args.num_samples = 10000
    if args.num_samples is not None and args.num_samples < 4:
        parser.error("--num_samples must be at least 4 (precision/recall use 3 nearest neighbours)")
    if args.ckpt and not os.path.isfile(args.ckpt):
        parser.error(f"checkpoint {args.ckpt} not found")
    if args.images and not os.path.isdir(args.images):
        parser.error(f"{args.images} is not a folder")
    args.device = pick_device(args.device)
    return args


def main(argv=None):
    """The command line; every mistake in the input is an `error: ...` exit, not a traceback."""
    try:
        run(parse_args(argv))
    except (ConfigError, DownloadError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


def run(args):
    t_start = time.time()
    images = None
    if args.images:  # read them first: a bad folder should not wait for anything else
        images = load_png_folder(args.images, args.num_samples)
        if len(images) < 4:
            raise ConfigError(f"{args.images} holds {len(images)} .png files; need at least 4")
        out_path = os.path.join(args.images, f"eval_{len(images)}.json")

    ensure_mnist_present(args.data, verify=args.verify_data)  # before sampling: a missing dataset fails fast

    if args.inpaint_eval:  # an inpainting and round-trip measurement instead of sample metrics
        print_editing(measure_editing(
            args.ckpt, args.data, args.inpaint_eval, args.mask, args.seed, completions=args.completions,
            settings=args.repaint, split=args.split,
            round_trip_steps=[int(v) for v in args.round_trip_steps.split(",") if v], device=args.device))
        return

    if args.nll:  # a likelihood run instead of sample metrics: the bound and its files, next to the checkpoint
        from likelihood import checkpoint_bound
        checkpoint_bound(args.ckpt, args.data, split=args.split, num_images=args.nll_images,
                         timesteps=args.nll_timesteps, exact_first=args.nll_exact_first,
                         unconditional=args.nll_unconditional, seed=args.seed, batch_size=args.batch_size,
                         device=args.device)
        return

    labels = None
    if images is None:
        images, labels = sample_from_checkpoint(args, args.guidance)
        eta = f"_eta{args.eta:g}" if args.eta else ""
        ag = f"_ag{args.autoguidance:g}" if args.autoguidance != 1 else ""
        out_path = os.path.join(os.path.dirname(os.path.abspath(args.ckpt)),
                                f"eval_{args.sampler}_{args.steps}{eta}{ag}"
                                f"{f'_digit{args.digit}' if args.digit is not None else ''}_{args.num_samples}"
                                f"{'_val' if args.split == 'val' else ''}.json")
    t_sampled = time.time()

    result = evaluate_images(images, args.data, seed=args.seed, device=args.device, labels=labels, split=args.split)
    print(format_table(result))
    if labels is not None:
        judge, judge_acc = load_judge(args.data, args.device)
        judged = judge_read_back(judge, images, labels, args.device)
        result["judge"] = {"val_acc": judge_acc, "per_digit_accuracy": judged}
        print("the judge (a second classifier) reads per digit 0-9: " + " ".join(f"{a:.3f}" for a in judged))
    if args.guidance_sweep:
        result["guidance_sweep"] = guidance_sweep(args, args.guidance_sweep)
    result["settings"] = {k: str(v) if isinstance(v, torch.device) else v for k, v in vars(args).items()}
    result["timings_s"]["sampling_or_loading"] = t_sampled - t_start
    result["time_s"] = time.time() - t_start
    atomic_write(out_path, lambda f: f.write(json.dumps(result, indent=2).encode()))
    print(f"wrote {out_path} ({result['time_s']:.0f} s in all)")


if __name__ == "__main__":
    main()
