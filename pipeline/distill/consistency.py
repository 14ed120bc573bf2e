"""Machinery shared by consistency distillation (CD) and Target-Driven Distillation (TDD).

Everything is in EDM sigma space, x = x0 + sigma eps (a VP z_t maps to x = z/alpha, alpha = 1
after the change of variables):
- `ConsistencyFunction`: f(x, sigma) = c_skip x + c_out F(c_in x, c_noise[, y]) with the CD
  boundary scalings (Song et al. 2023, Appendix C; Karras-style with the offset sigma_min),
  c_skip = sd^2/((s - smin)^2 + sd^2), c_out = (s - smin) sd/sqrt(s^2 + sd^2), so f(x, smin) = x;
  F is a trainable copy of the teacher's raw network, fed exactly as the teacher feeds it.
- `teacher_step`: one step of the teacher's PF-ODE (Heun, Euler, DDIM) with optional CFG on
  the x0 prediction (Ho & Salimans 2022); in sigma space eps = (x - x0)/sigma follows from x0.
- `ddim_jump`: the DDIM move from sigma to s < sigma given an x0 estimate (Song et al. 2021,
  Eq. 12): x_s = x0 + (s/sigma)(x - x0); s = 0 gives x0.
- `consistency_loss`: d(jump(f(x_hi, hi), s), sg jump(f_target(x_hat_lo, lo), s)); CD is the
  case s = 0, TDD picks s per sample (docs/methods/cd.md, docs/methods/tdd.md).
- `vp_timeline` / `vp_grid`: the discrete VP timeline TDD works on (also CD's grid="vp").
"""
import math

import torch
from torch import nn

from pipeline.distill.base import batch_noise, col
from pipeline.models.schedules import edm_precond, karras_sigmas, vp_sigma, vp_sigma_inv


# CD boundary scalings (Song et al. 2023, Appendix C): f(x, smin) = x exactly.
def boundary_scalings(sigma, sigma_min, sigma_data):
    """(c_skip, c_out), each shaped like `sigma`."""
    shifted = sigma - sigma_min
    c_skip = sigma_data ** 2 / (shifted ** 2 + sigma_data ** 2)
    c_out = shifted * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    return c_skip, c_out


def raw_output(denoiser, x, sigma, y=None, keep=None):
    """F(c_in x, c_noise[, condition]): the raw network of an `EDMDenoiser`-like module, fed as
    `EDMDenoiser.forward` feeds it (y=None: the null condition; keep (B,) bool drops y)."""
    _, _, c_in, c_noise = edm_precond(sigma, denoiser.sigma_data)
    return denoiser.net_call(col(c_in) * x, c_noise, y, keep)


class ConsistencyFunction(nn.Module):
    """f(x, sigma, y, keep=None): an x0 estimate with f(x, sigma_min) = x (Song et al. 2023,
    Eq. 7 / Appendix C), around the teacher's raw network (its c_in, c_noise, condition)."""

    def __init__(self, denoiser: nn.Module, sigma_min: float):
        super().__init__()
        self.denoiser = denoiser  # only its .net is evaluated; its other attributes configure it
        self.sigma_min = sigma_min
        self.sigma_data = denoiser.sigma_data
        self.schedule = denoiser.schedule

    def forward(self, x, sigma, y=None, keep=None):
        c_skip, c_out = boundary_scalings(sigma, self.sigma_min, self.sigma_data)
        return col(c_skip) * x + col(c_out) * raw_output(self.denoiser, x, sigma, y, keep)


# Classifier-free guidance on the x0 prediction, c + w (c - u) (Ho & Salimans 2022); the
# conditional branch honours `keep` (a dropped condition makes it the unconditional one).
def guided_x0(denoiser, x, sigma, y, keep=None, guidance=0.0):
    """1 call when guidance == 0 (or no y), else 2."""
    cond = denoiser(x, sigma, y, keep)
    if guidance == 0 or y is None:
        return cond
    return cond + guidance * (cond - denoiser(x, sigma, None))


def ddim_jump(x, x0, sigma, s):
    """DDIM (eta = 0) from sigma to s <= sigma, both (B,): x0 + (s/sigma)(x - x0)."""
    return x0 + col(s / sigma) * (x - x0)


# One teacher step of the PF-ODE dx/dsigma = (x - D)/sigma from hi to lo (Karras et al. 2022,
# Alg. 1): "euler" and "ddim" are the same first-order step (written as in each paper),
# "heun" adds the trapezoidal correction (2 evaluations; Euler when lo = 0).
@torch.no_grad()
def teacher_step(denoiser, x, hi, lo, y, keep=None, solver="heun", guidance=0.0):
    """x_hat at lo (B,) from x at hi (B,), guided with scale `guidance`."""
    x0 = guided_x0(denoiser, x, hi, y, keep, guidance)
    if solver == "ddim":
        return ddim_jump(x, x0, hi, lo)
    slope = (x - x0) / col(hi)
    x_lo = x + col(lo - hi) * slope
    if solver == "euler" or bool((lo == 0).any()):
        return x_lo
    slope_lo = (x_lo - guided_x0(denoiser, x_lo, lo, y, keep, guidance)) / col(lo)
    return x + col(lo - hi) * 0.5 * (slope + slope_lo)


def distance(a, b, kind="l2", c=0.03):
    """Per-sample (B,): l2 = mean square over pixels; pseudo_huber = sqrt(l2 + c^2) - c
    (Song & Dhariwal 2023, Sec. 3.3, on the per-pixel mean square); pseudo_huber_elementwise
    = the mean over pixels of sqrt((a - b)^2 + c^2) - c (TDD's public training code)."""
    sq = (a - b).square().flatten(1)
    if kind == "pseudo_huber_elementwise":
        return ((sq + c ** 2).sqrt() - c).mean(1)
    d2 = sq.mean(1)
    if kind == "l2":
        return d2
    return (d2 + c ** 2).sqrt() - c


def draw_pairs(points, x0, generator):
    """n ~ U{0, ..., points - 2} (B,) and eps ~ N(0, I): the pair (t_{n+1}, t_n) of a grid of
    `points` times and its noise. CD and TDD draw exactly these, in this order."""
    n = torch.randint(0, points - 1, (len(x0),), generator=generator)
    return n, batch_noise(x0.shape, generator, x0.device)


def consistency_loss(student, target, teacher, x0, y, keep, hi, lo, s, eps, step, dist):
    """d(jump_s f(x_hi, hi), sg jump_s f_target(x_hat_lo, lo)) per sample (B,) (Song et al.
    2023, Eq. 10 at s = 0; Wang et al. 2024, TDD, for s > 0).
    hi, lo, s: (B,) sigmas with s <= lo < hi; `step(teacher, x, hi, lo, y, keep)` is the
    teacher's ODE step; `dist(a, b)` the distance. Compared in VP space: z_s = x_s/sqrt(1+s^2)."""
    x_hi = x0 + col(hi) * eps
    x_lo = step(teacher, x_hi, hi, lo, y, keep)
    alpha_s = col(1 / (1 + s ** 2).sqrt())  # exactly 1 at s = 0
    pred = ddim_jump(x_hi, student(x_hi, hi, y, keep), hi, s)
    with torch.no_grad():
        goal = ddim_jump(x_lo, target(x_lo, lo, y, keep), lo, s)
    return dist(alpha_s * pred, alpha_s * goal)


def karras_grid(points, schedule):
    """(points,) float64 sigmas, ascending from sigma_min to sigma_max (Karras Eq. 5)."""
    return karras_sigmas(points, schedule.sigma_min, schedule.sigma_max, schedule.rho)[:-1].flip(0)


def vp_timeline(timesteps, schedule):
    """(timesteps,) float64 sigmas of the discrete VP timeline i = 0 .. timesteps-1: uniform in
    VP time (Song et al. 2021; EDM Table 1) from sigma_min (i = 0) to sigma_max (i = T-1)."""
    t_min, t_max = vp_sigma_inv(schedule.sigma_min), vp_sigma_inv(schedule.sigma_max)
    sigmas = vp_sigma(torch.linspace(t_min, t_max, timesteps, dtype=torch.float64))
    sigmas[0], sigmas[-1] = schedule.sigma_min, schedule.sigma_max  # exact endpoints
    return sigmas


def vp_grid(timesteps, points):
    """(points,) int64 timeline indices, ascending from 0 to timesteps-1, equally spaced:
    the DDIM grid (skip ~ timesteps/points) that the training pairs live on."""
    return torch.linspace(0, timesteps - 1, points, dtype=torch.float64).round().long()


def renoise(x0, sigma, sigma_min, noise):
    """x0 + sqrt(sigma^2 - sigma_min^2) z, z from `noise` (Song et al. 2023, Alg. 1)."""
    return x0 + math.sqrt(max(sigma ** 2 - sigma_min ** 2, 0.0)) * noise.randn()


def full(x, value):
    """A (B,) tensor of the float `value`, in x's dtype and device."""
    return torch.full((len(x),), float(value), dtype=x.dtype, device=x.device)


# Multistep consistency sampling (Song et al. 2023, Alg. 1): x0 = f(sigma_max z, sigma_max),
# then for each further sigma: re-noise and apply f again; nfe = len(sigmas) calls.
def multistep_sample(f, y, noise, sigmas, sigma_min):
    """`sigmas` descending floats starting at sigma_max; f(x, sigma (B,), y) an x0 estimate."""
    x = sigmas[0] * noise.randn()
    x0 = f(x, full(x, sigmas[0]), y)
    for sigma in sigmas[1:]:
        x = renoise(x0, sigma, sigma_min, noise)
        x0 = f(x, full(x, sigma), y)
    return x0
