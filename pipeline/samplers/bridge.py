"""Samplers for the bridge teacher (docs/teachers.md), from x_T = y at t = T to x0.

Shared signature: `run(denoise, y, noise, steps, schedule, guidance=0.0, grid="fair") -> x0`
- `denoise(x_t, t, y) -> x0_hat`, t a (B,) tensor in (0, T]; y is always passed
  and the model decides whether its network sees it (I2SB never, DDBM always).
- `noise`: a `SeededNoise` shaped like y (all randomness); `steps`: steps N;
  `schedule`: a `BridgeSchedule`. `guidance` exists only to share the diffusion
  samplers' signature and must be 0; so does `grid`: the bridge grids below already
  put every call at a time where it does work (the last at t_{N-1} > t_min for N > 1).
Returns the raw final x0 (callers clip).

Time grid (`bridge_times`): the network is evaluated at
t_k = t_min + (T - t_min)(1 - k/N)^p, k = 0..N-1 (t_0 = T), and the last step,
to t = 0 where c = 0, returns x0_hat.
- posterior, posterior_ode: p = 1, uniform in t like I2SB's evenly spaced steps
  over its 1000-step chain (the I2SB baseline should match I2SB).
- euler, heun: p = 3 (`ODE_TIME_POWER`), a reasoned deviation from uniform. The
  last step (returning D at t_{N-1}) is an infinite step in rho, with an error
  of order c^2/(b^2 Var[x0|y]) at t_{N-1}. On the exact Gaussian toy (i2sb,
  worst per-sample error of the noise -> x0 map, in units of the true
  conditional std) uniform spacing leaves both samplers first order and Heun
  no better than Euler (64-step Euler: 0.11 when Var[x0|y] = 0.05, 0.5 when
  0.005; 32-step Heun: 0.11 / 0.73), while p = 3 makes Heun second order
  (32-step Heun: 0.009 / 0.022). p = 2..4 behave alike; DDBM's Heun uses the
  steeper Karras spacing in t (rho = 7).

NFE of N steps: posterior, posterior_ode, euler: N; heun: 2N - 1.

`posterior_ode` injects no noise anywhere, so its output is a deterministic
function of y; `euler`/`heun` are deterministic after their first step, whose
noise makes them draw a distribution given y.

Which law they converge to depends on the teacher, not the sampler. With the
exact denoiser of a DDBM-style (conditional) teacher, E[x0 | x_t, y], the
stochastic and ODE samplers draw from p(x0 | y) and `posterior_ode` returns
E[x0 | y] on a Gaussian toy. An I2SB-style teacher sees only x_t: its exact
denoiser E[x0 | x_t] defines the Markovian projection of the bridge, whose
samplers converge to another law (docs/teachers.md has the Gaussian-toy
figures); only at 1 NFE (t = T, x_T = y) is its output E[x0 | y].
"""
import torch

# ODE coordinates (DBIM, Zheng et al. 2024, eta = 0): u = (x - a_t y)/c_t, rho_t = b_t/c_t. Along
# x_t = a y + b x0 + c eps with eps fixed, du/drho = x0; averaging over x0 given x_t gives the
# marginal-preserving ODE du/drho = D(x_t, t). rho_T = 0 and u_T is the noise eps itself.


ODE_TIME_POWER = 3.0      # time-grid power of the ODE samplers (see the module docstring)


def bridge_times(steps, schedule, power=1.0):
    """[T, ..., t_min + (T - t_min)/steps^power, 0]: steps+1 descending Python floats."""
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    ramp = 1 - torch.arange(steps, dtype=torch.float64) / steps           # 1 .. 1/N
    times = schedule.t_min + (schedule.T - schedule.t_min) * ramp ** power
    return times.tolist() + [0.0]


def one_eval_per_step_nfe(steps, guidance=0.0):
    _no_guidance(guidance)
    return steps


def heun_nfe(steps, guidance=0.0):
    _no_guidance(guidance)
    return 2 * steps - 1


# I2SB sampling (Liu et al. 2023, Alg. 2): x0_hat = D(x_t, t), then x_s ~ q(x_s | x0_hat, x_t),
# the prior's posterior (`BridgeSchedule.posterior`); `ot_ode` drops its noise (I2SB's OT-ODE).
def _posterior_chain(denoise, y, noise, steps, schedule, ot_ode):
    times = bridge_times(steps, schedule)
    x = y
    for t, s in zip(times[:-1], times[1:]):
        x0_hat = denoise(x, _batch_time(x, t), y)
        if s == 0:
            return x0_hat
        k_xt, k_x0, std = (float(v) for v in schedule.posterior(s, t))
        x = k_xt * x + k_x0 * x0_hat
        if not ot_ode:
            x = x + std * noise.randn()
    raise AssertionError("the time grid ends at 0")


def posterior(denoise, y, noise, steps, schedule, guidance=0.0, grid="fair"):
    """I2SB ancestral sampler: N steps cost N NFE."""
    _no_guidance(guidance)
    return _posterior_chain(denoise, y, noise, steps, schedule, ot_ode=False)


def posterior_ode(denoise, y, noise, steps, schedule, guidance=0.0, grid="fair"):
    """I2SB with --ot-ode: deterministic given y (no noise at all); N steps cost N NFE."""
    _no_guidance(guidance)
    return _posterior_chain(denoise, y, noise, steps, schedule, ot_ode=True)


# Bridge ODE, Euler in rho (DBIM eta = 0, Zheng et al. 2024, Eq. 13): x_s = a_s y + b_s D + c_s eps_hat,
# eps_hat = (x_t - a_t y - b_t D)/c_t. The first step from T (c_T = 0) uses fresh noise for eps_hat:
# it is I2SB's/DBIM's stochastic posterior step, i.e. Euler from u_T = eps. Last step returns D. NFE = N.
def euler(denoise, y, noise, steps, schedule, guidance=0.0, grid="fair"):
    _no_guidance(guidance)
    times = bridge_times(steps, schedule, ODE_TIME_POWER)
    x, eps_T = y, noise.randn()
    for i, (t, s) in enumerate(zip(times[:-1], times[1:])):
        d = denoise(x, _batch_time(x, t), y)
        if s == 0:
            return d
        eps = eps_T if i == 0 else _eps_hat(schedule, x, y, d, t)
        x = _bridge_point(schedule, y, d, eps, s)
    raise AssertionError("the time grid ends at 0")


# Bridge ODE, Heun in rho (EDM Alg. 1 transplanted to du/drho = D): predictor as `euler`, corrector
# with D averaged over both ends (second evaluation at s). The first step is the stochastic
# posterior step with its Heun correction; the last step returns D. NFE = 2N - 1.
def heun(denoise, y, noise, steps, schedule, guidance=0.0, grid="fair"):
    _no_guidance(guidance)
    times = bridge_times(steps, schedule, ODE_TIME_POWER)
    x, eps_T = y, noise.randn()
    for i, (t, s) in enumerate(zip(times[:-1], times[1:])):
        d = denoise(x, _batch_time(x, t), y)
        if s == 0:
            return d
        eps = eps_T if i == 0 else _eps_hat(schedule, x, y, d, t)
        x_pred = _bridge_point(schedule, y, d, eps, s)
        d_avg = 0.5 * (d + denoise(x_pred, _batch_time(x, s), y))
        eps = eps_T if i == 0 else _eps_hat(schedule, x, y, d_avg, t)
        x = _bridge_point(schedule, y, d_avg, eps, s)
    raise AssertionError("the time grid ends at 0")


def _eps_hat(schedule, x, y, d, t):
    """The noise that puts x on the bridge from x0 = d: (x - a_t y - b_t d)/c_t, t < T."""
    a, b, c = (float(v) for v in schedule.marginal(t))
    return (x - a * y - b * d) / c


def _bridge_point(schedule, y, d, eps, s):
    """a_s y + b_s d + c_s eps: the bridge marginal's reparameterisation at time s."""
    a, b, c = (float(v) for v in schedule.marginal(s))
    return a * y + b * d + c * eps


def _batch_time(x, t):
    return torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)   # (B,)


def _no_guidance(guidance):
    if guidance != 0:
        raise ValueError("bridge samplers take no classifier-free guidance (guidance must be 0)")
