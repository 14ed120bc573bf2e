"""Corruptions x0 -> y: the observation a conditional model (or a bridge) starts from.

Each corruption's settings live in `pipeline.config.settings` (torch-free, so params
validate fast); here `APPLY[kind](params, x0, seeds)` maps clean images x0
(N, C, H, W) in [-1, 1] to y of the same shape, float32. Randomness
(random masks, noise) comes from one generator per sample seeded by
`seeds[i]`, so a sample's y never depends on the batch or shard it is in.
Tasks follow the image-to-image bridge literature (I2SB, Liu et al. 2023):
super-resolution, JPEG restoration, inpainting, sketch-to-image, deblurring,
denoising; `none` is unconditional generation (y = 0) and `paired` takes y
from a paired source.
"""
import io
import math

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config.settings import Corruption  # noqa: F401  (re-exported for callers)
from pipeline.data import to_float, to_uint8


def generators(seeds):
    """One torch.Generator per sample."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def none(params, x0, seeds):
    """Unconditional generation: y = 0 carries nothing."""
    return torch.zeros_like(x0, dtype=torch.float32)


def paired(params, x0, seeds):
    raise ValueError("corruption 'paired' takes y from the paired source; it cannot be computed from x0")


def super_resolution(params, x0, seeds):
    """pool: average pooling down, nearest up (y constant on factor x factor blocks);
    bicubic: antialiased bicubic down, bicubic up, clamped (bicubic overshoots at edges)."""
    h, w, f = *x0.shape[-2:], params.factor
    if params.mode == "pool":
        return F.interpolate(F.avg_pool2d(x0, f), size=(h, w), mode="nearest")
    low = F.interpolate(x0, size=(h // f, w // f), mode="bicubic", align_corners=False, antialias=True)
    return F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False).clamp(-1, 1)


def _jpeg_round_trip(img, quality):
    """uint8 (C, H, W) -> the same after a JPEG round trip through PIL."""
    from PIL import Image

    pixels = img.permute(1, 2, 0).numpy()
    pil = Image.fromarray(pixels[..., 0] if img.shape[0] == 1 else pixels)
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", quality=quality)
    back = np.asarray(Image.open(buffer).convert(pil.mode)).reshape(pixels.shape)
    return torch.from_numpy(back.copy()).permute(2, 0, 1)


def jpeg(params, x0, seeds):
    return to_float(torch.stack([_jpeg_round_trip(img, params.quality) for img in to_uint8(x0)]))


def _hole_corners(params, seeds, h, w):
    """Top-left corner of the hole per sample: centred, or drawn from the sample's seed."""
    if params.mask == "center":
        return [((h - params.size) // 2, (w - params.size) // 2)] * len(seeds)
    high = (h - params.size + 1, w - params.size + 1)
    return [tuple(int(torch.randint(m, (1,), generator=g)) for m in high) for g in generators(seeds)]


def inpaint(params, x0, seeds):
    y = x0.to(torch.float32).clone()
    for i, (top, left) in enumerate(_hole_corners(params, seeds, *x0.shape[-2:])):
        y[i, :, top:top + params.size, left:left + params.size] = params.fill
    return y


def sketch(params, x0, seeds):
    """Sobel magnitude of the grayscale image / its per-image max, optionally thresholded,
    mapped to [-1, 1] (edges +1) and replicated to all C channels."""
    c = x0.shape[1]
    gray = x0.to(torch.float32).mean(dim=1, keepdim=True)  # (N, 1, H, W)
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    kernels = torch.stack([sobel_x, sobel_x.T])[:, None]  # (2, 1, 3, 3)
    grad = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kernels)  # (N, 2, H, W)
    magnitude = grad.square().sum(dim=1, keepdim=True).sqrt()
    edges = magnitude / magnitude.amax(dim=(2, 3), keepdim=True).clamp_min(1e-8)
    if params.threshold is not None:
        edges = (edges >= params.threshold).to(torch.float32)
    return (2.0 * edges - 1.0).expand(-1, c, -1, -1).contiguous()


def blur_radius(sigma):
    """The Gaussian kernel's radius in pixels: ceil(3 sigma) (99.7 % of its mass)."""
    return math.ceil(3.0 * sigma)


def blur(params, x0, seeds):
    """Separable Gaussian blur, kernel size 2*ceil(3 sigma)+1, reflect padding."""
    n, c, h, w = x0.shape
    r = blur_radius(params.sigma)
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (t / params.sigma) ** 2)
    kernel = kernel / kernel.sum()  # (2r+1,)
    x = F.pad(x0.to(torch.float32).reshape(n * c, 1, h, w), (r, r, r, r), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))  # rows, then columns
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x.reshape(n, c, h, w)


def noise(params, x0, seeds):
    """Additive Gaussian noise, std in [-1, 1] units, one generator per sample (not clamped)."""
    eps = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in generators(seeds)])
    return x0.to(torch.float32) + params.std * eps


APPLY = {"none": none, "paired": paired, "super_resolution": super_resolution, "jpeg": jpeg,
         "inpaint": inpaint, "sketch": sketch, "blur": blur, "noise": noise}

def corrupt(x0, params, seeds):
    """y for clean x0 (N, C, H, W) in [-1, 1]; seeds: N ints, one per sample.

    Deterministic: the same sample and seed give the same y in any batch.
    """
    if x0.ndim != 4:
        raise ValueError(f"x0 must be (N, C, H, W), got shape {tuple(x0.shape)}")
    if len(seeds) != x0.shape[0]:
        raise ValueError(f"got {len(seeds)} seeds for {x0.shape[0]} samples")
    params.check(tuple(x0.shape[1:]))
    return APPLY[params.kind](params, x0, seeds).to(torch.float32)
