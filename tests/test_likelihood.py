"""The variational bound of likelihood.py, each piece against an independent computation.

Tiny and CPU only: a closed-form "network" on Gaussian toy data stands in for the UNet, except in
the end-to-end CLI test, which runs a tiny untrained UNet on the synthetic IDX files of conftest.
"""

import csv
import json
import math
import os

import pytest
import torch
from torch.distributions import Normal, kl_divergence

import evaluate
import likelihood as L
from configuration import DEFAULTS, merge
from conftest import TINY, randomised
from fileio import build, save_checkpoint
from linear_noise_scheduler import LinearNoiseScheduler
from mnist import to_float

F64 = torch.float64


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(500, generator=g, dtype=F64), 2 * torch.randn(500, generator=g, dtype=F64)
    s1, s2 = (torch.exp(torch.randn(500, generator=g, dtype=F64)) for _ in range(2))
    expected = kl_divergence(Normal(m1, s1), Normal(m2, s2))
    assert torch.allclose(L.normal_kl(m1, s1**2, m2, s2**2), expected, rtol=1e-10, atol=1e-12)
    assert torch.allclose(L.normal_kl(m1, s1**2, m1, s1**2), torch.zeros(500, dtype=F64), atol=1e-12)


BIN_CENTRES = torch.arange(256, dtype=F64) / 127.5 - 1  # -1 + 2k/255, exactly


def direct_bin_probs(mean, std):
    """P(bin k), k = 0..255, as plain CDF differences, open-ended at both edges."""
    n = Normal(torch.tensor(mean, dtype=F64), torch.tensor(std, dtype=F64))
    upper = torch.cat([n.cdf(BIN_CENTRES[:-1] + 1 / 255), torch.ones(1, dtype=F64)])
    lower = torch.cat([torch.zeros(1, dtype=F64), n.cdf(BIN_CENTRES[1:] - 1 / 255)])
    return upper - lower


@pytest.mark.parametrize("mean", [-3.0, -1.0, -0.37, 0.0, 0.5, 0.999, 1.0, 4.0])
@pytest.mark.parametrize("std", [1e-4, 3e-3, 0.05, 0.7, 10.0])
def test_discretized_decoder_is_a_distribution_over_the_256_bins(mean, std):
    logp = L.discretized_gaussian_log_likelihood(BIN_CENTRES, mean, std)
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    direct = direct_bin_probs(mean, std)
    assert torch.allclose(logp.exp(), direct, rtol=1e-7, atol=1e-12)
    big = direct > 1e-6  # where the direct difference is accurate, so are the logs
    assert torch.allclose(logp[big], direct[big].log(), rtol=0, atol=1e-6)
    # The data path (uint8 -> float32 in [-1, 1], a few 1e-8 off the centres) gives the same bins.
    data = to_float(torch.arange(256, dtype=torch.uint8)).double()
    assert torch.allclose(L.discretized_gaussian_log_likelihood(data, mean, std), logp, rtol=1e-12, atol=1e-12)


def test_discretized_decoder_tails_stay_finite():
    """Far from the mean the CDF difference underflows; the log-likelihood must not."""
    logp = L.discretized_gaussian_log_likelihood(BIN_CENTRES, 0.9, 1e-3)
    assert torch.isfinite(logp).all()
    # Near the far edge the log-mass is the Gaussian's -z^2/2 to leading order.
    z = (-1 + 1 / 255 - 0.9) / 1e-3
    assert logp[0].item() == pytest.approx(-0.5 * z * z - math.log(-z * math.sqrt(2 * math.pi)), rel=1e-3)


# ----------------------------------------------------------------------------
# Gaussian toy data: x_0 ~ N(mu, s^2) per pixel, rounded to the 8-bit bins
# ----------------------------------------------------------------------------

class OptimalEps(torch.nn.Module):
    """E[eps | x_t] for x_0 ~ N(mu, s^2): with x_t = sqrt(a) x_0 + sqrt(1 - a) eps, (x_t, eps) are
    jointly Gaussian, Var(x_t) = a s^2 + 1 - a and Cov(eps, x_t) = sqrt(1 - a), so
    E[eps | x_t] = sqrt(1 - a) / (a s^2 + 1 - a) * (x_t - sqrt(a) mu). Class-conditional data: mu
    a tensor of class means, x_0 ~ N(mu[y], s^2) given the label y."""

    def __init__(self, scheduler, mu, s):
        super().__init__()
        self.abar, self.mu, self.s = scheduler._alpha_bars_ext64[1:], mu, s

    def forward(self, x, t, y=None):
        a = self.abar[t].reshape(-1, 1, 1, 1)
        mu = self.mu if y is None else self.mu[y.cpu()].reshape(-1, 1, 1, 1)
        return ((1 - a).sqrt() / (a * self.s**2 + 1 - a) * (x.double() - a.sqrt() * mu)).float()


def toy_scheduler(num_timesteps):
    """Betas scaled by 1000 / T, as improved-diffusion does for short chains, so that x_T is still
    close to N(0, I)."""
    scale = 1000 / num_timesteps
    return LinearNoiseScheduler(num_timesteps, 1e-4 * scale, 0.02 * scale)


def toy(num_timesteps, mu, s, n, seed=0):
    """(model, coefs, x0 (n, 1, 2, 2) on the bins) on toy_scheduler's chain."""
    sched = toy_scheduler(num_timesteps)
    x = mu + s * torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)
    x0 = ((x + 1) * 127.5).round().clamp(0, 255) / 127.5 - 1
    return OptimalEps(sched, mu, s), L.Coefficients.from_scheduler(sched), x0


def discretized_entropy(mu, s):
    """H (nats) of one pixel: N(mu, s^2) binned into the 256 bins."""
    p = direct_bin_probs(mu, s)
    p = p[p > 0]
    return -(p * p.log()).sum().item()


def test_bound_on_gaussian_data_is_close_above_its_entropy():
    """The bound is >= the true NLL >= the data's entropy H, and with the optimal eps, T = 100 and
    sigma^2 = beta_t it is within 0.15 nats/pixel of H (measured 0.085 +- 0.013). beta~_t fits these
    data worse: their reverse conditionals have variance v_{t-1} beta_t / v_t, v_t = abar_t s^2 + 1 -
    abar_t, near beta_t, while beta~_t is much smaller at small t (measured gap ~1.0 nats/pixel)."""
    mu, s = 0.1, 0.2
    model, coefs, x0 = toy(100, mu, s, 2000)
    h = discretized_entropy(mu, s)
    raw = L.variational_bound(model, coefs, x0, timesteps=None, batch_size=2000)
    gap = {}
    for v in L.VARIANCES:
        mean, se = L.mean_se(raw["total"][v] / 4)
        gap[v] = mean - h
        assert gap[v] > -3 * se, (v, gap[v], se)
    assert gap["beta"] < 0.15
    assert gap["beta"] < gap["beta_tilde"] < 1.5
    assert 0 < raw["prior"].mean() / 4 < 1e-3  # x_T is N(0, I) to within 1e-3 nats/pixel


def test_prior_term_is_the_kl_of_q_x_T_from_the_standard_normal():
    """L_T = KL(N(sqrt(abar_T) x_0, 1 - abar_T) || N(0, 1)) summed over pixels, abar_T = prod (1 - beta_t),
    on a short chain that leaves a third of the signal, so that L_T is large."""
    betas = torch.linspace(0.01, 0.1, 10, dtype=F64)
    abar_T = math.prod(1 - b for b in betas.tolist())
    x0 = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64) * 2 - 1
    expected = kl_divergence(Normal(math.sqrt(abar_T) * x0, math.sqrt(1 - abar_T)), Normal(0.0, 1.0)).sum((1, 2, 3))
    assert expected.min() > 0.5
    assert torch.allclose(L.prior_term(L.Coefficients.from_betas(betas), x0), expected, rtol=1e-10)


class Recorder(torch.nn.Module):
    """The model, keeping every (x_t, t, eps) it was asked for."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x, t, y=None):
        eps = self.model(x, t, y)
        self.calls.append((x.double(), t, eps.double()))
        return eps


def direct_terms(betas, x0, x_t, eps, t, variance):
    """The term at code t (0: the decoder, else the KL) of DDPM eq. 5 per image, from the paper's
    formulas alone. Code t is paper step t + 1; x_t is the point the network saw."""
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    b, a, ab = betas[t], alphas[t], abar[t]
    mean = (x_t - b / (1 - ab).sqrt() * eps) / a.sqrt()  # eq. 11
    tilde = lambda k: (1 - abar[k - 1]) / (1 - abar[k]) * betas[k]  # eq. 7, k >= 1
    var = b if variance == "beta" else tilde(max(t, 1))  # beta~ at the decoder: beta~ of paper step 2
    if t == 0:  # eq. 13: the Gaussian's mass over x_0's bin, the edge bins open-ended
        n = Normal(mean, var.sqrt())
        upper = torch.where(x0 > 1 - 1e-6, torch.ones_like(x0), n.cdf(x0 + 1 / 255))
        lower = torch.where(x0 < -1 + 1e-6, torch.zeros_like(x0), n.cdf(x0 - 1 / 255))
        return -(upper - lower).log().sum((1, 2, 3))
    post_mean = abar[t - 1].sqrt() * b / (1 - ab) * x0 + a.sqrt() * (1 - abar[t - 1]) / (1 - ab) * x_t  # eq. 7
    return kl_divergence(Normal(post_mean, tilde(t).sqrt()), Normal(mean, var.sqrt())).sum((1, 2, 3))


def test_bound_is_the_sum_of_the_papers_terms():
    """Every term of eq. 5, computed from the paper's formulas at the x_t the network saw, summed per
    image: L_T + L_1 + ... + L_{T-1} + L_0 is the bound's total for both variances."""
    sched = LinearNoiseScheduler(20, 0.01, 0.1)  # a short chain that keeps a third of the signal: L_T counts
    recorder, coefs, x0 = Recorder(OptimalEps(sched, 0.1, 0.3)), L.Coefficients.from_scheduler(sched), toy(50, 0.1, 0.3, 5)[2]
    raw = L.variational_bound(recorder, coefs, x0, timesteps=None)
    betas = torch.linspace(0.01, 0.1, 20, dtype=F64)
    abar_T = torch.cumprod(1 - betas, 0)[-1]
    prior = kl_divergence(Normal(abar_T.sqrt() * x0, (1 - abar_T).sqrt()), Normal(0.0, 1.0)).sum((1, 2, 3))
    assert sorted(int(t[0]) for _, t, _ in recorder.calls) == list(range(20)) and prior.min() > 0.1
    for v in L.VARIANCES:
        total = prior.clone()
        for x_t, t, eps in recorder.calls:
            total += direct_terms(betas, x0, x_t, eps, int(t[0]), v)
        assert torch.allclose(raw["total"][v], total, rtol=1e-6), (v, raw["total"][v], total)


def test_the_label_picks_each_images_conditional():
    """Two classes, x_0 ~ N(-0.4, 0.2^2) and N(0.4, 0.2^2), and the optimal eps given the label: with its
    label, each image's bound is that of its own class's model (same images, same noise), in batches
    that cut across the classes; with the other label it is far higher."""
    mus = torch.tensor([-0.4, 0.4], dtype=F64)
    parts = [toy(50, mu, 0.2, 4, seed=k) for k, mu in enumerate(mus.tolist())]
    coefs, x0 = parts[0][1], torch.cat([p[2] for p in parts])
    y, ids = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1]), torch.arange(8)
    x0 = x0[[0, 4, 1, 5, 2, 6, 3, 7]]  # alternate the classes
    model = OptimalEps(toy_scheduler(50), mus, 0.2)
    given = L.variational_bound(model, coefs, x0, y=y, timesteps=None, batch_size=3)["total"]
    wrong = L.variational_bound(model, coefs, x0, y=1 - y, timesteps=None, batch_size=3)["total"]
    for k, (own, _, _) in enumerate(parts):
        alone = L.variational_bound(own, coefs, x0[y == k], image_ids=ids[y == k], timesteps=None)["total"]
        for v in L.VARIANCES:
            assert torch.allclose(given[v][y == k], alone[v], rtol=1e-10), (k, v)
    for v in L.VARIANCES:
        assert (wrong[v] > given[v] + 5).all(), v


@pytest.mark.parametrize("spacing, exact_first, strata", [("linear", 3, 6), ("log", 2, 6)])
def test_stratified_estimate_is_unbiased_for_the_all_terms_value(spacing, exact_first, strata):
    """With the noise of each (image, t) fixed, the mean over many timestep draws of the stratified
    estimate matches the all-terms value (uneven strata: 47 t in 6 strata, or log-spaced)."""
    model, coefs, x0 = toy(50, 0.1, 0.3, 40)
    exact = L.variational_bound(model, coefs, x0, timesteps=None)
    draws = {v: [] for v in L.VARIANCES}
    for r in range(150):
        est = L.variational_bound(model, coefs, x0, timesteps=strata, exact_first=exact_first, spacing=spacing,
                                  timestep_seed=1000 + r)
        for v in L.VARIANCES:
            draws[v].append(est["total"][v].mean())
    for v in L.VARIANCES:
        mean, se = L.mean_se(torch.stack(draws[v]))
        target = exact["total"][v].mean().item()
        assert se > 0 and abs(mean - target) < 4 * se, (v, mean, target, se)


def test_strata_cover_the_remaining_timesteps_once():
    for spacing in ("linear", "log"):
        for T, e, k in [(1000, 4, 16), (1000, 1, 50), (50, 3, 6), (10, 6, 3)]:
            exact, edges = L.strata(T, e, k, spacing)
            assert exact == list(range(e)) and edges[0] == e and edges[-1] == T
            assert (edges[1:] > edges[:-1]).all()
    assert L.strata(20, 4, 16)[0] == list(range(20))  # as many strata as t left: all terms exactly


# ----------------------------------------------------------------------------
# The command line on a tiny untrained UNet
# ----------------------------------------------------------------------------

def tiny_checkpoint(tmp_path, num_classes=0):
    cfg = merge(DEFAULTS, {"model": dict(TINY["model"], num_classes=num_classes), "diffusion": {"num_timesteps": 20}})
    model = randomised(build(cfg)[0])
    path = tmp_path / f"run{num_classes}" / "last.pt"
    save_checkpoint(str(path), {"model": model.state_dict(), "ema": model.state_dict(), "optimizer": {},
                                "step": 0, "config": cfg})
    return str(path)


def test_cli_writes_json_csv_and_png(tmp_path, mnist_root):
    ckpt = tiny_checkpoint(tmp_path)
    evaluate.main(["--ckpt", ckpt, "--nll", "--nll_images", "6", "--nll_timesteps", "3", "--data", mnist_root,
                   "--verify_data", "false", "--device", "cpu"])
    folder = os.path.dirname(ckpt)
    (name,) = [f for f in os.listdir(folder) if f.startswith("nll_") and f.endswith(".json")]
    result = json.load(open(os.path.join(folder, name)))
    rows = list(csv.DictReader(open(os.path.join(folder, name[:-5] + "_per_t.csv"))))
    assert [int(r["t"]) for r in rows] == list(range(21))  # t = 0..T-1 and L_T
    assert [int(r["num_images"]) for r in rows[:4]] == [6] * 4  # the exact terms
    # L_0 and L_T are exact: the summary and the per-t table, summed separately, agree on them
    for v in L.VARIANCES:
        b = result["bits_per_dim"][v]
        assert b["L_0"] == pytest.approx(float(rows[0][f"term_{v}_bpd"]), rel=1e-5) and b["bpd_se"] > 0
        assert b["L_T"] == pytest.approx(float(rows[20][f"term_{v}_bpd"]), rel=1e-5)
    assert os.path.getsize(os.path.join(folder, name[:-5] + "_per_t.png")) > 0


def test_cli_conditional_and_its_mistakes(tmp_path, mnist_root):
    ckpt = tiny_checkpoint(tmp_path, num_classes=10)
    for extra in ([], ["--nll_unconditional"]):
        evaluate.main(["--ckpt", ckpt, "--nll", "--nll_images", "4", "--nll_timesteps", "all", "--data", mnist_root,
                       "--verify_data", "false", "--device", "cpu", *extra])
    names = sorted(f for f in os.listdir(os.path.dirname(ckpt)) if f.endswith(".json"))
    assert names == ["nll_test_4_all_s0_label.json", "nll_test_4_all_s0_uncond.json"]
    label, uncond = (json.load(open(os.path.join(os.path.dirname(ckpt), n)))["bits_per_dim"] for n in names)
    for v in L.VARIANCES:  # the same images and noise: only the label the model is given differs
        assert label[v]["L_T"] == uncond[v]["L_T"] and abs(label[v]["bpd"] - uncond[v]["bpd"]) > 1e-4
    with pytest.raises(SystemExit, match="unconditional"):
        evaluate.main(["--ckpt", tiny_checkpoint(tmp_path), "--nll", "--nll_unconditional", "--data", mnist_root,
                       "--verify_data", "false"])
