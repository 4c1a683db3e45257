"""Class-conditional generation with classifier-free guidance."""

import os

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import sample
import train
import train_util
from conftest import randomised, synthetic_digits
from configuration import ConfigError, load_config
from fileio import build, load_model
from linear_noise_scheduler import guided_eps
from samplers import draw_labels, generate, guided_output, requested_labels


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


def test_drawn_labels_follow_the_frequencies_and_depend_only_on_seed_and_index():
    counts = torch.tensor([1, 0, 3, 0, 0, 0, 0, 0, 0, 6])
    labels = draw_labels(counts, 20000, seed=4)
    share = torch.bincount(labels, minlength=10).double() / len(labels)
    assert torch.allclose(share, counts.double() / 10, atol=0.015)  # 3 standard errors at 20,000 draws
    assert torch.equal(draw_labels(counts, 7, seed=4), labels[:7])  # label i does not depend on how many
    assert not torch.equal(draw_labels(counts, 200, seed=5), labels[:200])


def labelled_run(tiny_config, tmp_path):
    cfg = yaml.safe_load(open(tiny_config))
    cfg["model"]["num_classes"] = 10
    path = tmp_path / "labelled.yaml"
    path.write_text(yaml.safe_dump(cfg))
    train.main(["--config", str(path)])
    return str(path), cfg["train"]["out_dir"]


def test_any_digit_samples_the_training_label_mix_and_none_the_null_class(tiny_config, tmp_path, mnist_root):
    path, out = labelled_run(tiny_config, tmp_path)
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    train_labels = synthetic_digits(256, 0)[1][:256 - 256 // 12]  # the training split: all but the last twelfth
    assert ckpt["label_counts"].tolist() == np.bincount(train_labels, minlength=10).tolist()

    model, scheduler, _ = load_model(os.path.join(out, "last.pt"))
    asked = []
    model.register_forward_hook(lambda m, args, o: asked.append(args[2]))
    kw = dict(seed=3, sampler="ddim", steps=2, progress=False)
    labels, _ = requested_labels("any", 40, 10, ckpt["label_counts"], seed=3)
    assert torch.equal(labels, draw_labels(ckpt["label_counts"], 40, seed=3))
    generate(model, scheduler, 40, labels=labels, batch_size=40, **kw)
    assert torch.equal(asked[0], labels)  # the network is asked for the drawn digits
    asked.clear()
    none, _ = requested_labels("none", 40, 10, seed=3)
    generate(model, scheduler, 4, labels=none, **kw)
    assert none is None and asked[0] is None  # the UNet reads no labels as its "no label" class

    for digit, name in [("any", "samples_ddim_4_w1_digitany.png"), ("none", "samples_ddim_4_digitnone.png")]:
        sample.main(["--config", path, "--digit", digit, "--num_samples", "5", "--save_images",
                     str(tmp_path / digit)])
        assert os.path.exists(os.path.join(out, name))  # no guidance weight in the name without labels
    sample.main(["--config", path, "--digit", "any", "--num_samples", "2", "--save_images", str(tmp_path / "two")])
    for i in range(2):  # image i depends only on the seed and i, its drawn digit included
        assert np.array_equal(np.array(Image.open(tmp_path / "two" / f"{i:05d}.png")),
                              np.array(Image.open(tmp_path / "any" / f"{i:05d}.png")))


def test_digit_requests_a_model_cannot_serve_are_refused(tiny_config, tmp_path):
    assert requested_labels("any", 5, 0) == (None, None)  # an unconditional model: its p(x) either way
    assert requested_labels("none", 5, 0) == (None, None)
    for digit, msg in [("3", "unconditional"), ("seven", "a digit such as 7, any or none")]:
        with pytest.raises(ConfigError, match=msg):
            requested_labels(digit, 5, 0)
    for digit, msg in [("10", "0-9, any or none"), ("-1", "a digit such as 7"), ("seven", "a digit such as 7")]:
        with pytest.raises(ConfigError, match=msg):
            requested_labels(digit, 5, 10)
    with pytest.raises(ConfigError, match="frequencies"):
        requested_labels("any", 5, 10, None)
