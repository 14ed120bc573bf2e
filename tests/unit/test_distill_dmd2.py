"""DMD2 (Yin et al. 2024) on the analytic Gaussian toy teacher of tests/helpers.py, and its
realism head on the project's UNet.

Toy: per pixel x0 ~ N(MEAN, VAR) = N(0.3, 0.25). The teacher is the exact
E[x0 | x] = MEAN + VAR/(VAR + sigma^2) (x - MEAN) plus a zero-initialised correction
c_out (a c_in x + b), (a, b) an MLP of c_noise. The family holds what DMD2 needs: the one-step
generator G(sigma_max z) ~ MEAN + 0.003 z + c_out (a z + b) reaches every N(m, s^2), and
D_fake (the same family) holds the posterior mean of any Gaussian, affine in x. The untrained
generator is the teacher's posterior mean at sigma_max: every sample ~MEAN (variance ~1e-5).
The toy has no middle block, so its runs have the GAN term off (gan_weight = cls_weight = 0).

Known limitation, measured rather than tested (docs/methods/dmd2.md): a few-step generator
trained by backward simulation matches only the mixture of its outputs over the training
stops. With nfe [4], 600 rounds: 4-step samples mean 0.390, variance 0.339; the four stops'
outputs err in compensating directions and their mixture has mean 0.306, variance 0.248.
Only the few-step plumbing is tested here (calls, the graded call of backward simulation).

The method is registered for this module only (it joins the registry in a later change).
"""
import math

import pytest
import torch
from pydantic import ValidationError

from pipeline.config.settings import DiffusionTeacherParams, TrainParams, UNetParams
from pipeline.distill import DMD2Params
from pipeline.distill.base import unwrap
from pipeline.distill.dmd2 import DMD2, middle_block
from pipeline.evaluation.noise import SeededNoise
from pipeline.models.loading import build_teacher
from pipeline.models.teachers import DataShape, teacher_config
from pipeline.samplers.nfe import CountingDenoiser
from pipeline.training.loop import run_training
from tests.conftest import one_torch_thread
from tests.helpers import GAUSS_MEAN as MEAN
from tests.helpers import GAUSS_VAR as VAR
from tests.helpers import gaussian_data, gaussian_teacher

one_thread = pytest.fixture(autouse=True)(one_torch_thread)


class FlippedDMD2(DMD2):
    """The DM direction with its sign flipped: the generator climbs the reverse KL."""

    def dm_grad(self, critic, x0, y, generator):
        return -super().dm_grad(critic, x0, y, generator)


def toy(rounds=300, cls=DMD2, **overrides):
    train = TrainParams(steps=rounds, batch_size=256, lr=1e-2, warmup_steps=0, ema_decay=0.0,
                        log_every=50, checkpoint_every=10**6)
    params = DMD2Params(**{"nfe": [1], "gan_weight": 0.0, "cls_weight": 0.0, "train": train, **overrides})
    return cls(params, gaussian_teacher())


def train(method, start=None):
    """The trained generator (EMA off: the last weights); `start` edits the freshly built nets."""
    if start is not None:
        build = method.build
        method.build = lambda: start(build())
    state = run_training(method, gaussian_data(), method.params.train, seed=0)
    student = method.build()["student"]
    student.load_state_dict(state["nets"]["student"])
    return student.eval().requires_grad_(False)


def moments(method, student, nfe, n=2000):
    """Mean and variance over n samples x 4 pixels (s.e. ~0.006 and ~0.004 at the target)."""
    with torch.no_grad():
        x = method.sample(student, None, SeededNoise(range(n), (1, 2, 2)), nfe)
    return x.mean().item(), x.var().item()


def diverse(nets):
    """G started at the target law: a = 1 in its correction gives G(80 z) ~ MEAN + 0.504 z."""
    with torch.no_grad():
        nets["student"].head[-1].bias[0] = 1.0
    return nets


# --- (a) the one-step generator's law --------------------------------------------------------------

def test_one_step_generator_matches_the_target_law():
    # Measured (seed 0, 300 rounds): mean 0.280, variance 0.244; seeds 1-3 gave means
    # 0.288-0.309, variances 0.237-0.257. The untrained generator has variance ~1e-5.
    # Tolerances: 0.05 on the mean, 20 % on the variance (the sampling s.e. is ~0.006, ~0.004).
    method = toy()
    untrained = moments(method, method.build()["student"].eval(), 1)
    student = train(method)
    mean, var = moments(method, student, 1)
    assert untrained[1] < 1e-3
    assert abs(mean - MEAN) < 0.05
    assert abs(var - VAR) < 0.2 * VAR


# --- (b) what breaks it ------------------------------------------------------------------------------

def test_without_the_fake_score_the_generator_collapses():
    # Started at the target law: without D_fake the direction is x0 - D_real, the pull to
    # the teacher's mode, and the variance goes to ~0.
    # Measured: 0.249 -> 2.5e-7 after 150 rounds.
    method = toy(rounds=150, fake_term=False)
    _, var_start = moments(method, diverse(method.build())["student"].eval(), 1)
    student = train(method, start=diverse)
    _, var = moments(method, student, 1)
    assert var_start > 0.9 * VAR
    assert var < 0.01 * VAR


def test_with_the_dm_direction_flipped_the_generator_diverges():
    # Measured: mean -27.0 after 150 rounds, still falling (the direction is normalised).
    method = toy(rounds=150, cls=FlippedDMD2)
    student = train(method)
    mean, _ = moments(method, student, 1)
    assert abs(mean - MEAN) > 10


# --- (c) sampling ------------------------------------------------------------------------------------

def test_sample_calls_the_generator_exactly_nfe_times():
    method = toy(nfe=[1, 2, 4])
    student = method.build()["student"].eval()
    assert method.nfe_choices() == [1, 2, 4]
    for nfe in (1, 2, 4):
        counted = CountingDenoiser(student)
        with torch.no_grad():
            x = method.sample(counted, None, SeededNoise(range(4), (1, 2, 2)), nfe)
        assert counted.calls == nfe and x.shape == (4, 1, 2, 2) and torch.isfinite(x).all()
    for nfe in (3, 8):
        with pytest.raises(ValueError, match="nfe"):
            method.sample(student, None, SeededNoise(range(4), (1, 2, 2)), nfe)


def test_backward_simulation_grades_one_call_at_each_samples_stop():
    method = toy(nfe=[2, 4])
    calls = []

    def recorder(x, sigma, y):
        calls.append((sigma.clone(), torch.is_grad_enabled()))
        return x * 0.5

    batch = {k: v[:64] for k, v in gaussian_data().items()}
    x0, _ = method.generate(recorder, batch, torch.Generator().manual_seed(0))
    levels = {k: method.step_levels(k) for k in (2, 4)}
    *chain, (graded, with_grad) = calls
    assert with_grad and not any(g for _, g in chain) and len(chain) == 3  # stops up to 3 of 4
    assert all(any(math.isclose(s, v, rel_tol=1e-6) for v in levels[2] + levels[4]) for s in graded.tolist())
    assert x0.shape == batch["x0"].shape


# --- (d) the realism head on the project's UNet ---------------------------------------------------------

def tiny_unet_teacher():
    shape = DataShape(channels=1, image_size=8, conditional=True)
    params = DiffusionTeacherParams(net=UNetParams(patch=2, channels=(16, 32), emb_dim=32, attention=[2]))
    teacher = build_teacher(teacher_config("diffusion", params, shape))
    torch.manual_seed(0)
    with torch.no_grad():  # the UNet head starts at zero; make the network do something
        for p in teacher.denoiser.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return teacher


def unet_batch(n=6):
    g = torch.Generator().manual_seed(1)
    return {k: torch.rand(n, 1, 8, 8, generator=g) * 2 - 1 for k in ("x0", "y")}


def test_realism_head_reads_the_unet_middle_block_and_stops_there():
    method = DMD2(DMD2Params(), tiny_unet_teacher())
    fake = unwrap(method.build()["fake"])
    unet = fake.denoiser.net
    assert middle_block(fake.denoiser) is unet.mid and "mid" in unet.attn  # not the attention after it
    after = []
    unet.head.register_forward_hook(lambda *a: after.append(1))
    x, y, sigma = unet_batch()["x0"], unet_batch()["y"], torch.full((6,), 2.0)
    logits = fake.logits(x, sigma, y)
    assert logits.shape == (6,) and torch.isfinite(logits).all() and not after
    assert fake(x, sigma, y).shape == x.shape and after  # the hook is gone: D_fake runs to its end


def test_generator_loss_leaves_the_fake_net_without_gradient():
    method = DMD2(DMD2Params(), tiny_unet_teacher())
    nets = method.build()
    optimizers = method.optimizers(nets, method.params.train)
    method.train_step(nets, optimizers, unet_batch(), torch.Generator().manual_seed(0), method.params.train)
    for net in nets.values():
        net.zero_grad(set_to_none=True)
    loss = method.loss(nets, unet_batch(), torch.Generator().manual_seed(1))
    assert loss.shape == (6,) and torch.isfinite(loss).all()
    loss.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in nets["student"].parameters())
    assert all(p.grad is None or not p.grad.any() for p in nets["fake"].parameters())
    assert all(p.grad is None for p in method.teacher.denoiser.parameters())
    # ... while the fake branch's loss trains D_fake and the head, and not G
    nets["student"].zero_grad(set_to_none=True)
    method.fake_loss(nets, unet_batch(), torch.Generator().manual_seed(2)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in nets["fake"].head.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in nets["fake"].denoiser.parameters())
    assert all(p.grad is None for p in nets["student"].parameters())


def test_toy_without_a_middle_block_needs_the_gan_term_off():
    with pytest.raises(ValueError, match="middle block"):
        DMD2(DMD2Params(), gaussian_teacher()).build()
    with pytest.raises(ValidationError, match="together"):
        DMD2Params(gan_weight=0.0)
    with pytest.raises(ValidationError, match="dm_range"):
        DMD2Params(dm_range=(0.5, 0.5))
