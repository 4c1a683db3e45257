"""All the diffusion maths: the linear schedule, q(x_t | x_0), the training loss and the reverse steps.

Notation (Ho et al. 2020 = "DDPM", Song et al. 2021 = "DDIM", Lu et al. 2022 = "DPM-Solver++"):

    code                 symbol                          where
    betas[t]             beta_t                          DDPM sec. 2, linear from beta_1 to beta_T
    alphas[t]            alpha_t = 1 - beta_t            DDPM eq. 4
    alpha_bars[t]        abar_t = prod_{s<=t} alpha_s    DDPM eq. 4
    posterior_variance   beta~_t                         DDPM eq. 7
    _half_log_snr64(a)   lambda_t = log(sqrt(abar_t)/sqrt(1-abar_t))  DPM-Solver++ (half log-SNR)

Convention for t: 0-based, t in {0, ..., T-1}; index t here is step t+1 of the
paper. x_0 is the data. "t_prev = -1" means the clean data itself (abar = 1),
so a reverse step from t = 0 to t_prev = -1 adds no noise and returns the
prediction of x_0. Every function takes t (and t_prev) as an int or as a
LongTensor of shape (B,), one timestep per sample.

The scheduler knows nothing about the network: callers pass eps = model(x_t, t) (or x0
predicted from it); diffusion_loss takes the network as a callable. The sampling loop that
strings the steps together is samplers.py.
"""

import torch
from torch import nn


def timestep_list(num_timesteps, num_steps):
    """Evenly spaced sampling timesteps, "trailing": the first is T-1 (pure noise).

    For num_steps >= 2 the list runs from T-1 down to 0, strictly decreasing,
    with exactly num_steps entries; for num_steps == 1 it is [T-1] (one jump
    from pure noise to the x_0 prediction). Each step's previous timestep is the
    next entry of this list (and -1 after the last), never a stride formula.
    """
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"number of sampling steps must be in [1, {num_timesteps}], got {num_steps}")
    if num_steps == 1:
        return [num_timesteps - 1]
    # Spacing (T-1)/(N-1) >= 1, so rounding keeps the list strictly decreasing.
    step = (num_timesteps - 1) / (num_steps - 1)
    return [round(num_timesteps - 1 - i * step) for i in range(num_steps)]


class LinearNoiseScheduler(nn.Module):
    """The linear beta schedule of DDPM; a Module only so its buffers follow .to(device)."""

    def __init__(self, num_timesteps=1000, beta_start=1e-4, beta_end=0.02, prediction="eps"):
        super().__init__()
        self.num_timesteps, self.prediction = num_timesteps, prediction
        # Build in float64 (the cumulative product loses precision in float32), store float32.
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        alpha_bars = torch.cumprod(1.0 - betas, dim=0)
        alpha_bars_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bars[:-1]])
        posterior_variance = betas * (1.0 - alpha_bars_prev) / (1.0 - alpha_bars)  # DDPM eq. 7
        for name, value in [("betas", betas), ("alphas", 1.0 - betas), ("alpha_bars", alpha_bars),
                            ("posterior_variance", posterior_variance)]:
            self.register_buffer(name, value.float(), persistent=False)
        # alpha_bars with abar(-1) = 1 in front, so that t_prev = -1 (clean data) is a plain index;
        # a float64 CPU copy for the reverse-step coefficients (see _abar64).
        self._alpha_bars_ext64 = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bars])
        self.register_buffer("alpha_bars_ext", self._alpha_bars_ext64.float(), persistent=False)

    def _abar(self, t, x):
        """abar_t for t in {-1, ..., T-1}, shaped to broadcast against x (B, C, H, W)."""
        t = torch.as_tensor(t, device=x.device).long()
        a = self.alpha_bars_ext[t + 1]
        return a.reshape(-1, *([1] * (x.dim() - 1))) if a.dim() else a

    def add_noise(self, x0, noise, t):
        """Sample from q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), DDPM eq. 4."""
        a = self._abar(t, x0)
        return a.sqrt() * x0 + (1.0 - a).sqrt() * noise

    def predict_x0(self, x_t, eps, t):
        """x_0 from eps: invert eq. 4, x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        a = self._abar(t, x_t)
        return (x_t - (1.0 - a).sqrt() * eps) / a.sqrt()

    def eps_from_x0(self, x_t, x0, t):
        """eps from x_0, the other way round of predict_x0."""
        a = self._abar(t, x_t)
        return (x_t - a.sqrt() * x0) / (1.0 - a).sqrt()

    def eps_from_output(self, out, x_t, t):
        """eps from the network's output: the output itself for prediction "eps"; for "v"
        (Salimans & Ho 2022, v = sqrt(abar) eps - sqrt(1 - abar) x_0), eps = sqrt(abar) v + sqrt(1 - abar) x_t."""
        if self.prediction == "eps":
            return out
        a = self._abar(t, x_t)
        return a.sqrt() * out + (1.0 - a).sqrt() * x_t

    def target(self, x0, noise, t):
        """What the network learns to output: eps, or v = sqrt(abar) eps - sqrt(1 - abar) x_0."""
        if self.prediction == "eps":
            return noise
        a = self._abar(t, x0)
        return a.sqrt() * noise - (1.0 - a).sqrt() * x0

    def snr(self, t):
        """Signal-to-noise ratio abar_t / (1 - abar_t) of each timestep (for Min-SNR weighting)."""
        a = self.alpha_bars[torch.as_tensor(t, device=self.alpha_bars.device).long()]
        return a / (1.0 - a)

    def _abar64(self, t, x):
        """abar_t in float64 on the CPU, shaped for x. The reverse steps use ratios such as
        1 - abar_t / abar_prev ~ 1e-4, which float32 would get wrong in the third digit."""
        t = torch.as_tensor(t).long().cpu()
        a = self._alpha_bars_ext64[t + 1]
        return a.reshape(-1, *([1] * (x.dim() - 1))) if a.dim() else a

    @staticmethod
    def _to(x, *coefs):
        return [c.to(device=x.device, dtype=x.dtype) for c in coefs]

    # The three reverse steps share one shape: step(x_t, x0, t, t_prev, ...) -> x_{t_prev}, where x0 is
    # the caller's prediction of x_0 at t (clipped to [-1, 1] by the sampling loop).

    def ddpm_step(self, x_t, x0, t, t_prev, noise):
        """Ancestral step: sample x_{t_prev} from the posterior q(x_{t_prev} | x_t, x_0 = x0).

        With t_prev = t - 1 this is DDPM eq. 11 with sigma_t^2 = beta~_t (eq. 7):
        mean = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t), written here in
        the equivalent form of eq. 7, mu~ = c0 x0 + ct x_t, so that x0 can be clipped.
        With t_prev < t - 1 (respaced sampling) the same posterior uses the effective
        beta = 1 - abar_t / abar_{t_prev}. At t_prev = -1 the variance is 0 and the result is x0.
        """
        a_t, a_prev = self._abar64(t, x_t), self._abar64(t_prev, x_t)
        beta = 1.0 - a_t / a_prev
        c0, ct, std = self._to(x_t, a_prev.sqrt() * beta / (1.0 - a_t),
                               (1.0 - beta).sqrt() * (1.0 - a_prev) / (1.0 - a_t),
                               (beta * (1.0 - a_prev) / (1.0 - a_t)).sqrt())
        return c0 * x0 + ct * x_t + std * noise

    def _ddim_sigma64(self, a_t, a_prev, eta):
        return eta * ((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)).sqrt()

    def ddim_sigma(self, t, t_prev, eta, like):
        """sigma of DDIM eq. 16: eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev)."""
        return self._to(like, self._ddim_sigma64(self._abar64(t, like), self._abar64(t_prev, like), eta))[0]

    def ddim_step(self, x_t, x0, t, t_prev, eta=0.0, noise=None):
        """DDIM eq. 12: x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z,
        with eps the one consistent with x0 (eq. 9 solved for eps).

        eta = 0 is deterministic; eta = 1 gives the DDPM posterior variance. noise (z)
        may be None only when eta == 0.
        """
        a_t, a_prev = self._abar64(t, x_t), self._abar64(t_prev, x_t)
        sigma = self._ddim_sigma64(a_t, a_prev, eta)
        c0, ce, sigma = self._to(x_t, a_prev.sqrt(), (1.0 - a_prev - sigma**2).clamp(min=0.0).sqrt(), sigma)
        x_prev = c0 * x0 + ce * self.eps_from_x0(x_t, x0, t)
        return x_prev if eta == 0 else x_prev + sigma * noise

    def _half_log_snr64(self, a):
        """lambda = log(alpha / sigma) with alpha = sqrt(abar), sigma = sqrt(1 - abar)."""
        return 0.5 * (torch.log(a) - torch.log1p(-a))

    def dpm_solver_pp_step(self, x_t, x0, t, t_prev, x0_last=None, t_last=None):
        """One DPM-Solver++(2M) step (Lu et al. 2022, Algorithm 2) from t to t_prev.

        x0 is the data prediction at t; x0_last the one at the previous (larger) timestep
        t_last, or None on the first step (then the step is first order, DPM-Solver++1,
        which equals DDIM with eta = 0). With h = lambda_prev - lambda_t:
            x_prev = (sigma_prev / sigma_t) x_t - alpha_prev (exp(-h) - 1) D,
            D = (1 + 1/(2r)) x0 - 1/(2r) x0_last,  r = h_last / h.
        The final step to t_prev = -1 (sigma = 0, lambda = inf) is first order and
        returns x0 exactly.
        """
        if int(torch.as_tensor(t_prev).max()) == -1:
            return x0
        a_t, a_prev = self._abar64(t, x_t), self._abar64(t_prev, x_t)
        lam_t, lam_prev = self._half_log_snr64(a_t), self._half_log_snr64(a_prev)
        h = lam_prev - lam_t
        cx, cd = self._to(x_t, ((1.0 - a_prev) / (1.0 - a_t)).sqrt(), -a_prev.sqrt() * torch.expm1(-h))
        d = x0
        if x0_last is not None:
            r = (lam_t - self._half_log_snr64(self._abar64(t_last, x_t))) / h
            c1, c2 = self._to(x_t, 1.0 + 0.5 / r, 0.5 / r)
            d = c1 * x0 - c2 * x0_last
        return cx * x_t + cd * d


def guided_eps(eps_cond, eps_uncond, w):
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): eps = eps_uncond + w (eps_cond - eps_uncond).

    w = 1 is plain conditional sampling, w = 0 unconditional, w > 1 sharper and less diverse.
    (The paper writes (1 + w') eps_cond - w' eps_uncond; our w is their 1 + w'.)
    """
    return eps_uncond + w * (eps_cond - eps_uncond)


def min_snr_weight(snr, gamma):
    """Min-SNR-gamma loss weight for eps-prediction (Hang et al. 2023): min(SNR, gamma) / SNR."""
    return torch.clamp(snr, max=gamma) / snr



def sample_timesteps(n, num_timesteps, t_cfg, device):
    """Training timesteps: uniform over 0..T-1 (DDPM Algorithm 1), or logit-normal (t/T =
    sigmoid(N(mean, std)), Esser et al. 2024), which puts more of the batch on the middle of the
    chain, where the digit's shape is decided. Logit-normal draws almost no t near 0 (0.7 % of
    the batch below t = 50 at mean -0.5), where the last specks of noise are cleaned up:
    train.uniform_share gives round(share * n) of the batch to the uniform distribution instead.

    With train.stratified_timesteps each part of the batch takes one draw from each 1/m-quantile
    band of its distribution (u_i = (i + U_i) / m pushed through its inverse CDF), the
    low-discrepancy sampler of Kingma et al. 2021 (VDM, appendix): the same distribution, a
    lower-variance loss."""
    lognorm = t_cfg["timestep_sampling"] == "logit_normal"
    n_uniform = round(t_cfg.get("uniform_share", 0.0) * n) if lognorm else n
    parts = [(n_uniform, False), (n - n_uniform, lognorm)]
    return torch.cat([_draw_timesteps(m, num_timesteps, t_cfg, device, logit) for m, logit in parts if m])


def _draw_timesteps(n, num_timesteps, t_cfg, device, lognorm):
    stratified = t_cfg["stratified_timesteps"]
    if not (lognorm or stratified):
        return torch.randint(0, num_timesteps, (n,), device=device)
    if stratified:
        u = (torch.arange(n, device=device) + torch.rand(n, device=device)) / n
    if lognorm:  # z ~ N(0, 1), through the normal's inverse CDF when stratified
        z = torch.special.ndtri(u) if stratified else torch.randn(n, device=device)
        u = torch.sigmoid(z * t_cfg["logit_normal_std"] + t_cfg["logit_normal_mean"])
    return (u * num_timesteps).long().clamp_(0, num_timesteps - 1)


def diffusion_loss(model, scheduler, x0, t, noise, weighting="none", gamma=5.0, y=None):
    """DDPM Algorithm 1: noise x0 to x_t (eq. 4), predict eps, and take the eps MSE of eq. 14 (or the
    MSE of v for prediction "v"). Returns the per-sample losses and their (optionally Min-SNR-weighted)
    batch mean. Min-SNR weights x_0's squared error by min(SNR, gamma) in either parametrisation: the
    eps MSE by min(SNR, gamma) / SNR, the v MSE by min(SNR, gamma) / (SNR + 1)."""
    pred = model(scheduler.add_noise(x0, noise, t), t, y)
    per_sample = (pred.float() - scheduler.target(x0, noise, t)).pow(2).mean(dim=(1, 2, 3))  # float32 under autocast
    weight = 1.0
    if weighting == "min_snr":
        snr = scheduler.snr(t)
        weight = min_snr_weight(snr, gamma) * (snr / (snr + 1) if scheduler.prediction == "v" else 1.0)
    return per_sample, (per_sample * weight).mean()
