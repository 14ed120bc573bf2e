"""sCM: continuous-time consistency distillation (Lu & Song, "Simplifying, Stabilizing and
Scaling Continuous-Time Consistency Models", ICLR 2025, arXiv 2410.11081; docs/methods/scm.md)
of the EDM-preconditioned diffusion teacher, in TrigFlow coordinates. Section and algorithm
numbers are the arXiv version's; equations are named, not numbered (see the doc page).

TrigFlow (paper Sec. 3): x_t = cos(t) x0 + sin(t) z, z ~ N(0, sd^2 I), t in [0, pi/2].
Dividing by cos t gives EDM's x_sigma = x0 + sigma n with sigma = sd tan t, x_sigma = x_t / cos t.
With that sigma, EDM's scalings are c_skip = cos^2 t, c_out = sd sin t, c_in x_sigma = x_t / sd,
so the teacher's own denoiser already is a TrigFlow model:
    D(x_t / cos t, sd tan t) = cos(t) x_t - sd sin(t) F(x_t / sd, t),   F = -F_net(x_t / sd, c_noise)
which is the paper's consistency parameterisation f = cos(t) x_t - sin(t) sd F (Sec. 3), with
f(x, 0) = x. The student is a trainable copy of the teacher's denoiser called in these
coordinates (`TrigFlowStudent`: its forward returns F), so it starts as the teacher.

Loss (paper Alg. 1, sCD: the gradient of the continuous-time CM objective rearranged into a
regression on F, with the Sec. 4 stabilisers):
    tau ~ N(p_mean, p_std^2), t = arctan(e^tau / sd), x_t = cos(t) x0 + sin(t) z
    dx_t/dt from the teacher (`pf_ode_velocity`)
    (F-, dF-) = JVP of sg F_theta at (x_t, t) along (cos t sin t dx_t/dt, cos t sin t)
    g = -cos^2(t) (sd F- - dx_t/dt) - r (cos t sin t x_t + sd dF-)     r = min(1, steps/H)
    g = g / (rms(g) + c)                                               tangent normalisation
    loss = exp(w_phi(t)) mean_pixels (F_theta - F- - g)^2 - w_phi(t)    adaptive weighting
g is cos(t) df-/dt along the teacher's ODE at r = 1; the loss's gradient at theta- = theta is
the CM gradient's direction. It never reaches 0: its minimum over w is 1 + ln mean (.)^2.

Decisions on open details (each in docs/methods/scm.md with its reason):
- The JVP's tangents carry the factor cos t sin t of g's second term (dF- is already
  cos t sin t dF/dt, by linearity): it is applied once, never again in g.
- Tangent normalisation uses the per-sample RMS of g (||g|| / sqrt(D)), so c = 0.1 means the
  same at any image size.
- sigma = e^tau is clamped to the teacher's [sigma_min, sigma_max].
- w_phi: a zero-initialised MLP of Fourier features of the net's c_noise = ln(sd tan t)/4.
- The warm-up counter is the student's buffer `steps_done` (set in `after_step`, so it is
  checkpointed and resumes).
- Sampling (1 or 2 steps): t_max = arctan(sigma_max / sd), x = sd z; 2 steps re-noise to
  t = mid_t (the paper's 1.1): x = cos(mid_t) x0 + sin(mid_t) sd z. Exactly nfe calls.
"""
import math

import torch
from torch import nn
from torch.func import jvp

from pipeline.distill.base import Method, batch_noise, col, trainable_copy, unwrap
from pipeline.distill.consistency import full
from pipeline.models.schedules import edm_precond


# --- TrigFlow <-> EDM (paper Sec. 3) ------------------------------------------------------

def edm_sigma(t, sigma_data):
    """sigma = sd tan t: the EDM noise level of TrigFlow time t (t in (0, pi/2))."""
    return sigma_data * t.tan()


def consistency_x0(F, x_t, t, sigma_data):
    """f(x_t, t) = cos(t) x_t - sd sin(t) F (the paper's CM parameterisation, Sec. 3); t (B,)."""
    return col(t.cos()) * x_t - sigma_data * col(t.sin()) * F


def pf_ode_velocity(x_t, t, x0_hat):
    """dx_t/dt = (cos(t) x_t - x0_hat) / sin(t): the TrigFlow PF-ODE of a model whose
    x0-prediction at (x_t, t) is x0_hat (the paper's sd F_pretrain; EDM's dx/dsigma =
    (x - D)/sigma after x_t = cos(t) x_sigma, sigma = sd tan t). t (B,) in (0, pi/2)."""
    return (col(t.cos()) * x_t - x0_hat) / col(t.sin())


class AdaptiveWeight(nn.Module):
    """w_phi(t) (the paper's adaptive weighting, Sec. 4): a small MLP of Fourier features of
    c_noise = ln(sd tan t)/4, last layer zero, so w = 0 at the start. Frequencies 1..8 rad per
    unit of c_noise (it spans about [-1.6, 1.1] over the teacher's sigmas): smooth in t."""

    def __init__(self, sigma_data, features=4, hidden=32):
        super().__init__()
        self.sigma_data = sigma_data
        self.register_buffer("freqs", 2.0 ** torch.arange(features, dtype=torch.float32))
        self.mlp = nn.Sequential(nn.Linear(2 * features, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, t):  # (B,) -> (B,)
        c_noise = edm_sigma(t, self.sigma_data).log()[:, None] / 4
        angles = c_noise * self.freqs[None, :]
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=1))[:, 0]


class TrigFlowStudent(nn.Module):
    """F_theta(x_t / sd, t[, y]) around a trainable copy of an EDM denoiser (one with
    `net_call`), plus the adaptive weighting w_phi and the step counter of the tangent
    warm-up. Called as student(x_t, t, y, keep): TrigFlow x_t and t (B,), returns F; the
    consistency function is `consistency_x0(F, x_t, t, sd)`. Starts as the teacher."""

    def __init__(self, denoiser):
        super().__init__()
        self.denoiser = denoiser
        self.sigma_data = denoiser.sigma_data
        self.weighting = AdaptiveWeight(denoiser.sigma_data)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    def forward(self, x_t, t, y=None, keep=None):
        sd = self.sigma_data
        _, _, _, c_noise = edm_precond(edm_sigma(t, sd), sd)
        # EDM's c_in x_sigma equals x_t / sd exactly; F = -F_net (module docstring).
        return -self.denoiser.net_call(x_t / sd, c_noise, y, keep)

    def log_weight(self, t):
        """w_phi(t), (B,)."""
        return self.weighting(t)


def normalise_tangent(g, c):
    """g / (rms(g) + c) per sample (paper Sec. 4, tangent normalisation; rms = ||g||/sqrt(D))."""
    rms = g.flatten(1).square().mean(1).sqrt()
    return g / col(rms + c)


class ContinuousConsistency(Method):
    """sCD (paper Alg. 1) of the diffusion teacher; 1- or 2-step student (module docstring)."""

    def __init__(self, params, teacher):
        super().__init__(params, teacher)
        s = teacher.schedule
        self.sigma_data = s.sigma_data
        self.t_max = math.atan(s.sigma_max / s.sigma_data)
        if not s.sigma_min < s.sigma_data * math.tan(params.mid_t) < s.sigma_max:
            raise ValueError(f"mid_t={params.mid_t} is sigma {s.sigma_data * math.tan(params.mid_t):.4g}, "
                             f"outside the teacher's ({s.sigma_min}, {s.sigma_max})")

    def build(self):
        return {"student": TrigFlowStudent(trainable_copy(self.teacher.denoiser))}

    def draw_times(self, n, generator):
        """(n,) TrigFlow times: tan t = e^tau / sd, tau ~ N(p_mean, p_std^2) (paper Alg. 1),
        e^tau clamped to the teacher's [sigma_min, sigma_max]."""
        p, s = self.params, self.teacher.schedule
        tau = p.p_mean + p.p_std * torch.randn(n, generator=generator)
        return torch.atan(tau.exp().clamp(s.sigma_min, s.sigma_max) / self.sigma_data)

    @torch.no_grad()
    def teacher_velocity(self, x_t, t, y):
        """The teacher's dx_t/dt at (x_t, t): one teacher call."""
        x0_hat = self.teacher.denoiser(x_t / col(t.cos()), edm_sigma(t, self.sigma_data), y)
        return pf_ode_velocity(x_t, t, x0_hat)

    def warmup_ratio(self, student):
        """r = min(1, steps done / tangent_warmup) (paper Sec. 4, tangent warm-up): a 0-d
        tensor on the student's device (no host sync)."""
        h = self.params.tangent_warmup
        done = student.steps_done.float()
        return torch.ones_like(done) if h == 0 else (done / h).clamp(max=1.0)

    @torch.no_grad()
    def tangent(self, student, x_t, t, y, dxdt, r):
        """(F-, g): the stop-gradient output and the un-normalised tangent of Alg. 1. The JVP
        direction is (cos t sin t dx_t/dt, cos t sin t), so dF- = cos t sin t dF-/dt already."""
        cs = t.cos() * t.sin()                                               # (B,)
        F_minus, dF = jvp(lambda x, s: student(x, s, y), (x_t, t), (col(cs) * dxdt, cs))
        sd, cos = self.sigma_data, col(t.cos())
        g = -cos ** 2 * (sd * F_minus - dxdt) - r * (col(cs) * x_t + sd * dF)
        return F_minus, g

    def loss(self, nets, batch, generator):
        """Per-sample (B,): exp(w) mean_pixels(F - F- - g)^2 - w (paper Alg. 1)."""
        x0, y = batch["x0"], self.condition(batch)
        core = unwrap(nets["student"])  # the JVP bypasses DDP/compile/autocast wrappers
        t = self.draw_times(len(x0), generator).to(x0.device, x0.dtype)
        z = self.sigma_data * batch_noise(x0.shape, generator, x0.device)
        x_t = col(t.cos()) * x0 + col(t.sin()) * z
        dxdt = self.teacher_velocity(x_t, t, y)
        F_minus, g = self.tangent(core, x_t, t, y, dxdt, self.warmup_ratio(core))
        g = normalise_tangent(g, self.params.tangent_c)
        F = nets["student"](x_t, t, y)
        w = core.log_weight(t)
        return w.exp() * (F - F_minus - g).square().flatten(1).mean(1) - w

    def after_step(self, nets, step):
        nets["student"].steps_done.fill_(step)

    def nfe_choices(self):
        return list(self.params.nfe)

    def sampling_times(self, nfe):
        """TrigFlow times of the nfe calls: [t_max] or [t_max, mid_t]."""
        return [self.t_max, self.params.mid_t][:nfe]

    def sampling_sigmas(self, nfe):
        """The same as EDM sigmas: [sigma_max] or [sigma_max, sd tan(mid_t)]."""
        return [self.sigma_data * math.tan(t) for t in self.sampling_times(nfe)]

    def sample(self, student, y, noise, nfe, guidance=0.0):
        """The paper's 1- and 2-step sampler: x0 = f(sd z, t_max); for 2 steps, re-noise to mid_t
        and apply f again. Exactly nfe student calls; all randomness from `noise`."""
        self.check_sample_args(nfe, guidance)
        sd = self.sigma_data
        first, *rest = self.sampling_times(nfe)
        x0 = self.apply(student, sd * noise.randn(), first, y)
        for t in rest:
            x0 = self.apply(student, math.cos(t) * x0 + math.sin(t) * sd * noise.randn(), t, y)
        return x0

    def apply(self, student, x, t, y):
        """f(x, t) for a float t: one student call."""
        t = full(x, t)
        return consistency_x0(student(x, t, y), x, t, self.sigma_data)
