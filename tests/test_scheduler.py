"""Invariants of the diffusion maths, each checked against an independent computation."""

import math

import pytest
import torch

from linear_noise_scheduler import LinearNoiseScheduler, timestep_list
from samplers import SAMPLERS, sample_loop

T = 1000


@pytest.fixture(scope="module")
def sched():
    return LinearNoiseScheduler(T, 1e-4, 0.02)


def x0_from(sched, x_t, eps, t, clip=True):
    """The x_0 prediction the reverse steps take, clipped to [-1, 1] as the sampling loop does."""
    x0 = sched.predict_x0(x_t, eps, t)
    return x0.clamp(-1, 1) if clip else x0


def test_schedule_invariants(sched):
    assert torch.all(sched.betas[1:] > sched.betas[:-1])
    assert torch.all(sched.alpha_bars[1:] < sched.alpha_bars[:-1])
    assert sched.betas[0].item() == pytest.approx(1e-4) and sched.betas[-1].item() == pytest.approx(0.02)
    assert sched.posterior_variance[0].item() == 0.0
    # beta~_t <= beta_t, and tends to beta_t at large t (DDPM sec. 3.2)
    assert torch.all(sched.posterior_variance <= sched.betas + 1e-7)
    assert sched.posterior_variance[-1].item() == pytest.approx(0.02, rel=1e-3)
    # abar_t is the running product of (1 - beta), recomputed independently in float64
    prod, ref = 1.0, []
    for b in torch.linspace(1e-4, 0.02, T, dtype=torch.float64).tolist():
        prod *= 1 - b
        ref.append(prod)
    assert torch.allclose(sched.alpha_bars.double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-5)


def test_add_noise_then_predict_x0_returns_x0(sched):
    x0, noise = torch.rand(8, 1, 28, 28) * 2 - 1, torch.randn(8, 1, 28, 28)
    t = torch.tensor([0, 1, 10, 100, 400, 700, 900, 999])
    x_t = sched.add_noise(x0, noise, t)
    assert torch.allclose(sched.predict_x0(x_t, noise, t), x0, atol=2e-3)
    assert torch.allclose(sched.eps_from_x0(x_t, x0, t), noise, atol=1e-4)


def test_batched_t_equals_one_t_at_a_time(sched):
    x0, noise = torch.randn(4, 1, 5, 5), torch.randn(4, 1, 5, 5)
    t = torch.tensor([3, 300, 600, 999])
    x_t = sched.add_noise(x0, noise, t)
    batched = sched.ddpm_step(x_t, x0_from(sched, x_t, noise, t), t, t - 1, noise)
    singles = []
    for i in range(4):
        x_i = sched.add_noise(x0[i:i + 1], noise[i:i + 1], int(t[i]))
        singles.append(sched.ddpm_step(x_i, x0_from(sched, x_i, noise[i:i + 1], int(t[i])), int(t[i]), int(t[i]) - 1,
                                       noise[i:i + 1]))
    assert torch.allclose(batched, torch.cat(singles), atol=1e-6)


def test_ddpm_step_is_eq_11(sched):
    """Without clipping, the posterior form equals eq. 11: (x_t - beta/sqrt(1-abar) eps)/sqrt(alpha) + sigma z."""
    x_t, eps, z = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    for t in [0, 1, 500, 999]:
        b, a, ab = sched.betas[t], sched.alphas[t], sched.alpha_bars[t]
        ref = (x_t - b / (1 - ab).sqrt() * eps) / a.sqrt() + sched.posterior_variance[t].sqrt() * z
        assert torch.allclose(sched.ddpm_step(x_t, x0_from(sched, x_t, eps, t, False), t, t - 1, z), ref, atol=1e-4)


def test_ddim_eta_1_matches_ddpm_mean_and_variance(sched):
    x_t, eps = torch.randn(2, 1, 6, 6), torch.randn(2, 1, 6, 6)
    zero, z = torch.zeros_like(x_t), torch.randn_like(x_t)
    for t in [1, 2, 50, 500, 999]:
        for clip, tol in [(False, 1e-5), (True, 1e-4)]:  # clipping goes through eps = f(x0): float32 noise
            x0 = x0_from(sched, x_t, eps, t, clip)
            mean_ddpm = sched.ddpm_step(x_t, x0, t, t - 1, zero)
            mean_ddim = sched.ddim_step(x_t, x0, t, t - 1, eta=1.0, noise=zero)
            assert torch.allclose(mean_ddim, mean_ddpm, atol=tol)
        sigma = sched.ddim_sigma(t, t - 1, 1.0, x_t)
        assert sigma.item() ** 2 == pytest.approx(sched.posterior_variance[t].item(), rel=1e-4)
        # same noise in, same sample out: the noise enters with the same scale
        x0 = x0_from(sched, x_t, eps, t, False)
        assert torch.allclose(sched.ddim_step(x_t, x0, t, t - 1, 1.0, z), sched.ddpm_step(x_t, x0, t, t - 1, z),
                              atol=1e-5)


def perfect_predictor(sched, x0):
    """The exact eps for data that is the single point x0: eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""
    return lambda x_t, t: sched.eps_from_x0(x_t, x0.expand_as(x_t), t)


@pytest.mark.parametrize("steps", [1, 2, 7, 50, 1000])
def test_deterministic_samplers_recover_the_single_data_point(sched, steps):
    x0 = torch.rand(1, 1, 8, 8) * 1.6 - 0.8
    eps_fn = perfect_predictor(sched, x0)
    ts = timestep_list(T, steps)
    for sampler in ["ddim", "dpm++"]:
        outs = []
        for _ in range(2):
            x, x0_last, t_last = torch.randn(3, 1, 8, 8), None, None
            x_start = x.clone()
            for t, t_prev in zip(ts, ts[1:] + [-1]):
                eps = eps_fn(x, t)
                if sampler == "ddim":
                    x = sched.ddim_step(x, x0_from(sched, x, eps, t), t, t_prev, eta=0.0)
                else:
                    x0_pred = sched.predict_x0(x, eps, t)
                    x = sched.dpm_solver_pp_step(x, x0_pred, t, t_prev, x0_last, t_last)
                    x0_last, t_last = x0_pred, t
            outs.append((x_start, x))
        assert torch.allclose(outs[0][1], x0.expand(3, -1, -1, -1), atol=1e-3), sampler
    # deterministic: the same start gives the same end
    x = outs[0][0]
    y = [sched.ddim_step(x, x0_from(sched, x, eps_fn(x, ts[0]), ts[0]), ts[0], (ts[1:] + [-1])[0], eta=0.0)
         for _ in range(2)]
    assert torch.equal(y[0], y[1])


def test_dpm_solver_second_order_differs_from_first_order(sched):
    """The multistep correction is actually applied when a previous x0 exists."""
    x_t, x0, x0_last = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
    first = sched.dpm_solver_pp_step(x_t, x0, 500, 400)
    second = sched.dpm_solver_pp_step(x_t, x0, 500, 400, x0_last, 600)
    assert not torch.allclose(first, second)
    # first order DPM-Solver++ is DDIM with eta = 0 (Lu et al. 2022, sec. 4)
    assert torch.allclose(first, sched.ddim_step(x_t, x0, 500, 400, eta=0.0), atol=1e-5)


@pytest.mark.parametrize("t", [0, 10, 999])
def test_last_step_returns_x0_prediction_without_noise(sched, t):
    x_t, eps, z = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4) * 100
    x0 = sched.predict_x0(x_t, eps, t).clamp(-1, 1)
    assert torch.allclose(sched.ddpm_step(x_t, x0, t, -1, z), x0, atol=1e-5)
    assert torch.allclose(sched.ddim_step(x_t, x0, t, -1, eta=1.0, noise=z), x0, atol=1e-5)
    assert torch.equal(sched.dpm_solver_pp_step(x_t, x0, t, -1, torch.randn_like(x0), t + 1), x0)


@pytest.mark.parametrize("num_timesteps", [1000, 17])
def test_timestep_lists(num_timesteps):
    for n in range(1, num_timesteps + 1):
        ts = timestep_list(num_timesteps, n)
        assert len(ts) == n and ts[0] == num_timesteps - 1
        assert all(a > b for a, b in zip(ts, ts[1:]))
        assert n == 1 or ts[-1] == 0
        assert all(0 <= t < num_timesteps for t in ts)
    assert timestep_list(num_timesteps, num_timesteps) == list(range(num_timesteps - 1, -1, -1))
    with pytest.raises(ValueError):
        timestep_list(num_timesteps, num_timesteps + 1)


def test_buffers_follow_the_module_device(sched):
    assert all(b.dtype == torch.float32 for b in sched.buffers())
    assert sched.state_dict() == {}  # derived from the config, never stored in checkpoints


# --- whole trajectories against float64 references written from the papers ---------------------

def imperfect_eps(x, t):
    """A deterministic predictor that is not any true eps: a reverse step that mixes up its terms
    gives another trajectory."""
    return 0.5 * torch.tanh(x) + 0.2 * math.cos(t / 97)


def ref_abar(T=1000):
    """abar_t of the linear schedule, float64, with abar(-1) = 1 (clean data)."""
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0).tolist()
    return lambda t: 1.0 if t < 0 else abar[t]


def ref_ddpm(x, eps, a_t, a_s, z):
    """DDPM eq. 11 between t and s (respaced: alpha = abar_t / abar_s, beta = 1 - alpha), sigma^2 = beta~."""
    alpha = a_t / a_s
    beta = 1 - alpha
    var = (1 - a_s) / (1 - a_t) * beta
    return (x - beta / math.sqrt(1 - a_t) * eps) / math.sqrt(alpha) + math.sqrt(var) * z


def ref_ddim(x, eps, a_t, a_s, z, eta):
    """DDIM eq. 12, with sigma of eq. 16."""
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    sigma = eta * math.sqrt((1 - a_s) / (1 - a_t)) * math.sqrt(1 - a_t / a_s)
    return math.sqrt(a_s) * x0 + math.sqrt(1 - a_s - sigma**2) * eps + sigma * z


def ref_dpm_solver_pp(ts, x, abar):
    """DPM-Solver++(2M), Lu et al. 2022, Algorithm 2, with alpha = sqrt(abar), sigma = sqrt(1 - abar),
    lambda = log(alpha / sigma); the last step, to the clean data (sigma = 0), returns the data prediction."""
    lam = lambda t: 0.5 * math.log(abar(t) / (1 - abar(t)))  # noqa: E731
    out, x0_prev, h_prev = [], None, None
    for t, s in zip(ts, ts[1:] + [-1]):
        x0 = (x - math.sqrt(1 - abar(t)) * imperfect_eps(x, t)) / math.sqrt(abar(t))
        if s == -1:
            x = x0
        else:
            h = lam(s) - lam(t)
            d = x0 if x0_prev is None else (1 + 1 / (2 * h_prev / h)) * x0 - 1 / (2 * h_prev / h) * x0_prev
            x = math.sqrt((1 - abar(s)) / (1 - abar(t))) * x - math.sqrt(abar(s)) * math.expm1(-h) * d
            h_prev = h
        x0_prev = x0
        out.append(x)
    return out


def module_trajectory(sched, sampler, ts, x, noises, eta=0.0):
    """x after every step, through samplers.SAMPLERS and the scheduler, with unclipped x0."""
    out, state = [], {}
    for k, (t, s) in enumerate(zip(ts, ts[1:] + [-1])):
        x0 = sched.predict_x0(x, imperfect_eps(x, t), t)
        x = SAMPLERS[sampler](sched, x, x0, t, s, lambda: noises[k], state, eta)
        out.append(x)
    return out


@pytest.mark.parametrize("sampler, eta, steps", [("ddpm", 0.0, 1000), ("ddpm", 0.0, 50), ("ddpm", 0.0, 7),
                                                 ("ddim", 0.0, 50), ("ddim", 1.0, 50), ("ddim", 0.0, 7),
                                                 ("dpm++", 0.0, 20), ("dpm++", 0.0, 7)])
def test_every_step_of_a_trajectory_matches_the_papers_equation(sched, sampler, eta, steps):
    """Float32 steps of the module against float64 steps written here from the papers, compared after
    every step, not only at the end. Tolerance: float32 rounds each of the ~10 operations of a step by
    ~6e-8 relative; over up to 1000 steps that stays far below 1e-4, while a wrong coefficient, variance
    or previous timestep moves the trajectory by 1e-2 or more."""
    g = torch.Generator().manual_seed(0)
    ts = timestep_list(T, steps)
    x_T = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    noises = [torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64) for _ in ts]
    got = module_trajectory(sched, sampler, ts, x_T.float(), [z.float() for z in noises], eta)
    abar = ref_abar()
    if sampler == "dpm++":
        want = ref_dpm_solver_pp(ts, x_T, abar)
    else:
        want, x = [], x_T
        for k, (t, s) in enumerate(zip(ts, ts[1:] + [-1])):
            eps = imperfect_eps(x, t)
            x = ref_ddpm(x, eps, abar(t), abar(s), noises[k]) if sampler == "ddpm" else \
                ref_ddim(x, eps, abar(t), abar(s), noises[k], eta)
            want.append(x)
    for k, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4, msg=lambda m: f"step {k} (t = {ts[k]}): {m}")


@pytest.mark.parametrize("steps", [2, 10, 50])
def test_deterministic_ddim_stays_on_the_line_of_its_noise(sched, steps):
    """With the exact eps of a single data point x0, DDIM (eta 0) keeps eps fixed: every x_t lies on
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps_T, eps_T being the noise of the starting point."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(1, 1, 8, 8, generator=g) * 1.6 - 0.8
    ts = timestep_list(T, steps)
    abar = ref_abar()
    x = torch.randn(3, 1, 8, 8, generator=g)
    eps_T = (x.double() - math.sqrt(abar(ts[0])) * x0.double()) / math.sqrt(1 - abar(ts[0]))
    model = lambda x_t, t, y: sched.eps_from_x0(x_t, x0.expand_as(x_t), t)  # noqa: E731 - the exact eps
    checked = 0
    for (_, _, x_prev), s in zip(sample_loop(model, sched, x, ts, "ddim", noise=None), ts[1:] + [-1]):
        line = math.sqrt(abar(s)) * x0.double() + math.sqrt(1 - abar(s)) * eps_T
        torch.testing.assert_close(x_prev.double(), line, atol=1e-4, rtol=1e-4, msg=lambda m: f"t_prev = {s}: {m}")
        checked += 1
    assert checked == steps
