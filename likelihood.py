"""The variational bound on -log p(x_0) of a DDPM, in bits per dimension (Ho et al. 2020, eq. 5).

    L = L_T + sum_{t=2}^{T} L_{t-1} + L_0                                   (DDPM eq. 5, paper indices)
    L_T     = KL(q(x_T | x_0) || N(0, I))                                   the prior term, no network
    L_{t-1} = E_q KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)),  t = 2..T  Gaussians (eqs. 6, 7, 11)
    L_0     = -E_q log p(x_0 | x_1)                                         discretized decoder (eq. 13)

Index convention. Like linear_noise_scheduler.py, code uses 0-based t in {0, ..., T-1}, index t
being the paper's step t+1. Then the term computed at code index t is exactly the paper's L_t:
code t = 0 is the decoder L_0 (the network at x_1), code t = k >= 1 is the KL L_k between
q(x_k | x_{k+1}, x_0) and p(x_k | x_{k+1}) (the network at x_{k+1}), and index T is the prior L_T.
Per-t arrays here have T + 1 entries, t = 0..T, in that sense.

The reverse process p(x_{t-1} | x_t) = N(mu_theta, sigma_t^2 I) takes its mean from the eps
prediction (eq. 11) and one of two fixed variances (DDPM sec. 3.2), both reported:
    "beta_tilde"  sigma_t^2 = beta~_t (eq. 7), the posterior variance the samplers use; at the
                  decoder (paper t = 1, where beta~_1 = 0) it takes beta~_2 instead, as
                  improved-diffusion's clipped log-variance does (a zero-variance decoder has no
                  likelihood; the samplers' last step simply returns the x_0 prediction);
    "beta"        sigma_t^2 = beta_t.
The mean needs one network pass per (image, t) and serves both: the KL differs only in the variance.
The mean is eq. 11 as is, without clipping the x_0 prediction.

Every expectation over x_t ~ q(x_t | x_0) takes one draw, whose noise depends only on
(seed, image id, t) (noise_for): estimates that share a seed share noise for the same (image, t),
so the stratified estimate and the all-terms value differ only in which t were visited.

The estimator (variational_bound): the first `exact_first` terms (code t = 0 .. exact_first-1:
L_0 and the early KL terms, which dominate the bound, Nichol & Dhariwal 2021 fig. 2) are always
computed; the remaining t are split into K strata (by default evenly spaced in log t, since the
terms fall off roughly like 1/t), each image draws one t uniformly in each stratum and weights
its term by the stratum's size: an unbiased estimate of the sum over t. timesteps=None computes
all T terms. The standard error is over images: std of the per-image estimates / sqrt(N), which
holds the spread between images and that of the t draws and of the x_t draws.

Data are 8-bit images mapped to [-1, 1] (mnist.to_float); bits/dim = nats / (D ln 2) with D = 784.
All the maths runs in float64 on the CPU; only the network sees float32 on its device.
"""

import csv
import hashlib
import io
import json
import math
import os
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from configuration import ConfigError
from fileio import atomic_write, line_plot, load_model, save_image
from mnist import MNIST

VARIANCES = ("beta_tilde", "beta")
BIN = 1.0 / 255.0  # half the width of one of the 256 bins that tile [-1, 1]


# ----------------------------------------------------------------------------
# Gaussian maths, elementwise
# ----------------------------------------------------------------------------

def normal_kl(mean1, var1, mean2, var2):
    """KL(N(mean1, var1) || N(mean2, var2)) elementwise, in nats (tensors broadcast):
    0.5 (log(var2 / var1) + var1 / var2 + (mean1 - mean2)^2 / var2 - 1)."""
    mean1, var1, mean2, var2 = (torch.as_tensor(v, dtype=torch.float64) for v in (mean1, var1, mean2, var2))
    return 0.5 * (torch.log(var2 / var1) + var1 / var2 + (mean1 - mean2).square() / var2 - 1.0)


def _log_normal_mass(a, b):
    """log(Phi(b) - Phi(a)) for a < b without cancellation: the interval is mirrored into the
    lower tail when it lies above 0, and Phi(b) - Phi(a) = Phi(b) (1 - Phi(a) / Phi(b))."""
    upper = a + b > 0
    a, b = torch.where(upper, -b, a), torch.where(upper, -a, b)
    log_b, log_a = torch.special.log_ndtr(b), torch.special.log_ndtr(a)
    return log_b + torch.log(-torch.expm1(log_a - log_b))


def discretized_gaussian_log_likelihood(x, mean, std):
    """log P(x) of DDPM eq. 13: a Gaussian N(mean, std^2) integrated over the bin of x.

    x: bin centres -1 + 2k/255, k = 0..255 (8-bit data in [-1, 1], snapped to the nearest centre);
    mean, std broadcast to x.
    Bins are [x - 1/255, x + 1/255], except the edge bins, which are open: (-inf, -1 + 1/255]
    and [1 - 1/255, inf). So the 256 probabilities sum to 1 for any mean and std.
    Returns float64 log-probabilities of x's shape (nats).
    """
    x, mean, std = (torch.as_tensor(v, dtype=torch.float64) for v in (x, mean, std))
    x = torch.round((x + 1.0) * 127.5) / 127.5 - 1.0  # snap to the exact centre: float32 data is off by ~1e-8
    lo, hi = (x - BIN - mean) / std, (x + BIN - mean) / std
    left, right = x < -1.0 + BIN / 2, x > 1.0 - BIN / 2
    # The edges' open ends: a = -inf for the left bin, b = +inf for the right bin.
    a = torch.where(left, torch.full_like(lo, -math.inf), lo)
    b = torch.where(right, torch.full_like(hi, math.inf), hi)
    return _log_normal_mass(a, b)


# ----------------------------------------------------------------------------
# The schedule's coefficients and the terms of eq. 5
# ----------------------------------------------------------------------------

@dataclass
class Coefficients:
    """Float64 (T,) tensors indexed by code t (paper step t+1): beta_t, alpha_t, abar_t, abar_{t-1}
    (1 at t = 0), the posterior of eq. 7 (mu~ = c0 x_0 + ct x_t, variance beta~_t) and the
    reverse variance of each choice in VARIANCES."""
    betas: torch.Tensor
    alphas: torch.Tensor
    abar: torch.Tensor
    abar_prev: torch.Tensor
    post_c0: torch.Tensor
    post_ct: torch.Tensor
    post_var: torch.Tensor
    variances: dict

    @property
    def num_timesteps(self):
        return len(self.betas)

    @classmethod
    def from_betas(cls, betas):
        """All coefficients from the betas (float64, (T,), T >= 2)."""
        betas = torch.as_tensor(betas, dtype=torch.float64)
        abar = torch.cumprod(1.0 - betas, 0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)  # eq. 7; 0 at t = 0
        decoder_var = torch.cat([post_var[1:2], post_var[1:]])  # beta~_1 = 0 -> beta~_2 (see module doc)
        return cls(betas, 1.0 - betas, abar, abar_prev, abar_prev.sqrt() * betas / (1.0 - abar),
                   (1.0 - betas).sqrt() * (1.0 - abar_prev) / (1.0 - abar), post_var,
                   {"beta_tilde": decoder_var, "beta": betas})

    @classmethod
    def from_scheduler(cls, scheduler):
        """The scheduler's own schedule: betas from its float64 abar, beta_t = 1 - abar_t / abar_{t-1}."""
        abar_ext = scheduler._alpha_bars_ext64
        return cls.from_betas(1.0 - abar_ext[1:] / abar_ext[:-1])


def _per(c, t, x):
    """c[t] for t (B,), shaped (B, 1, 1, 1) to broadcast against x (B, C, H, W)."""
    return c[t].reshape(-1, *([1] * (x.dim() - 1)))


def model_mean(coefs, x_t, eps, t):
    """DDPM eq. 11: mu_theta(x_t, t) = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t).
    x_t, eps (B, C, H, W) float64; t (B,) code indices."""
    beta, alpha, abar = (_per(c, t, x_t) for c in (coefs.betas, coefs.alphas, coefs.abar))
    return (x_t - beta / (1.0 - abar).sqrt() * eps) / alpha.sqrt()


def prior_term(coefs, x0):
    """L_T (B,) nats: KL(q(x_T | x_0) = N(sqrt(abar_T) x_0, (1 - abar_T) I) || N(0, I)), summed over pixels."""
    a = coefs.abar[-1]
    return normal_kl(a.sqrt() * x0, 1.0 - a, 0.0, 1.0).flatten(1).sum(1)


def step_terms(coefs, x0, x_t, eps, t):
    """{variance: (B,) nats}: the term L_t of code index t (B,) per image, summed over pixels.

    t = 0: the decoder -log p(x_0 | x_1), p = eq. 13 around mu_theta with std sigma_1.
    t >= 1: KL(q(x_t | x_{t+1}, x_0) || p(x_t | x_{t+1})) in the paper's indices, i.e. at code
    index t the posterior N(c0 x_0 + ct x_t, beta~_t) against N(mu_theta(x_t, t), sigma_t^2).
    x0, x_t, eps: (B, C, H, W) float64, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise.
    """
    mean = model_mean(coefs, x_t, eps, t)
    dec, kl = t == 0, t > 0
    post_mean = _per(coefs.post_c0, t[kl], x0[kl]) * x0[kl] + _per(coefs.post_ct, t[kl], x0[kl]) * x_t[kl]
    post_var = _per(coefs.post_var, t[kl], x0[kl])
    out = {}
    for name, var in coefs.variances.items():
        term = torch.empty(len(t), dtype=torch.float64)
        std0 = _per(var, t[dec], x0[dec]).sqrt()
        term[dec] = -discretized_gaussian_log_likelihood(x0[dec], mean[dec], std0).flatten(1).sum(1)
        term[kl] = normal_kl(post_mean, post_var, mean[kl], _per(var, t[kl], x0[kl])).flatten(1).sum(1)
        out[name] = term
    return out


# ----------------------------------------------------------------------------
# Noise, timesteps and the estimator
# ----------------------------------------------------------------------------

def noise_for(seed, image_ids, t, shape):
    """(B, *shape) float64 standard normal noise, image b's from a generator keyed by
    (seed, image_ids[b], t[b]) alone: the same (image, t) always gets the same x_t. Keys are 32-bit
    hashes (as samplers.image_seed), so two pairs may rarely share noise, which biases nothing."""
    out = torch.empty(len(image_ids), *shape, dtype=torch.float64)
    for b, (i, tb) in enumerate(zip(image_ids.tolist(), t.tolist())):
        key = int.from_bytes(hashlib.blake2b(f"nll:{seed}:{i}:{tb}".encode(), digest_size=4).digest(), "little")
        out[b] = torch.randn(shape, generator=torch.Generator().manual_seed(key), dtype=torch.float64)
    return out


def strata(num_timesteps, exact_first, num_strata, spacing="log"):
    """(exact, edges): the code t computed for every image, and the strata boundaries.

    exact = [0, ..., exact_first - 1]; the rest, exact_first..T-1, is cut into strata
    [edges[k], edges[k+1]). spacing "log": edges evenly spaced in log t (rounded, duplicates
    dropped, so there may be fewer than num_strata), which matches terms that fall off roughly
    like 1/t and keeps the early strata narrow; "linear": num_strata near-equal strata.
    num_strata None (or at least as many as there are t left) means all T terms exactly: then
    exact = [0..T-1] and edges is empty.
    """
    if not 1 <= exact_first <= num_timesteps:
        raise ConfigError(f"the exact leading terms (--nll_exact_first) must number 1 (L_0 alone) to "
                          f"T = {num_timesteps}, got {exact_first}")
    left = num_timesteps - exact_first
    if num_strata is None or num_strata >= left:
        return list(range(num_timesteps)), torch.zeros(0, dtype=torch.long)
    if num_strata < 1:
        raise ConfigError(f"the number of strata (--nll_timesteps) must be at least 1 (or `all`), got {num_strata}")
    if spacing == "linear":
        edges = exact_first + torch.arange(num_strata + 1) * left // num_strata
    elif spacing == "log":
        grid = torch.logspace(math.log10(exact_first), math.log10(num_timesteps), num_strata + 1, dtype=torch.float64)
        edges = torch.unique(grid.round().long().clamp(exact_first, num_timesteps))
    else:
        raise ConfigError(f"strata spacing must be log or linear, got {spacing!r}")
    return list(range(exact_first)), edges


def draw_timesteps(edges, num_images, generator):
    """(N, K) code t, one uniform draw in each stratum per image, and the (K,) stratum sizes (weights)."""
    sizes = edges[1:] - edges[:-1]
    u = torch.rand(num_images, len(sizes), generator=generator, dtype=torch.float64)
    return edges[:-1] + (u * sizes).long().clamp(max=sizes - 1), sizes


def _network_terms(model, coefs, x0, ids, t, y, seed, device):
    """step_terms at code t (B,) with x_t drawn by noise_for; one network call."""
    noise = noise_for(seed, ids, t, x0.shape[1:])
    a = _per(coefs.abar, t, x0)
    x_t = a.sqrt() * x0 + (1.0 - a).sqrt() * noise
    yb = None if y is None else y.to(device)
    eps = model(x_t.float().to(device), t.to(device), yb).double().cpu()
    return step_terms(coefs, x0, x_t, eps, t)


@torch.inference_mode()
def variational_bound(model, coefs, x0, *, y=None, image_ids=None, timesteps=None, exact_first=4, spacing="log",
                      seed=0, timestep_seed=None, batch_size=250, device="cpu", progress=False):
    """Per-image estimates of the bound (eq. 5) in nats, for each variance in VARIANCES.

    model(x_t, t, y) -> eps; x0 (N, C, H, W) in [-1, 1] on 8-bit bin centres; y (N,) labels or None;
    image_ids (N,) key the noise (default 0..N-1); timesteps: K strata (None = all T terms), spaced
    as `spacing` says (see strata);
    timestep_seed: seed of the strata draws (default: seed). See the module doc for the design.
    Returns {"prior": (N,), "steps": {var: (N,)} (sum over code t >= 1), "decoder": {var: (N,)},
    "total": {var: (N,)}, "per_t_sum": {var: (T+1,)}, "per_t_count": (T+1,), "exact": [...],
    "edges": (K+1,)}; per_t_sum / per_t_count is the mean term at each t over the images that visited it.
    """
    x0 = torch.as_tensor(x0, dtype=torch.float64)
    n, T = len(x0), coefs.num_timesteps
    ids = torch.arange(n) if image_ids is None else torch.as_tensor(image_ids).long()
    exact, edges = strata(T, exact_first, timesteps, spacing)
    gen = torch.Generator().manual_seed(seed if timestep_seed is None else timestep_seed)
    drawn, sizes = draw_timesteps(edges, n, gen)
    steps = {v: torch.zeros(n, dtype=torch.float64) for v in VARIANCES}
    decoder = {v: torch.zeros(n, dtype=torch.float64) for v in VARIANCES}
    per_t_sum = {v: torch.zeros(T + 1, dtype=torch.float64) for v in VARIANCES}
    per_t_count = torch.zeros(T + 1, dtype=torch.long)
    bar = tqdm(total=n * (len(exact) + len(sizes)), desc="bound", unit="img-step", disable=not progress, leave=False)
    for start in range(0, n, batch_size):
        sl = slice(start, min(start + batch_size, n))
        xb, yb = x0[sl], None if y is None else y[sl]
        slots = [(torch.full((len(xb),), t), 1) for t in exact] + [(drawn[sl, k], int(sizes[k]))
                                                                  for k in range(len(sizes))]
        for t, weight in slots:
            terms = _network_terms(model, coefs, xb, ids[sl], t, yb, seed, device)
            for v in VARIANCES:
                target = decoder[v] if int(t[0]) == 0 else steps[v]  # t = 0 only in the exact slot
                target[sl] += weight * terms[v]
                per_t_sum[v].index_add_(0, t, terms[v])
            per_t_count.index_add_(0, t, torch.ones_like(t))
            bar.update(len(xb))
    bar.close()
    prior = prior_term(coefs, x0)
    for v in VARIANCES:
        per_t_sum[v][T] = prior.sum()
    per_t_count[T] = n
    return {"prior": prior, "steps": steps, "decoder": decoder,
            "total": {v: prior + steps[v] + decoder[v] for v in VARIANCES},
            "per_t_sum": per_t_sum, "per_t_count": per_t_count, "exact": exact, "edges": edges}


# ----------------------------------------------------------------------------
# Summaries and files
# ----------------------------------------------------------------------------

def mean_se(values):
    """(mean, standard error over the N values) as floats; SE is nan for N = 1."""
    values = torch.as_tensor(values, dtype=torch.float64)
    se = values.std(correction=1) / math.sqrt(len(values)) if len(values) > 1 else torch.tensor(math.nan)
    return values.mean().item(), se.item()


def summarize(raw, dims):
    """{variance: {"bpd", "bpd_se", "L_T", "L_T_se", "sum_t", "sum_t_se", "L_0", "L_0_se"}} in
    bits/dim (nats / (dims ln 2)); sum_t is the sum of L_1..L_{T-1} (code t >= 1)."""
    scale = 1.0 / (dims * math.log(2.0))
    out = {}
    for v in VARIANCES:
        parts = {"bpd": raw["total"][v], "L_T": raw["prior"], "sum_t": raw["steps"][v], "L_0": raw["decoder"][v]}
        out[v] = {}
        for key, values in parts.items():
            out[v][key], out[v][f"{key}_se"] = (x * scale for x in mean_se(values))
    return out


def per_t_table(raw, dims):
    """Rows (t, term for each variance in bits/dim, images that visited t), t = 0..T (T: L_T);
    the term is None where no image visited t."""
    scale = 1.0 / (dims * math.log(2.0))
    rows = []
    for t, count in enumerate(raw["per_t_count"].tolist()):
        terms = [raw["per_t_sum"][v][t].item() / count * scale if count else None for v in VARIANCES]
        rows.append((t, *terms, count))
    return rows


def format_summary(summary, num_images, design):
    lines = [f"variational bound (DDPM eq. 5) on {num_images} images, {design}; bits/dim +- standard error",
             f"{'reverse variance':<18}{'total':>18}{'L_T':>12}{'sum L_1..L_T-1':>20}{'L_0':>18}"]
    for v, s in summary.items():
        name = "beta~_t" if v == "beta_tilde" else "beta_t"
        lines.append(f"{name:<18}{s['bpd']:>10.4f} +-{s['bpd_se']:.4f}{s['L_T']:>12.2e}"
                     f"{s['sum_t']:>12.4f} +-{s['sum_t_se']:.4f}{s['L_0']:>10.4f} +-{s['L_0_se']:.4f}")
    return "\n".join(lines)


def csv_bytes(rows):
    f = io.StringIO()
    w = csv.writer(f, lineterminator="\n")
    w.writerow(["t", *(f"term_{v}_bpd" for v in VARIANCES), "num_images"])
    for t, *terms, count in rows:
        w.writerow([t, *("" if x is None else f"{x:.6e}" for x in terms), count])
    return f.getvalue().encode()


def plot_terms(rows, title):
    """PIL image of the mean term (bits/dim) against code t = 0..T-1, both axes logarithmic (x: t + 1,
    so t = 0, the decoder, sits at the left edge), one line per variance; in a stratified run each t
    beyond the exact ones is a mean over the few images that drew it."""
    labels = {"beta_tilde": "sigma^2 = beta~_t", "beta": "sigma^2 = beta_t"}
    series = {labels[v]: [(row[0], row[1 + i]) for row in rows[:-1]] for i, v in enumerate(VARIANCES)}
    return line_plot(series, title, "code t, log scale of t + 1 (t = 0: L_0, the decoder; t: L_t)",
                     "mean term, bits/dim", log_x=True, marks=10)


def write_outputs(prefix, result, rows, plot):
    """prefix.json (result), prefix_per_t.csv (rows) and prefix_per_t.png (plot), each atomically."""
    atomic_write(f"{prefix}.json", lambda f: f.write(json.dumps(result, indent=2).encode()))
    atomic_write(f"{prefix}_per_t.csv", lambda f: f.write(csv_bytes(rows)))
    save_image(plot, f"{prefix}_per_t.png")
    return [f"{prefix}{s}" for s in (".json", "_per_t.csv", "_per_t.png")]


def checkpoint_bound(ckpt, data_root, *, split="test", num_images=1000, timesteps=16, exact_first=4,
                     unconditional=False, seed=0, batch_size=250, device="cpu", progress=True, log=print):
    """The bound of a checkpoint's EMA model on num_images random images of an MNIST split (all of
    them if num_images is None), written next to the checkpoint as nll_*.json, nll_*_per_t.csv and
    nll_*_per_t.png. Conditional models are given each image's true label, or with unconditional the
    "no label" class. Returns the JSON's dict."""
    t_start = time.time()
    model, scheduler, _ = load_model(ckpt, device)
    if unconditional and not model.num_classes:
        raise ConfigError("--nll_unconditional is for conditional checkpoints; this one is unconditional "
                          "(model.num_classes = 0), and its bound is already the unconditional one")
    data = MNIST(data_root, split)
    n = len(data) if num_images is None else num_images
    if not 2 <= n <= len(data):
        raise ConfigError(f"--nll_images must be in [2, {len(data)}] for the {split} split, got {n}")
    ids = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
    x0 = data.images[ids][:, None].double() / 127.5 - 1.0  # mnist.to_float, in float64
    y = None
    if model.num_classes:
        y = torch.full((n,), model.num_classes) if unconditional else data.labels[ids]
    coefs = Coefficients.from_scheduler(scheduler)
    def eps_model(x_t, t, y):  # the network's output as eps, whatever it predicts
        return scheduler.eps_from_output(model(x_t, t, y), x_t, t)

    raw = variational_bound(eps_model, coefs, x0, y=y, image_ids=ids, timesteps=timesteps, exact_first=exact_first,
                            seed=seed, batch_size=batch_size, device=device, progress=progress)
    dims = x0[0].numel()
    k = len(raw["edges"]) - 1
    design = (f"all {coefs.num_timesteps} terms" if k < 1 else
              f"L_0 to L_{exact_first - 1} exact + {k} strata over t = {exact_first} to {coefs.num_timesteps - 1}")
    summary, rows = summarize(raw, dims), per_t_table(raw, dims)
    condition = "" if not model.num_classes else ("_uncond" if unconditional else "_label")
    prefix = os.path.join(os.path.dirname(os.path.abspath(ckpt)),
                          f"nll_{split}_{n}_{'all' if k < 1 else f'e{exact_first}k{k}'}_s{seed}{condition}")
    result = {"bits_per_dim": summary, "num_images": n, "split": split, "design": design,
              "exact_first": len(raw["exact"]), "strata_edges": raw["edges"].tolist(), "seed": seed,
              "condition": {"": "none (unconditional model)", "_uncond": "no-label class",
                            "_label": "true label"}[condition],
              "checkpoint": os.path.abspath(ckpt), "dims": dims,
              "network_passes": n * (len(raw["exact"]) + k), "time_s": time.time() - t_start}
    log(format_summary(summary, n, design))
    files = write_outputs(prefix, result, rows, plot_terms(rows, f"{os.path.basename(ckpt)}: {design}, {n} images"))
    log(f"wrote {', '.join(files)} ({result['time_s']:.0f} s)")
    return result
