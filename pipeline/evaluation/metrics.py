"""Per-sample reconstruction metrics: PSNR and SSIM on images in [-1, 1].

Used where a sample has a paired target (a bridge's clean image, a teacher's
sample from the same noise). Both return one value per sample, shape (N,), so
callers choose how to average. The data range is 2 (from -1 to 1).

SSIM follows Wang et al. 2004, "Image quality assessment: from error
visibility to structural similarity", Eq. 13 with K1=0.01, K2=0.03 and an
11x11 Gaussian window of sigma 1.5, computed per channel over the valid
region and averaged.
"""
import torch
import torch.nn.functional as F

DATA_RANGE = 2.0  # images live in [-1, 1]


def _check_pair(x, ref):
    if x.shape != ref.shape or x.dim() != 4:
        raise ValueError(f"expected two (N, C, H, W) batches of one shape, got {tuple(x.shape)} and {tuple(ref.shape)}")


def psnr(x, ref, eps=1e-10):
    """Peak signal-to-noise ratio in dB per sample, (N,).

    The mean squared error is floored at `eps`, so identical images give a
    finite 10*log10(4/eps) (= 106 dB by default) and batch averages stay finite.
    """
    _check_pair(x, ref)
    mse = (x.double() - ref.double()).square().flatten(1).mean(dim=1)  # (N,)
    return (10.0 * torch.log10(DATA_RANGE**2 / mse.clamp_min(eps))).to(x.dtype)


def _window_size(height, width, size=11):
    # The standard 11x11 window does not fit an 8x8 image: shrink it to the
    # largest odd size that fits, so the valid SSIM map is never empty.
    size = min(size, height, width)
    return size if size % 2 == 1 else size - 1


def gaussian_1d(size, sigma=1.5):
    """Normalised 1-D Gaussian, (size,): the 2-D window is its outer product with itself."""
    t = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    return g / g.sum()


def gaussian_window(size, sigma=1.5):
    """Normalised 2-D Gaussian, (size, size)."""
    g = gaussian_1d(size, sigma)
    return g[:, None] * g[None, :]


def ssim(x, ref, window_size=11, sigma=1.5):
    """Structural similarity per sample, (N,): 1 for identical images.

    Local means, variances and covariance come from a Gaussian window applied
    to each channel separately (valid region only); the SSIM map is averaged
    over channels and positions. The window is separable, so each local average
    is a column pass then a row pass (2k multiply-adds per pixel instead of k^2).
    """
    _check_pair(x, ref)
    n, c, h, w = x.shape
    size = _window_size(h, w, window_size)
    dtype = x.dtype
    # float64: var = E[x^2] - E[x]^2 cancels badly in float32 for flat patches.
    x, ref = x.double(), ref.double()
    # The five local averages in one pass: (N, 5C, H-k+1, W-k+1) split into five (N, C, ...).
    stack = torch.cat([x, ref, x * x, ref * ref, x * ref], dim=1)
    g = gaussian_1d(size, sigma).to(x.device)
    k = stack.shape[1]
    blurred = F.conv2d(stack, g.view(1, 1, size, 1).expand(k, 1, size, 1), groups=k)
    blurred = F.conv2d(blurred, g.view(1, 1, 1, size).expand(k, 1, 1, size), groups=k)
    mu_x, mu_y, e_xx, e_yy, e_xy = blurred.split(c, dim=1)
    var_x = e_xx - mu_x**2
    var_y = e_yy - mu_y**2
    cov = e_xy - mu_x * mu_y
    c1, c2 = (0.01 * DATA_RANGE) ** 2, (0.03 * DATA_RANGE) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1).to(dtype)
