"""A time-conditioned UNet, the raw network F inside every denoiser.

Follows the layout of the DDPM/EDM UNets (residual blocks with a FiLM-style
noise embedding, skip connections between resolutions); the default is shrunk so it
trains on a 2-core CPU in minutes, the profiles (profiles/) size it for a GPU.
- `attention`: the feature-map sides (e.g. [16]) whose residual blocks are each followed
  by a self-attention block, as DDPM's 16x16 attention (Ho et al. 2020, Appendix B).
- `classes` > 0: a learned class embedding is added to the noise embedding (as EDM's
  class-conditional networks do, Karras et al. 2022, Appendix F.2); label `classes` is
  the null class that condition dropout and classifier-free guidance use.
Preconditioning (c_skip, c_out, c_in, c_noise) is not done here: see `pipeline.models.teachers`.
"""
import math

import torch
from torch import nn

from pipeline.config.settings import UNetParams


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


class Attention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, residual: x + proj(attn).
    Zero-initialised projection, so a new block starts as the identity."""

    def __init__(self, channels, head_dim=64):
        super().__init__()
        self.heads = max(1, channels // head_dim)
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        # (B, heads, HW, d) each; softmax(q k^T / sqrt(d)) v written out (not fused SDPA), so
        # forward-mode AD (MM's JVP) runs through it.
        q, k, v = (t.transpose(-1, -2) for t in (q, k, v))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        out = (weights @ v).transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


def level_sides(params: UNetParams, image_size):
    """The feature-map side of each level: image_size / patch / 2**level."""
    return [image_size // params.patch // 2 ** i for i in range(len(params.channels))]


class UNet(nn.Module):
    """F(x, c_noise[, label]) -> (B, out_channels, H, W) for H, W divisible by
    patch * 2**(levels-1); `image_size` places the attention blocks (needed if any)."""

    def __init__(self, params: UNetParams, in_channels, out_channels, image_size=None, classes=0):
        super().__init__()
        ch, e, self.patch = params.channels, params.emb_dim, params.patch
        self.in_channels, self.out_channels = in_channels, out_channels
        in_channels, out_channels = in_channels * self.patch ** 2, out_channels * self.patch ** 2
        self.embed = nn.Sequential(FourierEmbedding(e), nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))
        self.classes = classes
        self.label_embed = nn.Embedding(classes + 1, e) if classes else None  # last row: null class
        if params.attention and image_size is None:
            raise ValueError("a UNet with attention needs the image size to place it")
        sides = level_sides(params, image_size) if image_size else [None] * len(ch)
        unknown = sorted(set(params.attention) - set(sides))
        if unknown:
            raise ValueError(f"net.attention {list(params.attention)}: {unknown} is not a feature-map side of "
                             f"this net (its levels run at {sides})")
        attend = [side in params.attention for side in sides]
        self.stem = nn.Conv2d(in_channels, ch[0], 3, padding=1)
        self.down, self.up = nn.ModuleList(), nn.ModuleList()
        # "down3", "mid", "up1": the attention block after that residual block (a separate
        # dict keeps the residual blocks' parameter names those of a net without attention)
        self.attn = nn.ModuleDict()
        c_prev, skips = ch[0], []
        for level, c in enumerate(ch):
            for _ in range(params.blocks_per_level):
                self.down.append(ResBlock(c_prev, c, e, params.dropout))
                if attend[level]:
                    self.attn[f"down{len(self.down) - 1}"] = Attention(c)
                c_prev = c
                skips.append(c)
        self.mid = ResBlock(c_prev, c_prev, e, params.dropout)
        if attend[-1]:
            self.attn["mid"] = Attention(c_prev)
        for level, c in reversed(list(enumerate(ch))):
            for _ in range(params.blocks_per_level):
                self.up.append(ResBlock(c_prev + skips.pop(), c, e, params.dropout))
                if attend[level]:
                    self.attn[f"up{len(self.up) - 1}"] = Attention(c)
                c_prev = c
        self.blocks_per_level = params.blocks_per_level
        self.levels = len(ch)
        self.head = nn.Sequential(nn.GroupNorm(_groups(c_prev), c_prev), nn.SiLU(),
                                  nn.Conv2d(c_prev, out_channels, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)  # start as the identity of the skip path
        nn.init.zeros_(self.head[-1].bias)

    def _attend(self, where, h):
        return self.attn[where](h) if where in self.attn else h

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

    def forward(self, x, c_noise, label=None):
        """label (B,) int64 in [0, classes], `classes` the null class; None: no class input
        (a class-conditional net then gets the null class)."""
        emb = self.embed(c_noise)
        if self.label_embed is not None:
            if label is None:
                label = torch.full((len(x),), self.classes, dtype=torch.int64, device=x.device)
            emb = emb + self.label_embed(label)
        if self.patch > 1:
            x = nn.functional.pixel_unshuffle(x, self.patch)  # (B, C p^2, H/p, W/p)
        h, hs = self.stem(x), []
        for i, block in enumerate(self.down):
            h = self._attend(f"down{i}", block(h, emb))
            hs.append(h)
            if (i + 1) % self.blocks_per_level == 0 and i + 1 < len(self.down):
                h = nn.functional.avg_pool2d(h, 2)
        h = self._attend("mid", self.mid(h, emb))
        for i, block in enumerate(self.up):
            skip = hs.pop()
            if h.shape[-2:] != skip.shape[-2:]:
                h = nn.functional.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = self._attend(f"up{i}", block(torch.cat([h, skip], dim=1), emb))
        h = self.head(h)
        return nn.functional.pixel_shuffle(h, self.patch) if self.patch > 1 else h
