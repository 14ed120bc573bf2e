"""PSNR and SSIM: exact on identical images, falling with noise, fine at 8x8."""
import math

import numpy as np
import pytest
import torch

from pipeline.evaluation.metrics import gaussian_window, psnr, ssim


def images(shape, seed=0):
    """Smooth random images in [-1, 1]: upsampled noise, so SSIM has structure to lose."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    coarse = torch.rand(n, c, max(h // 4, 2), max(w // 4, 2), generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)


def noisy(x, std, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (x + std * torch.randn(x.shape, generator=g)).clamp(-1, 1)


SHAPES = [(4, 1, 8, 8), (4, 1, 28, 28), (4, 3, 32, 32)]


@pytest.mark.parametrize("shape", SHAPES)
def test_psnr_identical_is_finite_and_large(shape):
    x = images(shape)
    value = psnr(x, x)
    assert value.shape == (shape[0],)
    assert torch.isfinite(value).all() and (value > 100).all()


def test_psnr_matches_closed_form():
    x = torch.zeros(2, 1, 8, 8)
    ref = torch.full_like(x, 0.2)  # mse 0.04 -> 10 log10(4 / 0.04) = 20 dB
    assert torch.allclose(psnr(x, ref), torch.tensor([20.0, 20.0]), atol=1e-4)


@pytest.mark.parametrize("metric", [psnr, ssim])
@pytest.mark.parametrize("shape", SHAPES)
def test_falls_as_noise_grows(metric, shape):
    x = images(shape)
    values = [metric(noisy(x, std), x).mean().item() for std in (0.05, 0.2, 0.5)]
    assert values[0] > values[1] > values[2]


@pytest.mark.parametrize("shape", SHAPES)
def test_ssim_identical_is_one(shape):
    x = images(shape)
    value = ssim(x, x)
    assert value.shape == (shape[0],)
    assert torch.allclose(value, torch.ones(shape[0]), atol=1e-6)


def test_ssim_is_per_sample():
    x = images((3, 1, 8, 8))
    y = torch.cat([x[:1], noisy(x[1:2], 0.1), noisy(x[2:], 0.5)])  # identical, a little noise, a lot
    value = ssim(y, x)
    assert value[0] == pytest.approx(1.0, abs=1e-6)
    assert 1 > value[1] > value[2]


def test_ssim_of_unrelated_noise_is_near_zero():
    g = torch.Generator().manual_seed(3)
    x, y = (torch.rand(2, 16, 1, 32, 32, generator=g) * 2 - 1).unbind(0)
    assert ssim(x, y).mean().abs() < 0.05


def test_ssim_is_symmetric():
    x, y = images((2, 3, 32, 32)), images((2, 3, 32, 32), seed=5)
    assert torch.allclose(ssim(x, y), ssim(y, x), atol=1e-6)


@pytest.mark.parametrize("shape, size", [((3, 1, 28, 28), 11), ((2, 3, 16, 12), 11), ((2, 1, 8, 8), 7)])
def test_ssim_matches_a_direct_implementation_of_the_definition(shape, size):
    """Against Wang et al. 2004, Eq. 13 written out with scipy's 2-D correlation and the
    11x11 window (7x7 where 11 does not fit): no torch convolution, no separability."""
    from scipy.signal import correlate2d
    x, ref = images(shape).double(), noisy(images(shape), 0.3).double()
    t = np.arange(size) - (size - 1) / 2
    g = np.exp(-t**2 / (2 * 1.5**2))
    window = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    expected = []
    for a, b in zip(x.numpy(), ref.numpy()):
        maps = []
        for ac, bc in zip(a, b):
            def local(img):
                return correlate2d(img, window, mode="valid")
            mu_a, mu_b = local(ac), local(bc)
            var_a, var_b = local(ac * ac) - mu_a**2, local(bc * bc) - mu_b**2
            cov = local(ac * bc) - mu_a * mu_b
            maps.append(((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)))
        expected.append(np.mean(maps))
    np.testing.assert_allclose(ssim(x, ref).numpy(), expected, rtol=0, atol=1e-10)


def test_gaussian_window_is_normalised():
    w = gaussian_window(11, 1.5)
    assert w.shape == (11, 11)
    assert w.sum().item() == pytest.approx(1.0)
    assert w[5, 5] == w.max()
    assert math.isclose(w[5, 4].item() / w[5, 5].item(), math.exp(-1 / (2 * 1.5**2)), rel_tol=1e-9)


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match="one shape"):
        psnr(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 28, 28))
    with pytest.raises(ValueError, match="one shape"):
        ssim(torch.zeros(2, 1, 8, 8), torch.zeros(2, 3, 8, 8))
