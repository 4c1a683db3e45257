"""editing.py: RePaint inpainting, DDIM inversion, slerp, every digit; tiny models, synthetic data."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import editing
import sample
import train
from conftest import randomised
from configuration import ConfigError, load_config, run_cli
from fileio import build
from linear_noise_scheduler import LinearNoiseScheduler, timestep_list
from mnist import MNIST, to_uint8


def tiny_model(tiny_config, *overrides):
    cfg = load_config(tiny_config, list(overrides))
    torch.manual_seed(0)
    model, scheduler = build(cfg)
    return randomised(model).eval(), scheduler


class ExactEps(nn.Module):
    """The exact eps of data that is a single point x0 (one per batch row):
    eps(x_t, t) = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)."""
    num_classes = 0

    def __init__(self, scheduler, x0):
        super().__init__()
        self.scheduler, self.x0 = scheduler, x0

    def forward(self, x, t, y=None):
        return self.scheduler.eps_from_x0(x, self.x0, t)


class GaussianEps(nn.Module):
    """The exact eps of data ~ N(0, var I): E[eps | x_t] = sqrt(1 - abar) x_t / (abar var + 1 - abar)."""
    num_classes = 0

    def __init__(self, scheduler, var):
        super().__init__()
        self.scheduler, self.var = scheduler, var

    def forward(self, x, t, y=None):
        a = self.scheduler._abar(t, x)
        return (1 - a).sqrt() * x / (a * self.var + 1 - a)


class TwoPointEps(nn.Module):
    """The exact eps of data that is +a v or -a v, equally likely (v a fixed pattern of +-1):
    p(+ | x_t) / p(- | x_t) = exp(2 sqrt(abar) a <v, x_t> / (1 - abar)), so
    E[x_0 | x_t] = a v tanh(sqrt(abar) a <v, x_t> / (1 - abar)) and eps = (x_t - sqrt(abar) E[x_0 | x_t]) / sqrt(1 - abar)."""
    num_classes = 0

    def __init__(self, scheduler, v, a):
        super().__init__()
        self.scheduler, self.v, self.a = scheduler, v, a

    def forward(self, x, t, y=None):
        abar = self.scheduler._abar(t, x)
        dot = (x * self.v).flatten(1).sum(1).reshape(-1, 1, 1, 1)
        x0 = self.a * self.v * torch.tanh(abar.sqrt() * self.a * dot / (1 - abar))
        return (x - abar.sqrt() * x0) / (1 - abar).sqrt()


# ---------------------------------------------------------------- inpainting

@pytest.mark.parametrize("sampler,jumps,resample", [("ddpm", 1, 1), ("ddpm", 2, 3), ("ddim", 1, 1),
                                                    ("dpm++", 1, 1)])
def test_known_region_is_preserved_exactly(tiny_config, sampler, jumps, resample):
    model, scheduler = tiny_model(tiny_config)
    images = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
    for name in ["bottom", "center", "random:0.7"]:
        keep = editing.make_mask(name, 28, 1, seed=2)
        out = editing.inpaint(model, scheduler, images, keep, completions=2, sampler=sampler, steps=6,
                              jumps=jumps, resample=resample, progress=False)
        assert out.shape == (3, 2, 1, 28, 28)
        known = (keep > 0.5).expand(3, 2, 1, 28, 28)
        assert torch.equal(out[known], images[:, None].expand_as(out)[known])
        assert not torch.allclose(out[~known], images[:, None].expand_as(out)[~known], atol=0.05)  # filled in
        assert not torch.equal(out[:, 0], out[:, 1])  # two completions, two draws
    # Completion c of image i depends on (seed, i, c) only: the same from a smaller batch.
    again = editing.inpaint(model, scheduler, images[1:2], keep, completions=2, sampler=sampler, steps=6,
                            jumps=jumps, resample=resample, progress=False, batch_size=1, first_index=1)
    assert torch.allclose(again[0], out[1], atol=1e-5)  # up to the network's batch-size-dependent rounding


@pytest.mark.parametrize("sampler,jumps,resample", [("ddpm", 1, 1), ("ddpm", 5, 3), ("ddim", 1, 1)])
def test_repaint_completes_the_mixture_component_that_the_known_half_shows(sampler, jumps, resample):
    """Data +a v or -a v with their exact eps: given the top half of one, RePaint fills the bottom with the
    same one; with nothing known (all that is left without the injection of q(x_t | x_0) into the known
    region) it draws either, about half the time each."""
    scheduler = LinearNoiseScheduler()
    v = torch.randint(0, 2, (1, 8, 8), generator=torch.Generator().manual_seed(0)).float() * 2 - 1
    model, images = TwoPointEps(scheduler, v, 0.8), torch.stack([0.8 * v, -0.8 * v])
    kw = dict(completions=24, sampler=sampler, steps=20, jumps=jumps, resample=resample, progress=False)
    hole = editing.make_mask("bottom", 8)[0] < 0.5
    plus = {}
    for known in ["bottom", "none"]:
        keep = editing.make_mask(known, 8) if known != "none" else torch.zeros(1, 8, 8)
        out = editing.inpaint(model, scheduler, images, keep, **kw)[..., hole]  # (2, 24, 1, 32)
        assert torch.allclose(out.abs(), torch.full_like(out, 0.8), atol=0.01)  # one of the two points
        plus[known] = (out * v[..., hole]).sum(-1)[..., 0] > 0  # (2, 24): filled with +a v
    agrees = plus["bottom"][0].sum() + (~plus["bottom"][1]).sum()
    assert agrees >= 45, agrees  # of 48
    assert 12 <= plus["none"].sum() <= 36, plus["none"].sum()


SCHEDULE_GRID = [(n, j, r) for n in [1, 2, 5, 6, 10, 25] for j in [1, 2, 3, 5] for r in [1, 2, 3] if r == 1 or j < n]


def papers_schedule(n, jumps, resample):
    """RePaint's schedule (Lugmayr et al. 2022, sec. 4.2) restated by stretches: the last noisy
    position n - 1, and every `jumps` positions before it down to `jumps`, ends a stretch of `jumps`
    steps, walked down, back up and down again until walked down `resample` times; the steps before
    the first stretch and the final step to the clean image n are walked once."""
    stretches = (n - 1) // jumps if resample > 1 else 0
    first = n - 1 - stretches * jumps
    path = list(range(first + 1))
    for s in range(first, n - 1, jumps):
        down, up = list(range(s + 1, s + jumps + 1)), list(range(s + jumps - 1, s - 1, -1))
        path += (down + up) * (resample - 1) + down
    return path + [n]


def algorithm_1(n, resample):
    """The paper's Algorithm 1 (jumps of one step) in positions (paper step t is position n - t): for
    t = T..1, U reverse steps to t - 1, each but the last followed by a forward step back to t, except
    at t = 1, whose U passes repeat one noise-free step."""
    path = [0]
    for t in range(n, 0, -1):
        for u in range(1, (resample if t > 1 else 1) + 1):
            path.append(n - t + 1)
            if u < resample and t > 1:
                path.append(n - t)
    return path


def test_masks():
    keep = editing.make_mask("bottom")
    assert keep.shape == (1, 28, 28) and keep[:, :14].eq(1).all() and keep[:, 14:].eq(0).all()
    assert editing.make_mask("left")[:, :, :14].eq(0).all() and editing.make_mask("left")[:, :, 14:].eq(1).all()
    assert editing.make_mask("center").sum() == 28 * 28 - 14 * 14
    assert abs(editing.make_mask("random:0.8", seed=0).mean().item() - 0.2) < 0.05


def test_repaint_schedule_is_the_papers():
    assert editing.repaint_schedule(4) == [0, 1, 2, 3, 4]
    # Jump points 5 and 3 (counted back from the last noisy position, 5): the stretches 3-5 and 1-3 twice.
    assert editing.repaint_schedule(6, 2, 2) == [0, 1, 2, 3, 2, 1, 2, 3, 4, 5, 4, 3, 4, 5, 6]
    for n, j, r in SCHEDULE_GRID:
        path = editing.repaint_schedule(n, j, r)
        assert path == papers_schedule(n, j, r), (n, j, r)
        if j == 1:
            assert path == algorithm_1(n, r), (n, r)


@pytest.mark.parametrize("schedule", ["clean_end", "noisy_end"])
def test_repaint_schedule_walks_each_resampled_step_resample_times(schedule):
    for n, j, r in SCHEDULE_GRID:
        path = editing.repaint_schedule(n, j, r, schedule)
        assert path[0] == 0 and path[-1] == n and min(path) == 0 and max(path) == n
        assert all(abs(b - a) == 1 for a, b in zip(path, path[1:]))
        stretches = (n - 1) // j if r > 1 else 0
        # The resampled steps k -> k + 1: next to the clean end (all but the final step), or to the noise.
        resampled = range(n - 1 - stretches * j, n - 1) if schedule == "clean_end" else range(stretches * j)
        down = [a for a, b in zip(path, path[1:]) if b == a + 1]
        assert all(down.count(k) == (r if k in resampled else 1) for k in range(n)), (n, j, r)
        assert editing.network_steps(n, j, r, schedule) == len(down) == n + (r - 1) * j * stretches


def test_noisy_end_schedule_resamples_the_stretches_next_to_the_noise():
    assert editing.repaint_schedule(5, 2, 2, "noisy_end") == [0, 1, 2, 1, 0, 1, 2, 3, 4, 3, 2, 3, 4, 5]
    assert editing.repaint_schedule(6, 2, 2, "noisy_end") == [0, 1, 2, 1, 0, 1, 2, 3, 4, 3, 2, 3, 4, 5, 6]


def test_forward_step_draws_from_q_of_the_later_timestep_given_the_earlier():
    """From a known x at t_from: x_to ~ N(sqrt(abar_to / abar_from) x, 1 - abar_to / abar_from). At
    t_from = 300 that is far from sqrt(abar_to) x, what noising x as if it were clean would give."""
    scheduler = LinearNoiseScheduler()
    n = 40000
    x = torch.tensor([-1.5, -0.5, 0.0, 0.7, 2.0]).repeat(n, 1).reshape(n, 1, 1, 5)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    for t_from, t_to in [(-1, 200), (300, 500), (50, 51)]:
        ratio = (scheduler.alpha_bars[t_to] / (1.0 if t_from == -1 else scheduler.alpha_bars[t_from])).item()
        x_to = editing.forward_step(scheduler, x, t_from, t_to, noise)
        mean, var = x_to.mean(0).flatten(), x_to.var(0).flatten()
        se = math.sqrt((1 - ratio) / n)  # of the mean; that of the variance is (1 - ratio) sqrt(2 / n)
        assert torch.allclose(mean, math.sqrt(ratio) * x[0].flatten(), rtol=0, atol=5 * se), (t_from, mean)
        assert torch.allclose(var, torch.full_like(var, 1 - ratio), rtol=5 * math.sqrt(2 / n), atol=0), (t_from, var)

# ---------------------------------------------------------------- encoding, interpolation

def test_ddim_inversion_of_a_single_data_point_is_exact():
    """Data that is one point x0: its exact eps is constant along the ODE, so the encoding is
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) e at every t, e the eps at (x0, timesteps[-1]),
    (1 - sqrt(abar)) x0 / sqrt(1 - abar). (Decoding cannot check it: this model's x0 prediction is x0
    from anywhere.) In float64, so that 1 - sqrt(abar) ~ 5e-5 keeps its digits; the coefficients are
    the scheduler's float32 ones."""
    scheduler = LinearNoiseScheduler()
    x0 = (torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8).double()
    model = ExactEps(scheduler, x0)
    ts = timestep_list(1000, 20)
    x_T, path = editing.ddim_encode(model, scheduler, x0, ts, return_path=True)
    assert len(path) == len(ts) and path[-1] is x_T

    def coefs(t):
        a = scheduler.alpha_bars[t]
        return a.sqrt().double(), (1 - a).sqrt().double()

    c0, c1 = coefs(ts[-1])
    e = (1 - c0) * x0 / c1
    for t, x_t in zip(reversed(ts), path):
        c0, c1 = coefs(t)
        assert torch.allclose(x_t, c0 * x0 + c1 * e, rtol=0, atol=1e-12), t


def test_ddim_round_trip_of_gaussian_data_improves_with_steps():
    """Exact eps of Gaussian data: encode then decode returns the input, the closer the more steps."""
    scheduler = LinearNoiseScheduler()
    model = GaussianEps(scheduler, 0.04)
    x0 = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.2
    err = {}
    for n in [20, 200]:
        ts = timestep_list(1000, n)
        x_T = editing.ddim_encode(model, scheduler, x0, ts)
        err[n] = editing.round_trip_error(x0, editing.ddim_decode(model, scheduler, x_T, ts))
    assert 0.85 < x_T.std().item() < 1.15  # the exact flow takes N(0, 0.04 I) to N(0, I)
    assert err[20][0] < 0.12 and err[200][0] < 0.015 and err[200][1] < 0.06 and err[200][0] < err[20][0] / 4


def test_slerp_end_points_and_norm():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(1, 28, 28, generator=g), torch.randn(1, 28, 28, generator=g)
    assert torch.equal(editing.slerp(z0, z1, 0.0), z0) and torch.equal(editing.slerp(z0, z1, 1.0), z1)
    z1 = z1 * z0.norm() / z1.norm()  # equal norms: slerp keeps the norm all the way, the straight line does not
    for alpha in [0.25, 0.5, 0.8]:
        assert abs(editing.slerp(z0, z1, alpha).norm().item() / z0.norm().item() - 1) < 1e-5
    assert (z0 + z1).norm() / 2 < 0.8 * z0.norm()  # what linear interpolation would give at 0.5
    # Orthogonal unit vectors: the midpoint is their sum / sqrt(2).
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(editing.slerp(a, b, 0.5), torch.tensor([1.0, 1.0]) / math.sqrt(2), atol=1e-6)


# ---------------------------------------------------------------- conditional models

def test_every_digit_keeps_the_noise_and_changes_the_label(tiny_config):
    model, scheduler = tiny_model(tiny_config, "model.num_classes=10")
    kw = dict(seed=3, sampler="ddpm", steps=4, progress=False)
    out = editing.every_digit(model, scheduler, 2, **kw)
    assert out.shape == (20, 1, 28, 28)
    assert not torch.allclose(out[0], out[1], atol=1e-3)  # the label reaches the image
    with torch.no_grad():
        model.label_emb.weight.zero_()  # a model blind to the label: one row, one image ten times
    blind = editing.every_digit(model, scheduler, 2, **kw)
    assert all(torch.equal(blind[i], blind[0]) for i in range(10))
    assert all(torch.equal(blind[i], blind[10]) for i in range(10, 20)) and not torch.equal(blind[0], blind[10])


def test_inpainting_asks_a_conditional_model_for_a_digit(tiny_config):
    model, scheduler = tiny_model(tiny_config, "model.num_classes=10")
    images = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
    keep = editing.make_mask("bottom")
    kw = dict(sampler="ddpm", steps=4, progress=False, guidance=2.0)
    three = editing.inpaint(model, scheduler, images, keep, labels=torch.tensor([3, 3]), **kw)
    five = editing.inpaint(model, scheduler, images, keep, labels=torch.tensor([5, 5]), **kw)
    assert torch.equal(three[:, 0, :, :14], images[:, :, :14]) and not torch.allclose(three, five, atol=1e-3)


def test_editing_asks_for_the_digit_given_or_the_no_label_class(tiny_config):
    model, _ = tiny_model(tiny_config, "model.num_classes=10")
    known = torch.tensor([4, -1])  # a test digit's true label, and a PNG's unknown one
    assert editing.model_labels(model, known).tolist() == [4, 10]
    assert editing.model_labels(model, known, "7").tolist() == [7, 7]
    assert editing.model_labels(model, known, "none").tolist() == [10, 10]  # the null class, whatever the image
    unconditional, _ = tiny_model(tiny_config)
    assert editing.model_labels(unconditional, known, "none") is None


# ---------------------------------------------------------------- errors

def test_bad_inputs_are_one_line_config_errors(tiny_config, tmp_path, mnist_root):
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "big.png")
    cases = [(lambda: editing.make_mask(str(tmp_path / "big.png")), "big.png is 32x32 pixels"),
             (lambda: editing.make_mask("middle"), "unknown mask 'middle'"),
             (lambda: editing.make_mask("random:lots"), "random:P"),
             (lambda: editing.load_images("0,64", mnist_root), "image index 64 is out of range"),
             (lambda: editing.load_images(str(tmp_path / "big.png"), mnist_root), "32x32"),
             (lambda: editing.repaint_schedule(10, 10, 2), "--jumps 10"),
             (lambda: editing.repaint_schedule(10, 2, 2, "middle"), "unknown RePaint schedule 'middle'")]
    for call, message in cases:
        with pytest.raises(ConfigError, match=message) as err:
            call()
        assert "\n" not in str(err.value)

    train.main(["--config", tiny_config])  # an unconditional checkpoint
    base = ["--config", tiny_config, "--data", mnist_root]
    cli = [(["--inpaint", "--digit", "3"], "unconditional"), (["--encode", "--digit", "3"], "unconditional"),
           (["--inpaint", "--digit", "any"], "editing takes one digit"),
           (["--every_digit"], "conditional checkpoint"),
           (["--inpaint", "--mask", str(tmp_path / "big.png")], "32x32"),
           (["--inpaint", "--mask", "nose"], "unknown mask"),
           (["--inpaint", "--images", "100"], "out of range"),
           (["--encode", "--sampler", "ddpm"], "deterministic DDIM"),
           (["--encode", "--eta", "0.5"], "deterministic DDIM"),
           (["--inpaint", "--sampler", "ddim", "--resample", "2", "--jumps", "1"], "needs the stochastic ddpm"),
           (["--encode", "--mask", "top"], "--mask belongs to --inpaint"),
           (["--encode", "--repaint_schedule", "noisy_end"], "--repaint_schedule belongs to --inpaint"),
           (["--interpolate", "0,1", "--digit", "3"], "--digit applies to --inpaint and --encode"),
           (["--inpaint", "--encode"], "pick one")]
    for flags, message in cli:
        with pytest.raises(SystemExit) as err:  # as `python sample.py ...` runs: run_cli, no traceback
            run_cli(lambda: sample.main(base + ([] if "--interpolate" in flags else ["--images", "0"]) + flags),
                    FileNotFoundError)
        text = str(err.value.code)
        assert text.startswith("error: ") and message in text and "\n" not in text, (flags, text)


# ---------------------------------------------------------------- the command line

def test_inpaint_cli_end_to_end(tiny_config, tmp_path, mnist_root, capsys, monkeypatch):
    train.main(["--config", tiny_config])
    out = tmp_path / "inpaint.png"
    sample.main(["--config", tiny_config, "--data", mnist_root, "--inpaint", "--images", "0,5,7", "--mask", "bottom",
                 "--completions", "3", "--sampler", "ddpm", "--jumps", "1", "--resample", "2", "--out", str(out)])
    assert "3 images x 3 completions" in capsys.readouterr().out
    grid = np.array(Image.open(out))
    pad, cell, scale = 2, 28, 2
    assert grid.shape == ((3 * (cell + pad) + pad) * scale, (5 * (cell + pad) + pad) * scale)  # 3 rows of 2 + 3
    test = MNIST(mnist_root, "test").images
    for row, index in enumerate([0, 5, 7]):
        cells = [grid[(pad + row * (cell + pad)) * scale:(pad + row * (cell + pad) + cell) * scale:scale,
                      (pad + col * (cell + pad)) * scale:(pad + col * (cell + pad) + cell) * scale:scale]
                 for col in range(5)]
        truth = test[index].numpy()
        assert np.array_equal(cells[0], truth)  # the original
        assert np.array_equal(cells[1][:14], truth[:14]) and (cells[1][14:] == to_uint8(torch.zeros(1))).all()
        for c in cells[2:]:  # completions: the known half exactly the input's, the other half drawn
            assert np.array_equal(c[:14], truth[:14]) and not np.array_equal(c[14:], truth[14:])
        assert not np.array_equal(cells[2][14:], cells[3][14:])
    # --repaint_schedule reaches the schedule
    asked, real = [], editing.repaint_schedule
    monkeypatch.setattr(editing, "repaint_schedule", lambda *a: asked.append(a) or real(*a))
    sample.main(["--config", tiny_config, "--data", mnist_root, "--inpaint", "--images", "0", "--sampler", "ddpm",
                 "--jumps", "2", "--resample", "2", "--repaint_schedule", "noisy_end", "--out", str(out)])
    assert asked == [(20, 2, 2, "noisy_end")]


def test_encode_interpolate_every_digit_cli(tiny_config, tmp_path, mnist_root, capsys):
    train.main(["--config", tiny_config, "--model.num_classes=10"])
    base = ["--config", tiny_config, "--data", mnist_root]
    sample.main(base + ["--encode", "--images", "1,2", "--steps", "10", "--out", str(tmp_path / "enc.png")])
    printed = capsys.readouterr().out
    assert "round trip: mean abs pixel error" in printed
    assert Image.open(tmp_path / "enc.png").size == ((3 * 30 + 2) * 2, (2 * 30 + 2) * 2)
    latents = torch.load(tmp_path / "enc_latents.pt", weights_only=True)
    assert latents["x_T"].shape == (2, 1, 28, 28) and latents["timesteps"] == timestep_list(20, 10)
    sample.main(base + ["--interpolate", "1,2", "--frames", "5", "--out", str(tmp_path / "lerp.png")])
    assert Image.open(tmp_path / "lerp.png").size == ((7 * 30 + 2) * 2, (1 * 30 + 2) * 2)
    sample.main(base + ["--every_digit", "--num_samples", "20", "--out", str(tmp_path / "digits.png")])
    assert Image.open(tmp_path / "digits.png").size == ((10 * 30 + 2) * 2, (2 * 30 + 2) * 2)
    sample.main(base + ["--every_digit", "--images", "3", "--out", str(tmp_path / "style.png")])
    assert Image.open(tmp_path / "style.png").size == ((11 * 30 + 2) * 2, (1 * 30 + 2) * 2)
    sample.main(base + ["--inpaint", "--digit", "3", "--images", "4", "--completions", "2",
                        "--out", str(tmp_path / "three.png")])
    assert Image.open(tmp_path / "three.png").size == ((4 * 30 + 2) * 2, (1 * 30 + 2) * 2)
