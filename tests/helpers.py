"""Toy data and analytic teachers shared by the tests: each denoiser is exact for its data,
so a sampler or a distillation method is checked against a known answer, not a trained net.

- `square_images`: 8x8 images with a bright square at a random corner (teachers, Ray tests).
- The unconditional Gaussian x0 ~ N(GAUSS_MEAN, GAUSS_VAR) per pixel with an exact EDM
  denoiser plus a zero-initialised trainable correction (MM, PD).
- The conditional Gaussian x0 = COND_MU + COND_A y + COND_S e, y ~ N(0, COND_VY), as an
  `EDMDenoiser` whose raw network is exact plus a zero-initialised correction (CD, TDD).
- A jointly Gaussian (x0, y) with its exact bridge denoiser, I2SB or DDBM style (IBMD).
- `exact_gaussian_denoiser`, `exact_bridge_denoiser`: plain functions for the samplers.
"""
import math

import torch
from torch import nn

from pipeline.models.bridge import BridgeSchedule
from pipeline.models.schedules import edm_precond
from pipeline.config.settings import BridgeScheduleParams, BridgeTeacherParams, DiffusionTeacherParams, EDMSchedule
from pipeline.models.teachers import DataShape, EDMDenoiser, Teacher


def col(v):  # (B,) -> (B, 1, 1, 1)
    return v.reshape(-1, 1, 1, 1)


# --- square images -------------------------------------------------------------------------

def square_images(n=256, seed=0):
    """8x8 images: a bright square at a random corner; y = the 2x-pooled image."""
    g = torch.Generator().manual_seed(seed)
    x0 = -torch.ones(n, 1, 8, 8)
    corner = torch.randint(0, 2, (n, 2), generator=g) * 4
    for i, (r, c) in enumerate(corner.tolist()):
        x0[i, :, r:r + 4, c:c + 4] = 1.0
    y = torch.nn.functional.avg_pool2d(x0, 2).repeat_interleave(2, -1).repeat_interleave(2, -2)
    return {"x0": x0, "y": y}


# --- exact denoisers as functions (samplers) -----------------------------------------------

# x0 ~ N(mu, s^2) per pixel in sigma space: E[x0|x] = (s^2 x + sigma^2 mu)/(s^2 + sigma^2).
# The condition y (B, ...) shifts the mean to mu + y; y = None is the unconditional mean mu.
def exact_gaussian_denoiser(mu, s):
    def denoise(x, sigma, y):
        m = mu if y is None else mu + y
        sig2 = sigma.view(-1, 1, 1, 1) ** 2
        return (s ** 2 * x + sig2 * m) / (s ** 2 + sig2)
    return denoise


# x0 | y ~ N(m(y), v) per pixel, x_t = a y + b x0 + c eps, so x_t | y is Gaussian and
# E[x0 | x_t, y] = m + b v/(b^2 v + c^2) (x_t - a y - b m)  (the gain is 0 at t = T where b = c = 0).
def exact_bridge_denoiser(schedule, m_of_y, v):
    def denoise(x, t, y):
        a, b, c = (k.view(-1, 1, 1, 1) for k in schedule.marginal(t))
        m = m_of_y(y)
        gain = b * v / (b * b * v + c * c).clamp_min(torch.finfo(x.dtype).tiny)
        return m + gain * (x - a * y - b * m)
    return denoise


# --- unconditional Gaussian diffusion teacher (MM, PD) ---------------------------------------

GAUSS_MEAN, GAUSS_VAR = 0.3, 0.25
GAUSS_SHAPE = DataShape(channels=1, image_size=2, conditional=False)


class GaussianDenoiser(nn.Module):
    """EDMDenoiser's signature: exact E[x0 | x] + c_out (a c_in x + b + c y), where (a, b, c)
    per channel come from an MLP of c_noise whose last layer starts at zero."""

    def __init__(self, schedule, channels=1, hidden=16):
        super().__init__()
        self.schedule, self.sigma_data = schedule, schedule.sigma_data
        self.head = nn.Sequential(nn.Linear(1, hidden), nn.SiLU(), nn.Linear(hidden, 3 * channels))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, x, sigma, y=None, keep=None):
        exact = GAUSS_MEAN + col(GAUSS_VAR / (GAUSS_VAR + sigma ** 2)) * (x - GAUSS_MEAN)
        _, c_out, c_in, c_noise = edm_precond(sigma, self.sigma_data)
        a, b, c = (v[..., None, None] for v in self.head(c_noise[:, None]).chunk(3, 1))
        y = torch.zeros_like(x) if y is None else y
        return exact + col(c_out) * (a * col(c_in) * x + b + c * y)


def gaussian_teacher():
    torch.manual_seed(0)  # the correction MLP's first layer: results must not depend on test order
    params = DiffusionTeacherParams()
    denoiser = GaussianDenoiser(params.schedule).eval().requires_grad_(False)
    return Teacher(name="diffusion", family="diffusion", params=params, shape=GAUSS_SHAPE, denoiser=denoiser)


def gaussian_data(n=4096, seed=0):
    x0 = GAUSS_MEAN + GAUSS_VAR ** 0.5 * torch.randn((n, 1, 2, 2), generator=torch.Generator().manual_seed(seed))
    return {"x0": x0, "y": torch.zeros_like(x0)}


# --- conditional Gaussian diffusion teacher (CD, TDD) ----------------------------------------

COND_MU, COND_S, COND_A, COND_VY = 0.3, 0.5, 0.8, 0.25
COND_SCHEDULE = EDMSchedule()
COND_SHAPE = (1, 2, 2)


class ConditionalGaussianNet(nn.Module):
    """Raw F(inp, c_noise) of the toy: exact part + zero-initialised FiLM-MLP correction."""

    def __init__(self, channels, conditional, hidden=32):
        super().__init__()
        self.channels, self.conditional = channels, conditional
        in_channels = 2 * channels + 1 if conditional else channels
        self.first = nn.Conv2d(in_channels, hidden, 1)
        self.film = nn.Sequential(nn.Linear(1, hidden), nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.last = nn.Conv2d(hidden, channels, 1)
        nn.init.zeros_(self.last.weight)
        nn.init.zeros_(self.last.bias)

    def exact(self, inp, c_noise):
        sigma = (4 * c_noise).exp()
        c_skip, c_out, c_in, _ = edm_precond(sigma, COND_SCHEDULE.sigma_data)
        x, sig2 = inp[:, :self.channels] / col(c_in), col(sigma ** 2)
        mean, var = torch.full_like(x, COND_MU), torch.full_like(x, COND_S ** 2)
        if self.conditional:  # [y * keep, keep]: the null condition widens the Gaussian
            y, flag = inp[:, self.channels:2 * self.channels], inp[:, -1:]
            mean, var = COND_MU + COND_A * y, COND_S ** 2 + COND_A ** 2 * COND_VY * (1 - flag)
        x0 = (var * x + sig2 * mean) / (var + sig2)
        return (x0 - col(c_skip) * x) / col(c_out)

    def forward(self, inp, c_noise):
        scale, shift = self.film(c_noise[:, None]).chunk(2, dim=1)  # (B, hidden) each
        h = nn.functional.silu(self.first(inp) * (1 + scale[..., None, None]) + shift[..., None, None])
        return self.exact(inp, c_noise) + self.last(h)


class ConditionalGaussianDenoiser(EDMDenoiser):
    """An EDMDenoiser (same attributes, forward and condition) around `ConditionalGaussianNet`."""

    def __init__(self, shape: DataShape):
        nn.Module.__init__(self)
        self.schedule, self.sigma_data = COND_SCHEDULE, COND_SCHEDULE.sigma_data
        self.conditional, self.classes = shape.conditional, shape.classes
        self.net = ConditionalGaussianNet(shape.channels, shape.conditional)


def conditional_teacher(conditional):
    torch.manual_seed(0)  # the correction network's init: results must not depend on test order
    shape = DataShape(channels=COND_SHAPE[0], image_size=COND_SHAPE[1], conditional=conditional)
    denoiser = ConditionalGaussianDenoiser(shape).eval().requires_grad_(False)
    return Teacher(name="diffusion", family="diffusion", params=DiffusionTeacherParams(),
                   shape=shape, denoiser=denoiser)


def conditional_data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = COND_VY ** 0.5 * torch.randn((n, *COND_SHAPE), generator=g)
    x0 = COND_MU + COND_A * y + COND_S * torch.randn((n, *COND_SHAPE), generator=g)
    return {"x0": x0, "y": y}


def unconditional_data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x0": COND_MU + COND_S * torch.randn((n, *COND_SHAPE), generator=g), "y": torch.zeros(n, *COND_SHAPE)}


# --- Gaussian bridge teacher (IBMD) -----------------------------------------------------------
# Per pixel x0 ~ N(BRIDGE_M, BRIDGE_V), y = x0 + N(0, BRIDGE_NOISE): p(x0 | y) =
# N(M + R (y - M), POST_VAR). For the bridge x_t = a y + b x0 + c eps both posterior means a
# teacher needs are linear in the inputs:
# - DDBM (sees y):   E[x0 | x_t, y] = mu + vp b/(b^2 vp + c^2) (x_t - a y - b mu),
#                    mu, vp the mean and variance of x0 | y;
# - I2SB (never y):  E[x0 | x_t] = m_x + (a C + b Vx)/Var(x_t) (x_t - a m_y - b m_x).
# `GaussianBridgeDenoiser`'s five numbers (m_x, m_y, Vx, Vy, C) are trainable parameters started
# at the truth (the teacher is exact); `widen_input` adds a zero-initialised linear map of the
# noise channels, so a one-step student x0 = mu(y) + w z is again a joint Gaussian.

BRIDGE_M, BRIDGE_V, BRIDGE_NOISE = 0.2, 0.25, 0.25
BRIDGE_R = BRIDGE_V / (BRIDGE_V + BRIDGE_NOISE)
BRIDGE_POST_VAR = BRIDGE_V * BRIDGE_NOISE / (BRIDGE_V + BRIDGE_NOISE)
BRIDGE_SHAPE = DataShape(channels=1, image_size=2, conditional=True)
BRIDGE_SCHEDULES = {"i2sb": BridgeScheduleParams(kind="i2sb"), "ddbm": BridgeScheduleParams(kind="vp")}


class GaussianBridgeDenoiser(nn.Module):
    """Exact bridge posterior mean for a jointly Gaussian (x0, y) per pixel (see above)."""

    def __init__(self, schedule, style):
        super().__init__()
        m, v, noise = BRIDGE_M, BRIDGE_V, BRIDGE_NOISE
        self.schedule = BridgeSchedule.of(schedule)
        self.sees_y = style == "ddbm"
        self.m_x, self.m_y = nn.Parameter(torch.tensor(m)), nn.Parameter(torch.tensor(m))
        self.log_vx = nn.Parameter(torch.tensor(math.log(v)))
        self.log_vy = nn.Parameter(torch.tensor(math.log(v + noise)))
        self.rho = nn.Parameter(torch.tensor(math.atanh(v / math.sqrt(v * (v + noise)))))
        self.z_weight = None  # (C, k) after widen_input(k)

    def forward(self, x_t, t, y, extra=None):
        a, b, c = (col(v) for v in self.schedule.marginal(t))
        vx, vy = self.log_vx.exp(), self.log_vy.exp()
        cov = torch.tanh(self.rho) * (vx * vy).sqrt()
        if self.sees_y:  # E[x0 | x_t, y]
            mu, vp = self.m_x + cov / vy * (y - self.m_y), vx - cov ** 2 / vy
            gain = vp * b / (b ** 2 * vp + c ** 2).clamp_min(1e-12)  # 0 at t = T (b = c = 0)
            out = mu + gain * (x_t - a * y - b * mu)
        else:  # E[x0 | x_t]
            var_xt = a ** 2 * vy + b ** 2 * vx + 2 * a * b * cov + c ** 2
            out = self.m_x + (a * cov + b * vx) / var_xt * (x_t - a * self.m_y - b * self.m_x)
        if extra is not None:
            out = out + torch.einsum("ck,bkhw->bchw", self.z_weight, extra)
        return out

    def widen_input(self, channels):
        self.z_weight = nn.Parameter(torch.zeros(BRIDGE_SHAPE.channels, channels))
        return self


def bridge_teacher(style):
    params = BridgeTeacherParams(style=style, schedule=BRIDGE_SCHEDULES[style], sigma_data=math.sqrt(BRIDGE_V),
                                 sigma_y=math.sqrt(BRIDGE_V + BRIDGE_NOISE), cov_xy=BRIDGE_V)
    denoiser = GaussianBridgeDenoiser(params.schedule, style).eval().requires_grad_(False)
    return Teacher(name="bridge", family="bridge", params=params, shape=BRIDGE_SHAPE, denoiser=denoiser)


def bridge_y(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = BRIDGE_M + math.sqrt(BRIDGE_V) * torch.randn(n, 1, 2, 2, generator=g)
    return x0 + math.sqrt(BRIDGE_NOISE) * torch.randn(x0.shape, generator=g)


# --- a throw-away distillation method, registered by the tests that need it ------------------

from pydantic import Field  # noqa: E402

from pipeline.distill import Registration  # noqa: E402
from pipeline.distill.base import Method, batch_noise, trainable_copy  # noqa: E402
from pipeline.config.settings import Params, TrainParams  # noqa: E402


class ThrowawayParams(Params):
    """A one-step student regressed onto the teacher's two-step DDIM output (a single round of
    progressive distillation, at one noise level): it exists to show that adding a method is
    one module, its params model and one registry line."""
    sigma: float = Field(80.0, gt=0.0)  # the noise level the student starts from
    sigma_mid: float = Field(1.0, gt=0.0)  # the teacher's intermediate DDIM level
    train: TrainParams = TrainParams(steps=2, batch_size=6, lr=1e-3, warmup_steps=0, log_every=1,
                                     checkpoint_every=2)


class Throwaway(Method):
    def build(self):
        return {"student": trainable_copy(self.teacher.denoiser)}

    def nfe_choices(self):
        return [1]

    def _start(self, x0, generator):
        return self.params.sigma * batch_noise(x0.shape, generator, x0.device)

    def loss(self, nets, batch, generator):
        x0, y = batch["x0"], batch["y"] if self.conditional else None
        p, teacher = self.params, self.teacher.denoiser
        x, sigma = self._start(x0, generator), torch.full((len(x0),), p.sigma)
        with torch.no_grad():  # two DDIM steps of the teacher: sigma -> sigma_mid -> 0
            d = teacher(x, sigma, y)
            x_mid = d + (p.sigma_mid / p.sigma) * (x - d)
            target = teacher(x_mid, torch.full_like(sigma, p.sigma_mid), y)
        return (nets["student"](x, sigma, y) - target).square().flatten(1).mean(1)

    def sample(self, student, y, noise, nfe, guidance=0.0):
        self.check_sample_args(nfe, guidance)
        x = self.params.sigma * noise.randn()
        return student(x, torch.full((len(x),), self.params.sigma), y)


THROWAWAY = Registration("diffusion", ThrowawayParams, "tests.helpers:Throwaway")


def perturb(student, seed=1, scale=0.3):
    """Random weights in a toy teacher's correction layer (`student.denoiser.net.last`): a
    student that is not the teacher."""
    g = torch.Generator().manual_seed(seed)
    last = student.denoiser.net.last
    with torch.no_grad():
        last.weight.copy_(scale * torch.randn(last.weight.shape, generator=g))
    return student
