"""Corruptions: shapes, ranges, per-sample determinism, and that each does its job."""
import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from pipeline.data.corruptions import corrupt
from pipeline.config.settings import (
    Blur, Corruption, Inpaint, Jpeg, NoCorruption, Noise, PairedCorruption, Sketch, SuperResolution)

SEEDS = list(range(100, 110))

ALL = [
    NoCorruption(),
    SuperResolution(factor=2),
    SuperResolution(factor=4, mode="bicubic"),
    Jpeg(quality=20),
    Inpaint(size=6),
    Inpaint(mask="random", size=5, fill=-1.0),
    Sketch(),
    Sketch(threshold=0.3),
    Blur(sigma=1.0),
    Noise(std=0.1),
]


def images(n=10, c=3, size=16, seed=0):
    """Smooth gradients plus noise: something every corruption visibly changes."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(-0.8, 0.8, size)
    smooth = (ramp[:, None] * ramp[None, :]).expand(n, c, size, size)
    return (smooth + 0.3 * torch.randn(n, c, size, size, generator=g)).clamp(-1, 1)


@pytest.fixture(scope="module")
def x0():
    torch.set_num_threads(1)
    return images()


@pytest.mark.parametrize("params", ALL, ids=lambda p: repr(p))
def test_shape_dtype_range(x0, params):
    y = corrupt(x0, params, SEEDS)
    assert y.shape == x0.shape and y.dtype == torch.float32
    assert torch.isfinite(y).all()
    if not isinstance(params, Noise):
        assert y.min() >= -1.0 and y.max() <= 1.0


@pytest.mark.parametrize("params", ALL, ids=lambda p: repr(p))
def test_deterministic_and_independent_of_batching(x0, params):
    whole = corrupt(x0, params, SEEDS)
    assert torch.equal(whole, corrupt(x0, params, SEEDS))
    halves = torch.cat([corrupt(x0[:4], params, SEEDS[:4]), corrupt(x0[4:], params, SEEDS[4:])])
    assert torch.equal(whole, halves)
    flipped = corrupt(x0.flip(0), params, SEEDS[::-1]).flip(0)
    assert torch.equal(whole, flipped)


@pytest.mark.parametrize("params", ALL[1:], ids=lambda p: repr(p))
def test_changes_the_image(x0, params):
    assert (corrupt(x0, params, SEEDS) - x0).abs().mean() > 1e-3


def test_none_gives_zeros_and_is_unconditional(x0):
    assert torch.equal(corrupt(x0, NoCorruption(), SEEDS), torch.zeros_like(x0))
    assert NoCorruption.conditional is False
    assert all(type(p).conditional for p in ALL[1:])


def test_pool_super_resolution_is_blockwise_mean(x0):
    y = corrupt(x0, SuperResolution(factor=4), SEEDS)
    blocks = y.unfold(2, 4, 4).unfold(3, 4, 4)  # (N, C, 4, 4, 4, 4)
    assert torch.allclose(blocks, blocks[..., :1, :1].expand_as(blocks))
    means = x0.unfold(2, 4, 4).unfold(3, 4, 4).mean(dim=(-1, -2))
    assert torch.allclose(blocks[..., 0, 0], means, atol=1e-6)


def test_bicubic_super_resolution_loses_detail_but_keeps_smooth_images(x0):
    params = SuperResolution(factor=2, mode="bicubic")
    y = corrupt(x0, params, SEEDS)
    assert not torch.allclose(y, y.unfold(2, 2, 2).unfold(3, 2, 2)[..., 0, 0].repeat_interleave(2, 2)
                              .repeat_interleave(2, 3))  # not just nearest blocks
    flat = torch.full((2, 1, 8, 8), 0.25)
    assert torch.allclose(corrupt(flat, params, [0, 1]), flat, atol=1e-5)


def test_center_inpaint_fills_hole_only(x0):
    params = Inpaint(size=6, fill=0.5)
    y = corrupt(x0, params, SEEDS)
    hole = torch.zeros(16, 16, dtype=torch.bool)
    hole[5:11, 5:11] = True
    assert (y[..., hole] == 0.5).all()
    assert torch.equal(y[..., ~hole], x0[..., ~hole])


def test_random_inpaint_hole_moves_with_seed():
    x0 = torch.full((10, 1, 16, 16), 0.7)
    y = corrupt(x0, Inpaint(mask="random", size=4, fill=-1.0), SEEDS)
    holes = y == -1.0
    assert (holes.sum(dim=(1, 2, 3)) == 16).all()  # one full 4x4 square each
    assert len({tuple(h.nonzero()[0].tolist()) for h in holes}) > 3
    assert (y[~holes] == 0.7).all()


def test_sketch_marks_edges_only():
    x0 = -torch.ones(2, 3, 12, 12)
    x0[:, :, :, 6:] = 1.0  # vertical step between columns 5 and 6
    y = corrupt(x0, Sketch(threshold=0.5), [0, 1])
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 0], y[:, 2])
    assert (y[..., 5:7] == 1.0).all()
    assert (y[..., :4] == -1.0).all() and (y[..., 8:] == -1.0).all()
    flat = corrupt(torch.zeros(1, 1, 8, 8), Sketch(), [0])
    assert (flat == -1.0).all()


def high_frequency_energy(x):
    spectrum = torch.fft.fftshift(torch.fft.fft2(x).abs().square(), dim=(-2, -1))
    h, w = x.shape[-2:]
    spectrum[..., h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 0  # drop the low band
    return spectrum.sum()


def test_blur_removes_high_frequencies_and_keeps_constants(x0):
    y = corrupt(x0, Blur(sigma=1.5), SEEDS)
    assert high_frequency_energy(y) < 0.1 * high_frequency_energy(x0)
    flat = torch.full((1, 1, 16, 16), -0.3)
    assert torch.allclose(corrupt(flat, Blur(sigma=2.0), [0]), flat, atol=1e-6)


def test_noise_has_requested_std_and_depends_on_seed():
    x0 = torch.zeros(10, 1, 32, 32)
    y = corrupt(x0, Noise(std=0.3), SEEDS)
    assert abs(y.std().item() - 0.3) < 0.015 and abs(y.mean().item()) < 0.015
    other = corrupt(x0, Noise(std=0.3), [s + 1 for s in SEEDS])
    assert not torch.allclose(y, other)


def test_jpeg_low_quality_distorts_more(x0):
    for c in (1, 3):
        x = x0[:, :1].expand(-1, c, -1, -1)  # gray: 4:2:0 chroma subsampling would blur colour noise
        error = {q: (corrupt(x, Jpeg(quality=q), SEEDS) - x).abs().mean() for q in (5, 90)}
        assert error[5] > 2 * error[90] > 0


def test_paired_cannot_be_computed(x0):
    with pytest.raises(ValueError, match="paired"):
        corrupt(x0, PairedCorruption(), SEEDS)


def test_size_checks_name_the_field(x0):
    with pytest.raises(ValueError, match="factor"):
        corrupt(x0, SuperResolution(factor=3), SEEDS)
    with pytest.raises(ValueError, match="size"):
        corrupt(x0, Inpaint(size=17), SEEDS)
    with pytest.raises(ValueError, match="sigma"):
        corrupt(x0, Blur(sigma=6.0), SEEDS)
    with pytest.raises(ValueError, match="seeds"):
        corrupt(x0, Noise(), SEEDS[:3])


def test_params_parse_as_a_discriminated_union():
    adapter = TypeAdapter(Corruption)
    parsed = adapter.validate_python({"kind": "super_resolution", "factor": 8, "mode": "bicubic"})
    assert parsed == SuperResolution(factor=8, mode="bicubic")
    for bad in ({"kind": "super_resolution", "factor": 1}, {"kind": "jpeg", "quality": 0},
                {"kind": "noise", "std": 0}, {"kind": "blur", "sigma": 1, "radius": 3},
                {"kind": "sr4x-pool"}):
        with pytest.raises(ValidationError):
            adapter.validate_python(bad)
