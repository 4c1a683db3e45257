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
from conftest import TINY
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
    E[eps | x_t] = sqrt(1 - a) / (a s^2 + 1 - a) * (x_t - sqrt(a) mu)."""

    def __init__(self, scheduler, mu, s):
        super().__init__()
        self.abar, self.mu, self.s = scheduler._alpha_bars_ext64[1:], mu, s

    def forward(self, x, t, y=None):
        a = self.abar[t].reshape(-1, 1, 1, 1)
        return ((1 - a).sqrt() / (a * self.s**2 + 1 - a) * (x.double() - a.sqrt() * self.mu)).float()


def toy(num_timesteps, mu, s, n, seed=0):
    """(model, coefs, x0 (n, 1, 2, 2) on the bins): betas scaled by 1000 / T, as improved-diffusion
    does for short chains, so that x_T is still close to N(0, I)."""
    scale = 1000 / num_timesteps
    sched = LinearNoiseScheduler(num_timesteps, 1e-4 * scale, 0.02 * scale)
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
    assert raw["prior"].mean() / 4 < 1e-3  # x_T is N(0, I) to within 1e-3 nats/pixel


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
    model, _ = build(cfg)
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
    for v in L.VARIANCES:
        b = result["bits_per_dim"][v]
        assert b["bpd"] == pytest.approx(b["L_T"] + b["sum_t"] + b["L_0"]) and b["bpd_se"] > 0
    rows = list(csv.DictReader(open(os.path.join(folder, name[:-5] + "_per_t.csv"))))
    assert [int(r["t"]) for r in rows] == list(range(21))  # t = 0..T-1 and L_T
    assert int(rows[0]["num_images"]) == 6 and os.path.getsize(os.path.join(folder, name[:-5] + "_per_t.png")) > 0


def test_cli_conditional_and_its_mistakes(tmp_path, mnist_root):
    ckpt = tiny_checkpoint(tmp_path, num_classes=10)
    for extra in ([], ["--nll_unconditional"]):
        evaluate.main(["--ckpt", ckpt, "--nll", "--nll_images", "4", "--nll_timesteps", "all", "--data", mnist_root,
                       "--verify_data", "false", "--device", "cpu", *extra])
    names = sorted(f for f in os.listdir(os.path.dirname(ckpt)) if f.endswith(".json"))
    assert names == ["nll_test_4_all_s0_label.json", "nll_test_4_all_s0_uncond.json"]
    with pytest.raises(SystemExit, match="unconditional"):
        evaluate.main(["--ckpt", tiny_checkpoint(tmp_path), "--nll", "--nll_unconditional", "--data", mnist_root,
                       "--verify_data", "false"])
