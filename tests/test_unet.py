"""The network: shapes, dependence on t, and clear errors for configs that cannot build."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import randomised
from configuration import ConfigError, load_config
from unet import UNet

TINY = dict(channels=[8, 16], attention=[False, True], num_heads=2, norm_groups=4)


@pytest.mark.parametrize("kwargs", [TINY, dict(TINY, channels=[8, 16, 16], attention=[False, False, True],
                                                num_res_blocks=2, dropout=0.1)])
def test_output_shape_equals_input_shape(kwargs):
    model = UNet(**kwargs)
    x = torch.randn(3, 1, 28, 28)
    assert model(x, torch.tensor([0, 10, 999])).shape == x.shape


def test_patches_keep_the_image_shape_and_each_output_pixel_sees_its_own_patch():
    torch.manual_seed(0)
    model = randomised(UNet(**dict(TINY, patch_size=2, channels=[8, 8]))).eval()
    x = torch.randn(2, 1, 28, 28)
    out = model(x, torch.tensor([5, 500]))
    assert out.shape == x.shape
    y = x.clone()
    y[:, :, 0, 0] += 1.0  # one pixel of the top-left patch: the outputs of all four of its pixels change
    assert ((model(y, torch.tensor([5, 500])) - out)[:, :, :2, :2].abs() > 1e-6).all()


def test_an_untrained_unet_outputs_zero_and_its_residual_branches_start_at_zero():
    """The DDPM reference UNet's initialisation: the last conv of every residual branch (ResBlock conv2,
    attention proj) and the output conv start at 0."""
    model = UNet(**TINY)
    assert torch.equal(model(torch.randn(2, 1, 28, 28), torch.tensor([3, 900])), torch.zeros(2, 1, 28, 28))
    last = [m.conv2 for m in model.modules() if hasattr(m, "conv2")] + [m.proj for m in model.modules()
                                                                         if hasattr(m, "proj")]
    assert last and all(not p.any() for layer in last for p in layer.parameters())


def test_output_depends_on_t():
    torch.manual_seed(0)
    model = randomised(UNet(**TINY)).eval()
    x = torch.randn(1, 1, 28, 28).expand(2, -1, -1, -1)
    out = model(x, torch.tensor([5, 900]))
    assert (out[0] - out[1]).abs().max() > 1e-3
    # and t reaches the output through every path: the gradient w.r.t. the time MLP is non-zero
    model(x, torch.tensor([5, 900])).pow(2).sum().backward()
    assert model.time_mlp[0].weight.grad.abs().sum() > 0


def test_default_config_builds_and_trains_one_step_quickly():
    """Guard against the default model growing slow: one CPU training step of the real default config."""
    cfg = load_config("config/default.yaml")
    model = UNet(**cfg["model"])
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(cfg["train"]["batch_size"], 1, 28, 28)
    with FlopCounterMode(display=False) as flops:
        loss = model(x, torch.randint(0, 1000, (len(x),))).pow(2).mean()
        loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    # the ten-minute CPU budget is spent in FLOPs: the default costs 0.28 GFLOP per training image;
    # a default much above that no longer fits its 10 minutes (see docs/cpu_recipe.md)
    assert flops.get_total_flops() / len(x) < 0.5e9


@pytest.mark.parametrize("kwargs, key", [
    (dict(TINY, channels=[8, 16, 16, 16], attention=[False] * 4), "model.image_size"),  # 28 % 8 != 0
    (dict(TINY, channels=[8, 18]), "model.norm_groups"),
    (dict(TINY, attention=[True]), "model.attention"),
    (dict(TINY, num_heads=3), "model.num_heads"),
    (dict(TINY, dropout=1.5), "model.dropout"),
    (dict(TINY, num_res_blocks=0), "model.num_res_blocks"),
    (dict(TINY, patch_size=3), "model.patch_size"),  # 28 % 3 != 0
    (dict(TINY, patch_size=4), "model.image_size"),  # 7 positions cannot be halved
])
def test_invalid_model_configs_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        UNet(**kwargs)


@pytest.mark.parametrize("path", ["config/default.yaml", "config/large.yaml", "config/conditional.yaml"])
def test_every_shipped_config_loads_and_builds(path):
    cfg = load_config(path)
    model = UNet(**cfg["model"])
    assert model.num_classes == cfg["model"]["num_classes"]
