"""The teacher samplers against independent implementations of their published updates.

The project's diffusion samplers work in EDM sigma space, x = x0 + sigma eps. The references
below are written from the papers in VP coordinates instead, z_t = alpha_t x0 + sigma_t eps, on
the linear-beta VP SDE of Song et al. 2021 (beta(t) = beta_min + beta_d t), with an exact
x0-predicting denoiser E[x0 | z_t] written in those coordinates. They use nothing of
pipeline.samplers or pipeline.models.schedules: grids, time maps and updates are rebuilt here from
their definitions. The two must agree to round-off (float64, 1e-10).

Coordinate map (EDM, Karras et al. 2022, Table 1, "VP" column): x = z_t / alpha_t and
sigma_edm(t) = sigma_t / alpha_t, so sigma_edm = 0 is t = 0 (alpha = 1): a VP sample at t = 0
is directly comparable with the project's x at sigma = 0.

Also here: the "fair" step grid's 1 -> 2 NFE gain (and its absence on the "edm" grid), and the
law of the stochastic bridge samplers on a conditional Gaussian toy, computed exactly.
"""
import math
from itertools import pairwise

import pytest
import torch

from pipeline.models.bridge import BridgeSchedule
from pipeline.evaluation.noise import SeededNoise
from pipeline.samplers import BRIDGE_SAMPLERS, DIFFUSION_SAMPLERS, sample
from pipeline.models.schedules import step_sigmas
from pipeline.config.settings import EDMSchedule
from tests.helpers import exact_bridge_denoiser, exact_gaussian_denoiser

F64 = torch.float64
SHAPE = (1, 2, 2)
EDM = EDMSchedule()
SIGMA_MIN, SIGMA_MAX, RHO = EDM.sigma_min, EDM.sigma_max, EDM.rho     # 0.002, 80, 7
MU, S = 0.3, 0.5                                                      # x0 ~ N(MU, S^2) per pixel
TOL = 1e-10


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: torch splits even a 129-element float64 exp over its threads, and on a busy
    2-core machine that hand-off costs ~2 ms a call (1000x). Per test, after conftest's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- the VP SDE of Song et al. 2021, linear beta (EDM Table 1: beta_min = 0.1, beta_d = 19.9) ----
BETA_MIN, BETA_D = 0.1, 19.9


def _log_inv_alpha2(t):
    """-log alpha_t^2 = int_0^t beta(u) du = beta_min t + beta_d t^2 / 2."""
    return BETA_MIN * t + 0.5 * BETA_D * t * t


def vp_alpha(t):
    return math.exp(-0.5 * _log_inv_alpha2(t))


def vp_sigma(t):
    """sqrt(1 - alpha_t^2), through expm1 so that it stays accurate near t = 0."""
    return math.sqrt(-math.expm1(-_log_inv_alpha2(t)))


def vp_edm_sigma(t):
    """sigma_edm(t) = sigma_t / alpha_t = sqrt(exp(int beta) - 1)."""
    return math.sqrt(math.expm1(_log_inv_alpha2(t)))


def vp_time(sigma_edm):
    """The VP time of an EDM level: the root t >= 0 of beta_d t^2/2 + beta_min t = log(1 + sigma^2)."""
    c = math.log1p(sigma_edm ** 2)
    return 2 * c / (BETA_MIN + math.sqrt(BETA_MIN ** 2 + 2 * BETA_D * c))   # cancellation-free root


def vp_lambda(t):
    """Half log-SNR, lambda_t = log(alpha_t / sigma_t) (DPM-Solver)."""
    return math.log(vp_alpha(t) / vp_sigma(t))


# ---- grids, rebuilt from their definitions, as VP times ending at t = 0 ----------------------

def karras_levels(n):
    """EDM Eq. 5: n levels from sigma_max to sigma_min, uniform in sigma^(1/rho) (n = 1: sigma_max)."""
    a, b = SIGMA_MAX ** (1 / RHO), SIGMA_MIN ** (1 / RHO)
    return [(a + (i / (n - 1) if n > 1 else 0.0) * (b - a)) ** RHO for i in range(n)]


def vp_uniform_times(n):
    """n VP times uniform between t(sigma_max) and t(sigma_min) (n = 1: t(sigma_max))."""
    t_max, t_min = vp_time(SIGMA_MAX), vp_time(SIGMA_MIN)
    return [t_max + (i / (n - 1) if n > 1 else 0.0) * (t_min - t_max) for i in range(n)]


def grid_times(spacing, steps, grid):
    """steps + 1 VP times, descending, ending at 0 (sigma_edm = 0); each step is one call at its start.

    "edm": the steps-point grid down to sigma_min, then 0. "fair": the (steps + 1)-point grid with
    its last point (sigma_min) replaced by 0."""
    n = steps if grid == "edm" else steps + 1
    times = [vp_time(s) for s in karras_levels(n)] if spacing == "karras" else vp_uniform_times(n)
    return times[:steps] + [0.0]


SPACING = {"ddim": "vp", "ddpm": "vp", "euler": "karras", "heun": "karras", "dpmpp_2m": "karras"}


# ---- exact Gaussian denoisers, in VP coordinates (reference) and EDM coordinates (project) -----
# Conditional toy for guidance: x0 | y ~ N(MU + A y, S^2), y ~ N(0, VY); the null condition
# denoises the marginal N(MU, S^2 + A^2 VY).
A, VY = 0.8, 0.25


def vp_x0(z, t, mean, var):
    """E[x0 | z_t] for x0 ~ N(mean, var): z_t ~ N(alpha mean, alpha^2 var + sigma^2), linear regression."""
    a, s = vp_alpha(t), vp_sigma(t)
    return mean + a * var / (a * a * var + s * s) * (z - a * mean)


def vp_denoiser(y, guidance):
    """D(z, t) in VP coordinates, classifier-free guided (Ho & Salimans 2022): their
    eps_w = (1 + w) eps_c - w eps_u at one z is, through eps = (z - alpha x0)/sigma, the same
    combination of the x0 predictions, x0_w = (1 + w) x0_c - w x0_u."""
    if guidance == 0:
        return lambda z, t: vp_x0(z, t, MU, S ** 2)
    def guided(z, t):
        cond = vp_x0(z, t, MU + A * y, S ** 2)
        return (1 + guidance) * cond - guidance * vp_x0(z, t, MU, S ** 2 + A ** 2 * VY)
    return guided


def edm_conditional_denoiser(x, sigma, y):
    """The same conditional toy in EDM coordinates, for the project's sampler."""
    mean, var = (MU, S ** 2 + A ** 2 * VY) if y is None else (MU + A * y, S ** 2)
    sig2 = sigma.view(-1, 1, 1, 1) ** 2
    return (var * x + sig2 * mean) / (var + sig2)


# ---- the reference samplers, in VP coordinates ------------------------------------------------
# Each takes the VP times (ending at 0), the VP denoiser D(z, t) and an iterator over the noise
# draws in the project's order. Start: the project's x = sigma_max n0 in EDM space is
# z_T = alpha_T x = sigma_T n0 at T = t(sigma_max) (sigma_T / alpha_T = sigma_max).

def _start(times, draws):
    return vp_sigma(times[0]) * next(draws)


def ref_ddim(times, D, draws):
    """DDIM, eta = 0 (Song et al. 2021, Eq. 12): z_s = alpha_s x0_hat + sigma_s eps_hat,
    eps_hat = (z_t - alpha_t x0_hat) / sigma_t (at s = 0: z = x0_hat)."""
    z = _start(times, draws)
    for t, s in pairwise(times):
        x0 = D(z, t)
        eps = (z - vp_alpha(t) * x0) / vp_sigma(t)
        z = vp_alpha(s) * x0 + vp_sigma(s) * eps
    return z


def ref_ddpm(times, D, draws):
    """DDPM ancestral (Ho et al. 2020, Eq. 6-7): z_s ~ q(z_s | z_t, x0 = x0_hat), with the step's
    alpha_{t|s}^2 = alpha_t^2/alpha_s^2, beta_{t|s} = 1 - alpha_{t|s}^2 (Ho's alpha_t, beta_t):
    mean = alpha_s beta/sigma_t^2 x0_hat + alpha_{t|s} sigma_s^2/sigma_t^2 z_t,
    variance = sigma_s^2/sigma_t^2 beta. The step to s = 0 has variance 0 (no draw) and mean x0_hat."""
    z = _start(times, draws)
    for t, s in pairwise(times):
        x0 = D(z, t)
        beta = -math.expm1(_log_inv_alpha2(s) - _log_inv_alpha2(t))      # 1 - alpha_t^2/alpha_s^2
        a_ts, st2, ss2 = vp_alpha(t) / vp_alpha(s), vp_sigma(t) ** 2, vp_sigma(s) ** 2
        z = vp_alpha(s) * beta / st2 * x0 + a_ts * ss2 / st2 * z
        if s > 0:
            z = z + math.sqrt(ss2 / st2 * beta) * next(draws)
    return z


# The PF-ODE in DDIM's Eq. 14 coordinates, x_bar = z/alpha, sigma_bar = sigma/alpha:
# d x_bar = eps_hat d sigma_bar. These are EDM's (x, sigma), and this ODE is EDM Alg. 1 with
# sigma(t) = t, s(t) = 1 (slope d = (x - D)/sigma = eps_hat), so Euler and Heun step in sigma_bar.
def _eps_hat(D, z, t):
    return (z - vp_alpha(t) * D(z, t)) / vp_sigma(t)


def ref_euler(times, D, draws):
    """First-order version of EDM Alg. 1 (deterministic): x_bar' = x_bar + (sigma_bar' - sigma_bar) eps_hat."""
    z = _start(times, draws)
    for t, s in pairwise(times):
        x_bar = z / vp_alpha(t) + (vp_edm_sigma(s) - vp_edm_sigma(t)) * _eps_hat(D, z, t)
        z = vp_alpha(s) * x_bar
    return z


def ref_heun(times, D, draws):
    """EDM Alg. 1 (deterministic, S_churn = 0): Euler predictor; where sigma_bar' != 0 the
    trapezoidal corrector with eps_hat re-evaluated at the prediction."""
    z = _start(times, draws)
    for t, s in pairwise(times):
        h = vp_edm_sigma(s) - vp_edm_sigma(t)
        d = _eps_hat(D, z, t)
        x_bar = z / vp_alpha(t) + h * d
        if s > 0:
            d_next = _eps_hat(D, vp_alpha(s) * x_bar, s)
            x_bar = z / vp_alpha(t) + h * 0.5 * (d + d_next)
        z = vp_alpha(s) * x_bar
    return z


def ref_dpmpp_2m(times, D, draws):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), data prediction, multistep in lambda:
    h_i = lambda_i - lambda_{i-1}, r_i = h_{i-1}/h_i, D_i = (1 + 1/(2 r_i)) x0_{i-1} - 1/(2 r_i) x0_{i-2},
    z_i = (sigma_i/sigma_{i-1}) z_{i-1} - alpha_i (e^{-h_i} - 1) D_i; first step first order
    (D_1 = x0_0). The last step, to sigma = 0 (lambda = +inf), is first order and lands on x0_hat."""
    z = _start(times, draws)
    x0_prev = h_prev = None
    for t, s in pairwise(times):
        x0 = D(z, t)
        if s == 0:
            return x0                       # sigma_s/sigma_t = 0, alpha_s = 1, e^{-h} = 0
        h = vp_lambda(s) - vp_lambda(t)
        d = x0
        if x0_prev is not None:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
        z = vp_sigma(s) / vp_sigma(t) * z - vp_alpha(s) * math.expm1(-h) * d
        x0_prev, h_prev = x0, h
    raise AssertionError("the grid ends at 0")


REFERENCES = {"ddim": ref_ddim, "ddpm": ref_ddpm, "euler": ref_euler, "heun": ref_heun,
              "dpmpp_2m": ref_dpmpp_2m}


class CountingNoise(SeededNoise):
    """SeededNoise that counts its draws (to check the project draws what the reference uses)."""

    draws = 0

    def randn(self):
        self.draws += 1
        return super().randn()


# ---- the reference itself -----------------------------------------------------------------------

def test_vp_coordinates_are_consistent():
    for t in (1e-6, 1e-3, 0.1, 0.5, 0.93):
        assert vp_alpha(t) ** 2 + vp_sigma(t) ** 2 == pytest.approx(1, abs=1e-15)
        assert vp_edm_sigma(t) == pytest.approx(vp_sigma(t) / vp_alpha(t), rel=1e-13)
        assert vp_time(vp_edm_sigma(t)) == pytest.approx(t, rel=1e-13)
        assert vp_lambda(t) == pytest.approx(-math.log(vp_edm_sigma(t)), rel=1e-13)
    for sigma in (SIGMA_MIN, 1.0, SIGMA_MAX):
        assert vp_edm_sigma(vp_time(sigma)) == pytest.approx(sigma, rel=1e-13)
    # The VP denoiser is E[x0 | z]: with z = alpha x it is the EDM-space posterior mean.
    x, t = torch.linspace(-3, 3, 7, dtype=F64), 0.4
    sig2 = vp_edm_sigma(t) ** 2
    assert torch.allclose(vp_x0(vp_alpha(t) * x, t, MU, S ** 2), (S ** 2 * x + sig2 * MU) / (S ** 2 + sig2),
                          rtol=0, atol=1e-14)


@pytest.mark.parametrize("grid", ["fair", "edm"])
@pytest.mark.parametrize("spacing", ["karras", "vp"])
@pytest.mark.parametrize("steps", [1, 2, 3, 5, 8])
def test_step_grids_match_their_definitions(spacing, steps, grid):
    """Diagnostic for the sampler tests: the project's levels are the reference's, mapped to EDM."""
    ours = torch.tensor([vp_edm_sigma(t) for t in grid_times(spacing, steps, grid)], dtype=F64)
    theirs = step_sigmas(spacing, steps, EDM, grid)
    assert theirs.shape == ours.shape and theirs[-1] == 0
    assert torch.allclose(theirs, ours, rtol=1e-12, atol=0), (theirs, ours)


# ---- 1. the diffusion samplers match their papers -------------------------------------------------

N_REF = 16
CASES = ([(name, grid, steps, 0.0) for name in DIFFUSION_SAMPLERS for grid in ("fair", "edm")
          for steps in (1, 2, 3, 5, 8)]
         + [(name, grid, steps, 1.5) for name in DIFFUSION_SAMPLERS for grid in ("fair", "edm")
            for steps in (2, 5)])


@pytest.mark.parametrize("name,grid,steps,guidance", CASES)
def test_diffusion_sampler_matches_its_paper_in_vp_coordinates(name, grid, steps, guidance):
    seeds = list(range(100, 100 + N_REF))
    if guidance == 0:
        y, denoise = None, exact_gaussian_denoiser(MU, S)
        y_ref = None
    else:
        y = torch.linspace(-0.6, 0.6, N_REF, dtype=F64).view(-1, 1, 1, 1).expand(N_REF, *SHAPE)
        denoise, y_ref = edm_conditional_denoiser, y
    noise = CountingNoise(seeds, SHAPE, dtype=F64)
    x = DIFFUSION_SAMPLERS[name].run(denoise, y, noise, steps, EDM, guidance=guidance, grid=grid)

    # Same draws in the same order: one for the start, plus one per DDPM step except the last.
    n_draws = steps if name == "ddpm" else 1
    assert noise.draws == n_draws
    ref_noise = SeededNoise(seeds, SHAPE, dtype=F64)
    draws = iter([ref_noise.randn() for _ in range(n_draws)])
    ref = REFERENCES[name](grid_times(SPACING[name], steps, grid), vp_denoiser(y_ref, guidance), draws)
    assert next(draws, None) is None                                   # every draw used

    assert x.shape == ref.shape == (N_REF, *SHAPE) and x.dtype == F64
    # Round-off is relative: Heun's 2-step "edm" output reaches |x| ~ 100 (error 2e-11 there); elsewhere
    # |x| <= 5 and the largest error is 3e-14.
    err = ((x - ref).abs() / (1 + ref.abs())).max().item()
    assert err <= TOL, f"{name} {grid} steps={steps} w={guidance}: max |x - ref|/(1 + |ref|) = {err:.3e}"


# ---- 2. the fair grid: the second call does work ----------------------------------------------------

N_PROP = 4000


@pytest.mark.parametrize("name", ["ddim", "ddpm", "euler", "dpmpp_2m"])
def test_fair_grid_second_call_does_work_edm_grid_second_call_does_not(name):
    def run(nfe, grid):
        x, used = sample(DIFFUSION_SAMPLERS[name], exact_gaussian_denoiser(MU, S), None,
                         SeededNoise(range(N_PROP), SHAPE, dtype=F64), nfe, EDM, grid=grid)
        assert used == nfe
        return x

    one = run(1, "fair")
    assert torch.equal(one, run(1, "edm"))                   # one step is [sigma_max, 0] on both grids
    two_fair, two_edm = run(2, "fair"), run(2, "edm")
    std1, std_fair, std_edm = one.std().item(), two_fair.std().item(), two_edm.std().item()
    # Measured: 1 NFE 0.0031; 2 NFE fair 0.084 (ddim, ddpm), 0.095 (euler, dpmpp_2m); 2 NFE edm <= 0.0052.
    assert abs(std_fair - S) < abs(std1 - S) - 0.05, (std1, std_fair)
    assert std1 < 0.02 and std_edm < 0.02, (std1, std_edm)
    assert (two_edm - one).abs().max().item() < 0.02       # the call at sigma_min is nearly the identity


# ---- 3. bridge samplers: the law they draw, on the conditional Gaussian toy ---------------------------
# x0 | y ~ N(m(y), V) per pixel with the exact DDBM-style denoiser E[x0 | x_t, y]. Every operation of
# the samplers is affine in x, so given y the output is m_N + sum_k g_k n_k over the noise draws n_k:
# a Gaussian whose mean and variance are computed exactly (no Monte Carlo error) by running the
# sampler on one batch whose row 0 gets all-zero noise (-> m_N) and row k + 1 a unit impulse in draw k
# only (-> m_N + g_k). test_samplers.py already checks posterior's sample mean and std on both kinds,
# euler/heun's on "vp" and their per-sample flow on both kinds, and posterior_ode's output at 10 NFE.

M_OF_Y = lambda y: 0.6 * y + 0.1
V = 0.05
Y_PIXELS = torch.tensor([-0.8, -0.2, 0.3, 0.9], dtype=F64).view(1, *SHAPE)


class ImpulseNoise:
    """Duck-typed SeededNoise: draw k is zero except in row k + 1 (where it is 1)."""

    def __init__(self, rows):
        self.rows, self.draws = rows, 0

    def randn(self):
        n = torch.zeros(self.rows, *SHAPE, dtype=F64)
        n[self.draws + 1] = 1.0
        self.draws += 1
        return n


def exact_output_law(name, kind, steps):
    """(mean, variance) per pixel of the sampler's output given Y_PIXELS, and the number of draws."""
    schedule = BridgeSchedule(kind=kind)
    rows = steps + 1                                   # at most one draw per step
    noise = ImpulseNoise(rows)
    x = BRIDGE_SAMPLERS[name].run(exact_bridge_denoiser(schedule, M_OF_Y, V), Y_PIXELS.expand(rows, *SHAPE),
                                  noise, steps, schedule)
    mean, gains = x[0], x[1:noise.draws + 1] - x[0]
    return mean, gains.square().sum(0), noise.draws


STOCHASTIC_BRIDGE = ["posterior", "euler", "heun"]


@pytest.mark.parametrize("kind", ["i2sb", "vp"])
@pytest.mark.parametrize("name", STOCHASTIC_BRIDGE)
def test_stochastic_bridge_samplers_converge_to_p_x0_given_y(name, kind):
    target_mean = M_OF_Y(Y_PIXELS[0])
    var_err = {}
    for steps in (16, 32, 64, 128):
        mean, var, draws = exact_output_law(name, kind, steps)
        assert draws == (steps - 1 if name == "posterior" else 1)      # posterior: every step but the last
        # The conditional mean is exact at every step count: the toy's mean path is a_t y + b_t m(y).
        assert torch.allclose(mean, target_mean, rtol=0, atol=1e-12), (steps, mean, target_mean)
        var_err[steps] = (var / V - 1).abs().max().item()
        assert (var < V).all()                                         # from below (missed posterior variance)
    # The variance converges to V, its error shrinking with every doubling of the steps; at 128 steps
    # (i2sb / vp, worst pixel): posterior 6.4 % / 8.8 %, euler 2.7 % / 2.3 %, heun 0.06 % / 0.06 %.
    assert var_err[128] < var_err[64] < var_err[32] < var_err[16], var_err
    assert var_err[128] < {"posterior": 0.1, "euler": 0.03, "heun": 0.002}[name], var_err


@pytest.mark.parametrize("name", ["euler", "heun"])
def test_bridge_ode_samplers_sample_p_x0_given_y_on_i2sb(name):
    """Monte Carlo with the real seeded noise on the i2sb prior (test_samplers.py does "vp"):
    128 NFE (euler 128 steps, heun 64), checked against the exact law above and against p(x0 | y)."""
    n, schedule = 4000, BridgeSchedule(kind="i2sb")
    x, used = sample(BRIDGE_SAMPLERS[name], exact_bridge_denoiser(schedule, M_OF_Y, V),
                     Y_PIXELS.expand(n, *SHAPE), SeededNoise(range(n), SHAPE, dtype=F64), 128, schedule)
    _, exact_var, _ = exact_output_law(name, "i2sb", 128 if name == "euler" else 64)
    assert used == (128 if name == "euler" else 127)
    se_mean = (V / n) ** 0.5                                   # 0.0035
    assert (x.mean(0) - M_OF_Y(Y_PIXELS[0])).abs().max().item() < 4 * se_mean
    # The pixel-averaged sample variance has a 1.1 % standard error at n = 4000 (measured: 0.992
    # times the exact law's, for both); the exact law is 2.7 % (euler) / 0.2 % (heun) below V, so the
    # sample variance is 0.965 V (euler) / 0.990 V (heun). Mean: within 1.3 standard errors.
    var = x.var(0).mean().item()
    assert var == pytest.approx(exact_var.mean().item(), rel=0.045)
    assert var == pytest.approx(V, rel=0.06)


@pytest.mark.parametrize("kind", ["i2sb", "vp"])
@pytest.mark.parametrize("steps", [1, 2, 3, 64, 128])
def test_bridge_posterior_ode_returns_the_conditional_mean_at_any_step_count(kind, steps):
    schedule = BridgeSchedule(kind=kind)
    noise = ImpulseNoise(2)                                    # it must draw nothing
    x = BRIDGE_SAMPLERS["posterior_ode"].run(exact_bridge_denoiser(schedule, M_OF_Y, V),
                                             Y_PIXELS.expand(2, *SHAPE), noise, steps, schedule)
    assert noise.draws == 0
    assert torch.allclose(x, M_OF_Y(Y_PIXELS).expand(2, *SHAPE), rtol=0, atol=1e-12)
