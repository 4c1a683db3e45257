"""Class-conditional generation with classifier-free guidance."""

import os

import pytest
import torch
import yaml

import sample
import train
import train_util
from conftest import randomised
from configuration import ConfigError, load_config
from fileio import build
from linear_noise_scheduler import guided_eps
from samplers import generate, guided_output


def test_guidance_weights_one_and_zero():
    eps_c, eps_u = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    assert torch.allclose(guided_eps(eps_c, eps_u, 1.0), eps_c, atol=1e-6)
    assert torch.equal(guided_eps(eps_c, eps_u, 0.0), eps_u)
    assert torch.allclose(guided_eps(eps_c, eps_u, 3.0), 3 * eps_c - 2 * eps_u, atol=1e-6)


def conditional_model(tiny_config):
    cfg = load_config(tiny_config, ["model.num_classes=10"])
    torch.manual_seed(0)
    model, scheduler = build(cfg)
    return randomised(model).eval(), scheduler


def test_guided_prediction_uses_one_batched_call(tiny_config):
    model, _ = conditional_model(tiny_config)
    calls = []
    model.register_forward_hook(lambda m, args, out: calls.append(len(args[0])))
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([7, 7, 1, 0])
    with torch.no_grad():
        eps_w = guided_output(model, x, 5, y, 2.5)
        t = torch.full((4,), 5)
        eps_c, eps_u = model(x, t, y), model(x, t, torch.full_like(y, 10))
    assert calls[0] == 8  # both branches in one call of twice the batch
    assert torch.allclose(eps_w, eps_u + 2.5 * (eps_c - eps_u), atol=1e-5)
    assert torch.allclose(guided_output(model, x, 5, y, 1.0), eps_c, atol=1e-6)
    assert torch.allclose(guided_output(model, x, 5, y, 0.0), eps_u, atol=1e-5)
    assert not torch.allclose(eps_c, eps_u)  # the label actually reaches the output


def test_label_dropout_rate_and_null_class():
    torch.manual_seed(0)
    y = torch.randint(0, 10, (20000,))
    dropped = train_util.drop_labels(y, 0.1, 10)
    changed = dropped != y
    assert abs(changed.float().mean().item() - 0.1) < 0.01
    assert torch.all(dropped[changed] == 10)  # a dropped label is "no label", never another digit
    assert torch.equal(dropped[~changed], y[~changed])
    assert torch.equal(train_util.drop_labels(y, 0.0, 10), y)


def test_conditional_model_trains_and_samples_end_to_end(tiny_config, tmp_path):
    cfg = yaml.safe_load(open(tiny_config))
    cfg["model"]["num_classes"] = 10
    cfg["sample"]["guidance"] = 2.0
    path = tmp_path / "cond.yaml"
    path.write_text(yaml.safe_dump(cfg))
    train.main(["--config", str(path), "--val", "True"])
    out = cfg["train"]["out_dir"]
    for sampler in ["ddpm", "ddim", "dpm++"]:
        sample.main(["--config", str(path), "--digit", "7", "--num_samples", "3", "--sampler", sampler,
                     "--steps", "3"])
    sample.main(["--config", str(path), "--num_samples", "20", "--steps", "2"])  # one row per digit
    assert os.path.exists(os.path.join(out, "samples_ddim_2_w2.png"))
    assert os.path.exists(os.path.join(out, "samples_dpmpp_3_w2_digit7.png"))


def test_unconditional_checkpoint_refuses_digit(tiny_config):
    train.main(["--config", tiny_config, "--train.steps=3"])
    with pytest.raises(ConfigError, match="unconditional"):
        sample.main(["--config", tiny_config, "--digit", "3"])


def test_conditional_samples_are_reproducible(tiny_config):
    model, scheduler = conditional_model(tiny_config)
    labels = torch.tensor([3, 1, 4, 1, 5])
    kw = dict(seed=1, sampler="ddpm", steps=4, guidance=3.0, progress=False)
    a = generate(model, scheduler, 5, batch_size=5, labels=labels, **kw)
    b = generate(model, scheduler, 5, batch_size=2, labels=labels, **kw)
    assert torch.allclose(a, b, atol=1e-5)
