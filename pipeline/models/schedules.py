"""Noise schedules and EDM preconditioning for the diffusion teacher.

Everything lives in EDM sigma space (Karras et al. 2022, "Elucidating the
Design Space of Diffusion-Based Generative Models"): `x_sigma = x0 + sigma*eps`,
sigma in [sigma_min, sigma_max]. A VP model's `z_t = alpha_t x0 + sigma_t eps`
maps onto it by `x = z / alpha`, `sigma = sigma_t / alpha_t`, so DDIM/DDPM are
written here as samplers on a sigma grid (see `vp_sigmas`).

Sigma grids are returned in float64: samplers turn each entry into a (B,)
tensor of the sample's dtype.
"""
import math

import torch

from pipeline.config.settings import EDMSchedule  # noqa: F401  (re-exported for callers)

# VP linear-beta SDE of Song et al. 2021 (beta(t) = beta_min + beta_d t), used
# for the DDIM/DDPM grid; the constants are EDM's (Table 1, "VP" column).
VP_BETA_MIN = 0.1
VP_BETA_D = 19.9


# EDM preconditioning, Karras et al. 2022 Table 1:
# c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2), c_noise = ln(s)/4.
def edm_precond(sigma, sigma_data):
    """(c_skip, c_out, c_in, c_noise), each shaped like `sigma` (a tensor)."""
    var = sigma ** 2 + sigma_data ** 2
    c_skip = sigma_data ** 2 / var
    c_out = sigma * sigma_data / var.sqrt()
    c_in = 1 / var.sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


# EDM loss weight lambda(sigma) = 1/c_out^2 (Karras et al. 2022, Table 1 / Eq. 8):
# makes the effective network target unit-variance at every sigma.
def edm_loss_weight(sigma, sigma_data):
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


# Training noise levels ln(sigma) ~ N(P_mean, P_std^2) (Karras et al. 2022, Table 1).
def sample_training_sigma(n, schedule, generator=None):
    """(n,) float32 sigmas on the generator's device (CPU when generator is None)."""
    device = generator.device if generator is not None else "cpu"
    z = torch.randn(n, generator=generator, device=device)
    return (schedule.P_mean + schedule.P_std * z).exp()


# Karras et al. 2022, Eq. 5: sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho,
# followed by sigma_N = 0.
def karras_sigmas(steps, sigma_min, sigma_max, rho=7.0):
    """(steps+1,) float64, descending from sigma_max to sigma_min, then a trailing 0."""
    _check_steps(steps)
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64) if steps > 1 else torch.zeros(1, dtype=torch.float64)
    inv_max, inv_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (inv_max + ramp * (inv_min - inv_max)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


# VP linear-beta SDE (Song et al. 2021; EDM Table 1): sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1).
def vp_sigma(t, beta_min=VP_BETA_MIN, beta_d=VP_BETA_D):
    return torch.expm1(0.5 * beta_d * t ** 2 + beta_min * t).sqrt()


# Inverse of `vp_sigma` (EDM Table 1, sigma^-1 for VP): solve beta_d t^2/2 + beta_min t = log(1 + sigma^2).
def vp_sigma_inv(sigma, beta_min=VP_BETA_MIN, beta_d=VP_BETA_D):
    return ((beta_min ** 2 + 2 * beta_d * math.log1p(sigma ** 2)) ** 0.5 - beta_min) / beta_d


# The DDIM/DDPM grid: uniform in the VP SDE's time (EDM Table 1, "VP" time steps), here between
# t(sigma_max) and t(sigma_min) so that every sampler shares one sigma range.
def vp_sigmas(steps, sigma_min, sigma_max):
    """(steps+1,) float64, descending from sigma_max to sigma_min, then a trailing 0."""
    _check_steps(steps)
    t_max, t_min = vp_sigma_inv(sigma_max), vp_sigma_inv(sigma_min)
    t = torch.linspace(t_max, t_min, steps, dtype=torch.float64) if steps > 1 else torch.tensor(
        [t_max], dtype=torch.float64)
    sigmas = vp_sigma(t)
    sigmas[0] = sigma_max                   # exact endpoints despite round-off in the inverse
    if steps > 1:
        sigmas[-1] = sigma_min
    return torch.cat([sigmas, sigmas.new_zeros(1)])


# Which levels a one-call-per-step sampler evaluates (docs/teachers.md, "Step grids").
GRIDS = ("fair", "edm")


def step_sigmas(spacing, steps, schedule, grid="fair"):
    """(steps+1,) float64 levels, descending, ending at 0, for `steps` steps of one network call
    each (the call at level i moves the sample from level i to level i+1).

    spacing: "karras" (EDM Eq. 5, rho of the schedule) or "vp" (uniform in VP time).
    grid "edm": the `steps`-point grid from sigma_max down to sigma_min, then 0 (EDM and
    k-diffusion): the last call is at sigma_min, where the denoiser is nearly the identity, so
    it does almost no work. grid "fair": the (steps+1)-point grid with its last point,
    sigma_min, replaced by 0: every call is at a level where it does work. One step is
    [sigma_max, 0] on both."""
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
    points = steps if grid == "edm" else steps + 1
    if spacing == "karras":
        levels = karras_sigmas(points, schedule.sigma_min, schedule.sigma_max, schedule.rho)
    else:
        levels = vp_sigmas(points, schedule.sigma_min, schedule.sigma_max)
    if grid == "fair":
        levels = torch.cat([levels[:steps], levels.new_zeros(1)])
    return levels


def _check_steps(steps):
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
