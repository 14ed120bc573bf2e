"""Training-free samplers for the EDM-space diffusion teacher (docs/teachers.md).

Shared signature: `run(denoise, y, noise, steps, schedule, guidance=0.0, grid="fair") -> x`
- `denoise(x, sigma, y) -> x0_hat`, sigma a (B,) tensor, y the condition (None = null).
- `noise`: a `SeededNoise` of the sample shape; ALL randomness comes from it, so a
  sample does not depend on its batch. The start is x = sigma_max * noise.randn().
- `steps`: sampler steps N (not NFE); `schedule`: an `EDMSchedule`.
- `guidance` w: classifier-free guidance D = D(x,s,y) + w (D(x,s,y) - D(x,s,None));
  an evaluation costs 2 NFE when w != 0 and 1 when w == 0.
- `grid`: "fair" (default) or "edm", which levels the calls are made at
  (`schedules.step_sigmas`): EDM's grid ends with a call at sigma_min that does almost
  nothing; the fair grid puts every call where it does work.
Returns the raw final x (callers clip).

NFE of N steps (k = 2 if guidance else 1): ddim, ddpm, euler, dpmpp_2m: k N;
heun: k (2N - 1). The `*_nfe(steps, guidance)` functions state it for the registry.

DDIM (eta = 0) in sigma space is exactly Euler on the PF-ODE (Karras et al. 2022,
Sec. 3); `ddim` and `euler` differ only by their grid (VP-uniform vs Karras).
"""
import math

import torch

from pipeline.models.schedules import step_sigmas


def guided(denoise, x, sigma, y, guidance):
    """Classifier-free guidance (Ho & Salimans 2022) at the float noise level `sigma`
    shared by the batch: 1 call when w == 0, else 2 (never batched together)."""
    sigma = torch.full((x.shape[0],), float(sigma), dtype=x.dtype, device=x.device)   # (B,)
    d_cond = denoise(x, sigma, y)
    if guidance == 0:
        return d_cond
    return d_cond + guidance * (d_cond - denoise(x, sigma, None))


def _evals(guidance):
    return 1 if guidance == 0 else 2


def one_eval_per_step_nfe(steps, guidance=0.0):
    return steps * _evals(guidance)


def heun_nfe(steps, guidance=0.0):
    return (2 * steps - 1) * _evals(guidance)


# DDIM, eta = 0 (Song et al. 2021, Eq. 12), in sigma space: x_next = D + (s_next/s)(x - D),
# on the VP-uniform spacing (`schedules.step_sigmas`).
def ddim(denoise, y, noise, steps, schedule, guidance=0.0, grid="fair"):
    sigmas = step_sigmas("vp", steps, schedule, grid).tolist()
    x = schedule.sigma_max * noise.randn()
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = guided(denoise, x, s, y, guidance)
        x = d + (s_next / s) * (x - d)
    return x


# DDPM ancestral sampling (Ho et al. 2020, Eq. 6-7): x_next ~ q(x_next | x, x0 = D), in sigma space
# mean D + (s_next/s)^2 (x - D), variance s_next^2 (1 - (s_next/s)^2); on the VP-uniform grid.
def ddpm(denoise, y, noise, steps, schedule, guidance=0.0, grid="fair"):
    sigmas = step_sigmas("vp", steps, schedule, grid).tolist()
    x = schedule.sigma_max * noise.randn()
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = guided(denoise, x, s, y, guidance)
        ratio2 = (s_next / s) ** 2
        x = d + ratio2 * (x - d)
        if s_next > 0:
            x = x + s_next * (1 - ratio2) ** 0.5 * noise.randn()
    return x


# Euler on the PF-ODE dx/dsigma = (x - D)/sigma (Karras et al. 2022, Eq. 3), Karras grid (Eq. 5).
def euler(denoise, y, noise, steps, schedule, guidance=0.0, grid="fair"):
    sigmas = step_sigmas("karras", steps, schedule, grid).tolist()
    x = schedule.sigma_max * noise.randn()
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = guided(denoise, x, s, y, guidance)
        x = x + (s_next - s) * (x - d) / s
    return x


# EDM Algorithm 1 (Karras et al. 2022), deterministic: Heun's 2nd-order method on the PF-ODE,
# Karras grid; the last step to sigma = 0 is Euler, so N steps cost 2N - 1 evaluations.
def heun(denoise, y, noise, steps, schedule, guidance=0.0, grid="fair"):
    sigmas = step_sigmas("karras", steps, schedule, grid).tolist()
    x = schedule.sigma_max * noise.randn()
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        slope = (x - guided(denoise, x, s, y, guidance)) / s
        x_next = x + (s_next - s) * slope
        if s_next > 0:
            slope_next = (x_next - guided(denoise, x_next, s_next, y, guidance)) / s_next
            x_next = x + (s_next - s) * 0.5 * (slope + slope_next)
        x = x_next
    return x


# DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), data prediction, multistep in lambda = -log sigma,
# on the Karras grid; the first step and the last (to sigma = 0) are first order.
def dpmpp_2m(denoise, y, noise, steps, schedule, guidance=0.0, grid="fair"):
    sigmas = step_sigmas("karras", steps, schedule, grid).tolist()
    x = schedule.sigma_max * noise.randn()
    d_prev, h_prev = None, None
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = guided(denoise, x, s, y, guidance)
        if s_next == 0:
            return d                                   # lambda = +inf: the step lands on D
        h = math.log(s / s_next)                       # lambda_next - lambda
        d_eff = d
        if d_prev is not None:
            r = h_prev / h
            d_eff = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * d_prev
        x = (s_next / s) * x - math.expm1(-h) * d_eff
        d_prev, h_prev = d, h
    return x
