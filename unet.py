"""The denoising network: a Stable-Diffusion-style UNet that predicts eps from (x_t, t).

    x (B, C, 28, 28) -> conv_in -> down levels [ResBlock (+ attention)] x num_res_blocks, downsample
                     -> mid: ResBlock, attention, ResBlock
                     -> up levels [concat skip, ResBlock (+ attention)] x (num_res_blocks + 1), upsample
                     -> GroupNorm, SiLU, conv_out -> eps (B, C, 28, 28)

The timestep enters every ResBlock through a sinusoidal embedding and an MLP.
No diffusion maths lives here: that is linear_noise_scheduler.py.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from configuration import check_model


def timestep_embedding(t, dim):
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017; DDPM appendix B)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def zero(layer):
    """The layer with its weights and bias set to 0, as the DDPM reference UNet starts the last conv of
    every residual branch and the output conv: each block starts as the identity, and training moves
    the blocks away from it one by one instead of through the noise of a random residual."""
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv; add the projected time embedding; GroupNorm, SiLU, dropout, conv; residual."""

    def __init__(self, in_ch, out_ch, temb_dim, groups, dropout):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb = nn.Linear(temb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, ch, groups, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """eps_theta(x_t, t). Keyword arguments are the `model:` section of the config, one to one, with
    the same defaults as configuration.SCHEMA (a test checks it).

    channels: width of each resolution level; len(channels) - 1 downsamplings by 2.
    attention: one bool per level, self-attention after each ResBlock of that level.
    num_classes: 0 for an unconditional model; else labels 0..num_classes-1 plus one extra
    "no label" class (index num_classes) are embedded and added to the time embedding.
    """

    def __init__(self, image_size=28, in_channels=1, channels=(16, 32, 64), num_res_blocks=1,
                 attention=(False, False, False), mid_attention=True, num_heads=4, norm_groups=8,
                 dropout=0.0, num_classes=0, patch_size=1):
        super().__init__()
        check_model(image_size, in_channels, channels, num_res_blocks, attention, mid_attention, num_heads,
                    norm_groups, dropout, num_classes, patch_size)
        temb_dim = 4 * channels[0]
        self.image_size, self.in_channels, self.channels = image_size, in_channels, list(channels)
        self.time_mlp = nn.Sequential(nn.Linear(channels[0], temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        # patch_size p > 1: every p x p patch of pixels becomes one position with p*p channels (pixel
        # unshuffle) before conv_in, and back after conv_out, so the UNet runs at 1/p of the resolution.
        self.patch_size = patch_size
        self.conv_in = nn.Conv2d(in_channels * patch_size**2, channels[0], 3, padding=1)
        self.num_classes = num_classes
        self.label_emb = nn.Embedding(num_classes + 1, temb_dim) if num_classes else None

        def res(i, o):
            return ResBlock(i, o, temb_dim, norm_groups, dropout)

        def attn(ch, on):
            return Attention(ch, norm_groups, num_heads) if on else nn.Identity()

        # Down path: remember the width of every skip it pushes, for the up path.
        self.down, skips, ch = nn.ModuleList(), [channels[0]], channels[0]
        for level, width in enumerate(channels):
            for _ in range(num_res_blocks):
                self.down.append(nn.ModuleList([res(ch, width), attn(width, attention[level])]))
                ch = width
                skips.append(ch)
            if level < len(channels) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)

        self.mid = nn.ModuleList([res(ch, ch), attn(ch, mid_attention), res(ch, ch)])

        self.up = nn.ModuleList()
        for level, width in reversed(list(enumerate(channels))):
            for _ in range(num_res_blocks + 1):
                self.up.append(nn.ModuleList([res(ch + skips.pop(), width), attn(width, attention[level])]))
                ch = width
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(ch, ch, 3, padding=1)))
        assert not skips, "every skip connection must be consumed"
        self.out = nn.Sequential(nn.GroupNorm(norm_groups, ch), nn.SiLU(), zero(nn.Conv2d(ch, in_channels * patch_size**2, 3, padding=1)))

    def forward(self, x, t, y=None):
        """eps for x (B, C, H, W) at timesteps t (B,); y (B,) labels of a conditional model
        (None = the "no label" class)."""
        temb = self.time_mlp(timestep_embedding(t, self.channels[0]))
        if self.label_emb is not None:
            if y is None:
                y = torch.full_like(t, self.num_classes)
            temb = temb + self.label_emb(y)
        h = self.conv_in(F.pixel_unshuffle(x, self.patch_size) if self.patch_size > 1 else x)
        hs = [h]
        for layer in self.down:
            if isinstance(layer, nn.ModuleList):
                h = layer[1](layer[0](h, temb))
            else:
                h = layer(h)
            hs.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, temb)), temb)
        for layer in self.up:
            if isinstance(layer, nn.ModuleList):
                h = layer[1](layer[0](torch.cat([h, hs.pop()], dim=1), temb))
            else:
                h = layer(h)
        h = self.out(h)
        return F.pixel_shuffle(h, self.patch_size) if self.patch_size > 1 else h

