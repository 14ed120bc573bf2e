"""Diffusion-bridge coefficients: the Gaussian bridge pinned at x0 and y = x_T.

A prior with marginal N(alpha_t x0, sigma_t^2) and SNR_t = alpha_t^2/sigma_t^2,
pinned at both ends, is Gaussian (DDBM, Zhou et al. 2023, Thm. 1; docs/teachers.md):

    x_t = a_t y + b_t x0 + c_t eps,
    a_t = (alpha_t/alpha_T)(SNR_T/SNR_t),  b_t = alpha_t (1 - SNR_T/SNR_t),
    c_t^2 = sigma_t^2 (1 - SNR_T/SNR_t).

Two priors (`BridgeSchedule.kind`), time t in [0, T], T = 1:

- "i2sb": I2SB's symmetric beta schedule (Liu et al. 2023) as a continuous-time
  VE prior, alpha_t = 1, sigma_t^2 = int_0^t beta(u) du. I2SB's discrete schedule
  (1000 steps) is `betas = linspace(sqrt(1e-4), sqrt(beta_max/1000), 1000)^2`,
  first half kept and mirrored. Read as a rate per unit time (x1000) this is

      beta(t) = (sqrt(beta_min) + (sqrt(beta_max) - sqrt(beta_min)) t)^2,  t <= 1/2,
      beta(t) = beta(1 - t),                                               t >  1/2,

  with beta_min = 0.1 (I2SB's 1e-4 x 1000) and beta_max = I2SB's `--beta-max`
  unchanged (0.3 for SR/JPEG, 1.0 for inpainting). Note beta_max is the end of
  the sqrt-linear ramp that I2SB truncates at half way, so the peak rate at
  t = 1/2 is ((sqrt(beta_min)+sqrt(beta_max))/2)^2, not beta_max. With the
  defaults sigma_1^2 = 0.141 (I2SB's discrete sum: 0.143). Here a_t + b_t = 1
  and the marginal is I2SB's `(sigmabar^2 x0 + sigma^2 y)/(sigma^2+sigmabar^2)`
  with variance `sigma^2 sigmabar^2/(sigma^2+sigmabar^2)`, sigmabar_t^2 =
  sigma_1^2 - sigma_t^2 the backward cumulative.
- "vp": DDBM's VP prior, alpha_t = exp(-(beta_min t + beta_d t^2/2)/2),
  sigma_t^2 = 1 - alpha_t^2 (beta_min = 0.1, beta_d = 2.0 in DDBM).

Fields of the other kind are ignored (i2sb uses beta_min, beta_max; vp uses
beta_min, beta_d).

Time input of the networks: the bridge denoiser is called with t itself, in
(0, T] (no log or x1000 rescaling); a network wrapper may embed it however it
likes. `t_min` bounds training times away from 0 and is the smallest time a
sampler evaluates.

All coefficients are computed in float64; they come back in the dtype of a
floating `t` tensor, or as 0-dim float64 tensors for Python-float times (which
do not promote float32 images).
"""
from typing import ClassVar

import torch

from pipeline.config.settings import BridgeScheduleParams


class BridgeSchedule(BridgeScheduleParams):
    """The bridge prior (docs/teachers.md): the validated settings plus their math. T = 1."""

    T: ClassVar[float] = 1.0

    @classmethod
    def of(cls, params: BridgeScheduleParams):
        return params if isinstance(params, cls) else cls(**params.model_dump())

    def alpha(self, t):
        """Signal scale of the prior, alpha_t (1 for i2sb)."""
        return _back(self._alpha(_f64(t)), t)

    def sigma(self, t):
        """Noise scale of the prior, sigma_t (forward cumulative std for i2sb)."""
        return _back(self._sigma2(_f64(t)).clamp_min(0).sqrt(), t)

    # Bridge marginal q(x_t | x0, y) (DDBM Thm. 1): the prior pinned at x_T = y.
    def marginal(self, t):
        """(a_t, b_t, c_t) with x_t = a_t y + b_t x0 + c_t eps; (0,1,0) at t=0, (1,0,0) at t=T."""
        t64 = _f64(t)
        return self._pinned(t64, torch.full_like(t64, self.T), t)

    # q(x_s | x0, x_t), s < t: by the Markov property the prior pinned at x0 and x_t, i.e.
    # the bridge formula with (T, y) -> (t, x_t). For i2sb this is I2SB's DDPM posterior (Eq. 4).
    def posterior(self, s, t):
        """(k_xt, k_x0, std) with x_s = k_xt x_t + k_x0 x0 + std eps; needs s < t."""
        return self._pinned(_f64(s), _f64(t), s if torch.is_tensor(s) else t)

    def _pinned(self, s64, t64, like):
        ratio = self._snr_ratio(s64, t64)                        # SNR_t / SNR_s in [0, 1]
        alpha_s, alpha_t = self._alpha(s64), self._alpha(t64)
        k_end = alpha_s / alpha_t * ratio
        k_x0 = alpha_s * (1 - ratio)
        std = (self._sigma2(s64) * (1 - ratio)).clamp_min(0).sqrt()
        return _back(k_end, like), _back(k_x0, like), _back(std, like)

    def _snr_ratio(self, s64, t64):
        # SNR_t/SNR_s = alpha_t^2 sigma_s^2 / (alpha_s^2 sigma_t^2); finite at s = 0.
        a2 = (self._alpha(t64) / self._alpha(s64)) ** 2
        return (a2 * self._sigma2(s64) / self._sigma2(t64)).clamp(0, 1)

    def _alpha(self, t64):
        if self.kind == "i2sb":
            return torch.ones_like(t64)
        return torch.exp(-0.5 * (self.beta_min * t64 + 0.5 * self.beta_d * t64 ** 2))

    def _sigma2(self, t64):
        if self.kind == "vp":
            return -torch.expm1(-(self.beta_min * t64 + 0.5 * self.beta_d * t64 ** 2))
        half = self._i2sb_cum(torch.full_like(t64, 0.5))
        return torch.where(t64 <= 0.5, self._i2sb_cum(t64), 2 * half - self._i2sb_cum(1 - t64))

    # int_0^t (r + d u)^2 du with r = sqrt(beta_min), d = sqrt(beta_max) - sqrt(beta_min):
    # the rising half of I2SB's sqrt-linear beta schedule, valid for t <= 1/2.
    def _i2sb_cum(self, t64):
        r, d = self.beta_min ** 0.5, self.beta_max ** 0.5 - self.beta_min ** 0.5
        return r * r * t64 + r * d * t64 ** 2 + d * d * t64 ** 3 / 3


# Uniform training times t ~ U(t_min, T - t_min) (docs/teachers.md: t ~ U(0, T), kept off the
# endpoints where c_t = 0 and the DDBM loss weight can blow up).
def sample_training_t(n, schedule, generator=None):
    """(n,) float32 times on the generator's device (CPU when generator is None)."""
    device = generator.device if generator is not None else "cpu"
    u = torch.rand(n, generator=generator, device=device)
    return schedule.t_min + (schedule.T - 2 * schedule.t_min) * u


# DDBM preconditioning (Zhou et al. 2023, Sec. 4 / App.): with Var(x0) = sd^2, Var(y) = sy^2,
# Cov(x0, y) = cov, x_t = a y + b x0 + c eps: c_in = 1/sqrt(Var x_t), c_skip = Cov(x0, x_t)/Var(x_t),
# c_out^2 = Var(x0) - c_skip^2 Var(x_t), so the input and the target (x0 - c_skip x_t)/c_out have unit variance.
def bridge_precond(a, b, c, sigma_data, sigma_y, cov_xy=0.0):
    """(c_skip, c_out, c_in), shaped like a, b, c. The network's time input is t itself."""
    var_xt = a ** 2 * sigma_y ** 2 + b ** 2 * sigma_data ** 2 + 2 * a * b * cov_xy + c ** 2
    c_skip = (b * sigma_data ** 2 + a * cov_xy) / var_xt
    # sd^2 - Cov^2/Var, rearranged so it is a sum of non-negative terms when |cov| <= sd sy.
    c_out2 = (a ** 2 * (sigma_data ** 2 * sigma_y ** 2 - cov_xy ** 2) + c ** 2 * sigma_data ** 2) / var_xt
    return c_skip, c_out2 ** 0.5, var_xt ** -0.5


# DDBM loss weight lambda(t) = 1/c_out^2: unit weight on the preconditioned target.
def bridge_loss_weight(a, b, c, sigma_data, sigma_y, cov_xy=0.0):
    return 1 / bridge_precond(a, b, c, sigma_data, sigma_y, cov_xy)[1] ** 2


def _f64(t):
    return t.to(torch.float64) if torch.is_tensor(t) else torch.tensor(float(t), dtype=torch.float64)


def _back(v, like):
    """Cast a float64 result back to the dtype of a floating tensor time `like`."""
    if torch.is_tensor(like) and like.is_floating_point():
        return v.to(like.dtype)
    return v
