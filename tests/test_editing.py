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
from configuration import ConfigError, load_config, run_cli
from fileio import build
from linear_noise_scheduler import LinearNoiseScheduler, timestep_list
from mnist import MNIST, to_uint8


def tiny_model(tiny_config, *overrides):
    cfg = load_config(tiny_config, list(overrides))
    torch.manual_seed(0)
    model, scheduler = build(cfg)
    return model.eval(), scheduler


class ExactEps(nn.Module):
    """The exact eps of data that is a single point x0 (one per batch row):
    eps(x_t, t) = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)."""
    num_classes = 0

    def __init__(self, scheduler, x0):
        super().__init__()
        self.scheduler, self.x0 = scheduler, x0

    def forward(self, x, t, y=None):
        return self.scheduler.predict_eps(x, self.x0, t)


class GaussianEps(nn.Module):
    """The exact eps of data ~ N(0, var I): E[eps | x_t] = sqrt(1 - abar) x_t / (abar var + 1 - abar)."""
    num_classes = 0

    def __init__(self, scheduler, var):
        super().__init__()
        self.scheduler, self.var = scheduler, var

    def forward(self, x, t, y=None):
        a = self.scheduler._abar(t, x)
        return (1 - a).sqrt() * x / (a * self.var + 1 - a)


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


def test_masks_and_resampling_schedule():
    keep = editing.make_mask("bottom")
    assert keep.shape == (1, 28, 28) and keep[:, :14].eq(1).all() and keep[:, 14:].eq(0).all()
    assert editing.make_mask("left")[:, :, :14].eq(0).all() and editing.make_mask("left")[:, :, 14:].eq(1).all()
    assert editing.make_mask("center").sum() == 28 * 28 - 14 * 14
    assert abs(editing.make_mask("random:0.8", seed=0).mean().item() - 0.2) < 0.05
    assert editing.repaint_schedule(4) == [0, 1, 2, 3, 4]
    # Every j = 2 steps, back up 2 and down again, r - 1 = 1 more time: each stretch twice.
    assert editing.repaint_schedule(5, 2, 2) == [0, 1, 2, 1, 0, 1, 2, 3, 4, 3, 2, 3, 4, 5]
    path = editing.repaint_schedule(25, 5, 3)
    assert all(abs(b - a) == 1 for a, b in zip(path, path[1:])) and path[-1] == 25
    assert editing.network_steps(25, 5, 3) == 25 + 2 * 5 * 4


def test_forward_step_has_the_marginals_of_q():
    """Down-stepping from t to t_prev and back up by forward_step keeps q(x_t | x_0) = N(sqrt(abar) x0, 1 - abar)."""
    scheduler = LinearNoiseScheduler()
    x0 = torch.full((20000, 1, 1, 1), 0.5)
    x_lo = scheduler.add_noise(x0, torch.randn_like(x0), 300)
    x_hi = editing.forward_step(scheduler, x_lo, 300, 700, torch.randn_like(x0))
    a = scheduler.alpha_bars[700].item()
    assert abs(x_hi.mean().item() - math.sqrt(a) * 0.5) < 0.02
    assert abs(x_hi.var().item() - (1 - a)) < 0.02


# ---------------------------------------------------------------- encoding, interpolation

def test_ddim_inversion_of_a_single_data_point_is_exact():
    scheduler = LinearNoiseScheduler()
    x0 = torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    model = ExactEps(scheduler, x0)
    ts = timestep_list(1000, 20)
    x_T, path = editing.ddim_encode(model, scheduler, x0, ts, return_path=True)
    assert len(path) == len(ts) and path[-1] is x_T
    # Every x_t lies on the line sqrt(abar_t) x0 + sqrt(1 - abar_t) e of one e: the first step's eps.
    e = model(x0, torch.full((3,), ts[-1]))
    for t, x_t in zip(reversed(ts), path):
        a = scheduler.alpha_bars[t].double()
        e_t = (x_t.double() - a.sqrt() * x0.double()) / (1 - a).sqrt()  # the eps that puts x_t on the line
        assert torch.allclose(e_t, e.double(), rtol=1e-2, atol=1e-5), t
    assert torch.allclose(editing.ddim_decode(model, scheduler, x_T, ts), x0, atol=1e-5)


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


# ---------------------------------------------------------------- errors

def test_bad_inputs_are_one_line_config_errors(tiny_config, tmp_path, mnist_root):
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "big.png")
    cases = [(lambda: editing.make_mask(str(tmp_path / "big.png")), "big.png is 32x32 pixels"),
             (lambda: editing.make_mask("middle"), "unknown mask 'middle'"),
             (lambda: editing.make_mask("random:lots"), "random:P"),
             (lambda: editing.load_images("0,64", mnist_root), "image index 64 is out of range"),
             (lambda: editing.load_images(str(tmp_path / "big.png"), mnist_root), "32x32"),
             (lambda: editing.repaint_schedule(10, 10, 2), "--jumps 10")]
    for call, message in cases:
        with pytest.raises(ConfigError, match=message) as err:
            call()
        assert "\n" not in str(err.value)

    train.main(["--config", tiny_config])  # an unconditional checkpoint
    base = ["--config", tiny_config, "--data", mnist_root]
    cli = [(["--inpaint", "--digit", "3"], "unconditional"), (["--encode", "--digit", "3"], "unconditional"),
           (["--every_digit"], "conditional checkpoint"),
           (["--inpaint", "--mask", str(tmp_path / "big.png")], "32x32"),
           (["--inpaint", "--mask", "nose"], "unknown mask"),
           (["--inpaint", "--images", "100"], "out of range"),
           (["--encode", "--sampler", "ddpm"], "deterministic DDIM"),
           (["--encode", "--eta", "0.5"], "deterministic DDIM"),
           (["--inpaint", "--sampler", "ddim", "--resample", "2", "--jumps", "1"], "needs the stochastic ddpm"),
           (["--encode", "--mask", "top"], "--mask belongs to --inpaint"),
           (["--interpolate", "0,1", "--digit", "3"], "--digit applies to --inpaint and --encode"),
           (["--inpaint", "--encode"], "pick one")]
    for flags, message in cli:
        with pytest.raises(SystemExit) as err:  # as `python sample.py ...` runs: run_cli, no traceback
            run_cli(lambda: sample.main(base + ([] if "--interpolate" in flags else ["--images", "0"]) + flags),
                    FileNotFoundError)
        text = str(err.value.code)
        assert text.startswith("error: ") and message in text and "\n" not in text, (flags, text)


# ---------------------------------------------------------------- the command line

def test_inpaint_cli_end_to_end(tiny_config, tmp_path, mnist_root, capsys):
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
