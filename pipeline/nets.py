"""A small time-conditioned UNet, the raw network F inside every denoiser.

Follows the layout of the DDPM/EDM UNets (residual blocks with a FiLM-style
noise embedding, skip connections between resolutions), shrunk so it trains
on a 2-core CPU in minutes. Preconditioning (c_skip, c_out, c_in, c_noise) is
not done here: see `pipeline.teachers`.
"""
import math

import torch
from torch import nn

from pipeline.settings import UNetParams


def _groups(channels):
    # GroupNorm needs channels divisible by the group count.
    return math.gcd(8, channels)


class FourierEmbedding(nn.Module):
    """Sinusoidal features of a scalar noise level (Vaswani et al. 2017, Sec 3.5)."""

    def __init__(self, dim, max_period=10_000.0):
        super().__init__()
        half = dim // 2
        # c_noise spans a few units (ln(sigma)/4 or t in [0, 1]): frequencies
        # from 100 down to 100/max_period radians per unit resolve it finely.
        freqs = 100.0 * torch.exp(-math.log(max_period) * torch.arange(half) / half)
        self.register_buffer("freqs", freqs)

    def forward(self, c_noise):  # (B,) -> (B, dim)
        angles = c_noise.float()[:, None] * self.freqs[None, :]
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the embedding as per-channel scale and shift."""

    def __init__(self, c_in, c_out, emb_dim, dropout):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = nn.functional.silu(self.norm2(h) * (1 + scale) + shift)
        h = self.conv2(self.dropout(h))
        return self.skip(x) + h


class UNet(nn.Module):
    """F(x, c_noise) -> (B, out_channels, H, W) for H, W divisible by patch * 2**(levels-1)."""

    def __init__(self, params: UNetParams, in_channels, out_channels):
        super().__init__()
        ch, e, self.patch = params.channels, params.emb_dim, params.patch
        self.in_channels, self.out_channels = in_channels, out_channels
        in_channels, out_channels = in_channels * self.patch ** 2, out_channels * self.patch ** 2
        self.embed = nn.Sequential(FourierEmbedding(e), nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))
        self.stem = nn.Conv2d(in_channels, ch[0], 3, padding=1)
        self.down, self.up = nn.ModuleList(), nn.ModuleList()
        c_prev, skips = ch[0], []
        for c in ch:
            for _ in range(params.blocks_per_level):
                self.down.append(ResBlock(c_prev, c, e, params.dropout))
                c_prev = c
                skips.append(c)
        self.mid = ResBlock(c_prev, c_prev, e, params.dropout)
        for c in reversed(ch):
            for _ in range(params.blocks_per_level):
                self.up.append(ResBlock(c_prev + skips.pop(), c, e, params.dropout))
                c_prev = c
        self.blocks_per_level = params.blocks_per_level
        self.levels = len(ch)
        self.head = nn.Sequential(nn.GroupNorm(_groups(c_prev), c_prev), nn.SiLU(),
                                  nn.Conv2d(c_prev, out_channels, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)  # start as the identity of the skip path
        nn.init.zeros_(self.head[-1].bias)

    def widen_input(self, channels):
        """Append `channels` input channels whose stem weights are zero (output unchanged)."""
        old = self.stem
        extra = channels * self.patch ** 2  # pixel unshuffle keeps each channel's p^2 block together
        self.stem = nn.Conv2d(old.in_channels + extra, old.out_channels, 3, padding=1)
        with torch.no_grad():
            self.stem.weight.zero_()
            self.stem.weight[:, :old.in_channels] = old.weight
            self.stem.bias.copy_(old.bias)
        self.in_channels += channels

    def forward(self, x, c_noise):
        emb = self.embed(c_noise)
        if self.patch > 1:
            x = nn.functional.pixel_unshuffle(x, self.patch)  # (B, C p^2, H/p, W/p)
        h, hs = self.stem(x), []
        for i, block in enumerate(self.down):
            h = block(h, emb)
            hs.append(h)
            if (i + 1) % self.blocks_per_level == 0 and i + 1 < len(self.down):
                h = nn.functional.avg_pool2d(h, 2)
        h = self.mid(h, emb)
        for i, block in enumerate(self.up):
            skip = hs.pop()
            if h.shape[-2:] != skip.shape[-2:]:
                h = nn.functional.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = block(torch.cat([h, skip], dim=1), emb)
        h = self.head(h)
        return nn.functional.pixel_shuffle(h, self.patch) if self.patch > 1 else h
