"""Multistep distillation via Moment Matching (Salimans et al. 2024, "Multistep Distillation
of Diffusion Models via Moment Matching"; docs/methods/mm.md), in EDM sigma space.

Student sampler (k steps, k in `params.nfe`), on a VP-uniform grid of k calls
(`schedules.step_sigmas("vp", k, ..., params.grid)`; "fair" by default: every call does work):
x = sigma_max eps; per step x_tilde = g(x, t, y), then x ~ q(x_s | x_t, x0 = x_tilde), the
stochastic DDPM posterior: mean x_tilde + (s/t)^2 (x - x_tilde), variance s^2 (1 - (s/t)^2)
(the VP posterior with alpha = 1). The last step (s = 0) returns x_tilde: exactly k NFE.

Alternating variant (paper Alg. 2): student g and auxiliary g_phi start as the teacher g_theta.
Per step: x0 ~ data; t, s a pair of consecutive points of a k-step grid; z_t = x0 + t eps;
x_tilde = g(z_t); z_s ~ q(z_s | z_t, sg(x_tilde)); then
- aux:     w(s) [ ||x_tilde - g_phi(z_s)||^2 + aux_teacher_weight ||g_theta(z_s) - g_phi(z_s)||^2 ]
- student: w(s) x_tilde . sg[g_phi(z_s) - g_theta(z_s)]   (linear: its value is no progress signal)

Parameter-space variant (paper Sec. 3.2): no auxiliary network. On minibatch 1,
G = grad_theta of the teacher's denoising loss on student samples; one SGD step of size
eta = `jvp_scale` from theta gives g_phi - g_theta ~ -eta J_theta(z_s) G, evaluated by a JVP
on an independent minibatch 2 and used in place of sg[g_phi - g_theta] above.

Decisions on (unconfirmed) details:
- Grid and (t, s): per sample, k uniform over `params.nfe`, then a step index i uniform on the
  k-step grid; t = grid[i]. `s_draw="uniform"` (default) draws s uniformly in VP time between
  grid[i+1] and t; `s_draw="next"` takes s = grid[i+1]. Either way s is floored at sigma_min
  (the grid ends at 0, where q(z_s | .) degenerates and the teacher's c_noise = log s is
  undefined). Why "uniform": every grid ends at 0, so with "next" the last jump (on the "edm"
  grid, which ends [.., sigma_min, 0], the last real jump, and for k <= 2 every jump) is only
  ever matched at s = sigma_min, where g_phi - g_theta ~ s^2 (score difference) is unlearnable noise; on the
  Gaussian toy "next" drifted (k = 1, 2: mean 0.63 vs 0.3) while "uniform" recovered the data
  moments. Matching at any s < t is a valid moment condition of the exact sampler.
- One student serves every k in `params.nfe` (the paper trains one per k). Without a k input
  the k-step students' t = sigma_max steps compete (on the toy, nfe=[2, 4] left the 2-step
  student collapsed), so the student network gets one extra input channel carrying the
  noise level s it steps to (`StepAwareDenoiser`, c_noise(s) = ln(s)/4 as a constant map).
  Its stem weights start at zero, so the student starts exactly as the teacher.
  `step_input: false` gives the plain teacher architecture (any denoiser; one k per student).
- w(s) (`params.weight`, default "edm") = EDM weight (s^2 + sd^2)/(s sd)^2 = 1/c_out^2: the aux loss is a denoising regression
  like the teacher's, and g_phi - g_theta ~ s^2 (score difference), so the same weight puts
  every s on the scale of a score difference (w = 1 learnt far slower on the toy: variance
  0.10 vs 0.26 after 600 steps). Squared norms are means over pixels.
- The student step uses g_phi(z_s) from before the aux update (both gradients from one
  snapshot; one forward pass fewer).
- Optimisers: Adam betas `train.adam_betas` (default (0, 0.99), reported in public
  reimplementations), same lr for student and aux; gradients clipped to `train.grad_clip`
  per network. Posterior coefficients are computed in float64.
- Parameter variant: the batch is split in two halves (the two independent minibatches).
"""
import torch
from torch import nn
from torch.func import functional_call, jvp

from pipeline.distill.base import Method, batch_noise, col, trainable_copy
from pipeline.models.schedules import edm_loss_weight, edm_precond, step_sigmas, vp_sigma, vp_sigma_inv
from pipeline.training.loop import optimizer_step


class StepAwareDenoiser(nn.Module):
    """An EDM denoiser D(x, sigma, y) with one more input channel, ln(s)/4 everywhere: the
    noise level s the sampler steps to next. Zero-initialised, so it starts as `denoiser`."""

    def __init__(self, denoiser):
        super().__init__()
        self.denoiser = denoiser
        denoiser.net.widen_input(1)

    def forward(self, x, sigma, y, s_next):
        d = self.denoiser
        c_skip, c_out, c_in, c_noise = edm_precond(sigma, d.sigma_data)
        step = col(s_next.log() / 4).expand(-1, 1, *x.shape[-2:])          # (B, 1, H, W)
        return col(c_skip) * x + col(c_out) * d.net_call(col(c_in) * x, c_noise, y, extra=step)


# DDPM posterior q(z_s | z_t, x0 = x_tilde) in sigma space (Ho et al. 2020, Eq. 6-7, alpha = 1).
def ddpm_posterior(z_t, x_tilde, t, s, eps):
    """A draw of z_s; t, s are (B,) or floats with 0 < s <= t; coefficients in float64."""
    t, s = torch.as_tensor(t, dtype=torch.float64), torch.as_tensor(s, dtype=torch.float64)
    ratio2 = (s / t) ** 2
    std = s * (1 - ratio2).clamp_min(0).sqrt()
    ratio2, std = (v.to(z_t.device, z_t.dtype).reshape(-1, 1, 1, 1) for v in (ratio2, std))
    return x_tilde + ratio2 * (z_t - x_tilde) + std * eps


def _vp_time(sigma):  # elementwise vp_sigma_inv of a float64 tensor
    return torch.tensor([vp_sigma_inv(v) for v in sigma.tolist()], dtype=torch.float64)


def _mean_pixels(v):  # (B, C, H, W) -> (B,)
    return v.flatten(1).mean(1)


class _StepBlind(nn.Module):
    """The student's call signature for a denoiser that ignores s_next (`step_input: false`)."""

    def __init__(self, denoiser):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x, sigma, y, s_next):
        return self.denoiser(x, sigma, y)


class MomentMatching(Method):

    @property
    def alternating(self):
        return self.params.variant == "alternating"

    def build(self):
        student = trainable_copy(self.teacher.denoiser)
        nets = {"student": StepAwareDenoiser(student) if self.params.step_input else _StepBlind(student)}
        if self.alternating:
            nets["aux"] = trainable_copy(self.teacher.denoiser)
        return nets

    def optimizers(self, nets, params):
        return {k: torch.optim.Adam(net.parameters(), lr=params.lr, betas=params.adam_betas)
                for k, net in nets.items()}

    def nfe_choices(self):
        return list(self.params.nfe)

    def grid(self, k):
        """The k-step student's sigma grid: (k+1,) float64, ending at 0 (`params.grid`)."""
        return step_sigmas("vp", k, self.teacher.schedule, self.params.grid)

    def sample(self, student, y, noise, nfe, guidance=0.0):
        """Salimans et al. 2024, Alg. 1: k = nfe stochastic steps, one student call each."""
        self.check_sample_args(nfe, guidance)
        sigmas = self.grid(nfe).tolist()
        x = sigmas[0] * noise.randn()
        for t, s in zip(sigmas[:-1], sigmas[1:]):
            t_, s_ = (torch.full((len(x),), v, dtype=x.dtype, device=x.device) for v in (t, s))
            x_tilde = student(x, t_, y, s_.clamp_min(self.teacher.schedule.sigma_min))
            if s == 0:
                return x_tilde
            x = ddpm_posterior(x, x_tilde, t, s, noise.randn())
        return x

    def draw_times(self, n, generator, device):
        """(t, s_next, s), each (n,) float32: t a point of a k-step grid (k uniform over
        params.nfe, then the index uniform), s_next the grid's next point (the student's
        input), s the matching point below t (`params.s_draw`); both floored at sigma_min."""
        grids = [self.grid(k) for k in self.params.nfe]
        pairs = torch.cat([torch.stack([g[:-1], g[1:]], 1) for g in grids])         # (P, 2)
        probs = torch.cat([torch.full((len(g) - 1,), 1.0 / (len(g) - 1)) for g in grids])
        idx = torch.multinomial(probs, n, replacement=True, generator=generator)
        t, s_next = pairs[idx].T
        s = s_next
        if self.params.s_draw == "uniform":   # uniform in VP time between grid[i+1] and t
            u = torch.rand(n, generator=generator, dtype=torch.float64)
            s = vp_sigma(torch.lerp(_vp_time(s_next), _vp_time(t), u))
        floor = self.teacher.schedule.sigma_min
        return tuple(v.clamp_min(floor).float().to(device) for v in (t, s_next, s))

    def rollout(self, student, batch, generator):
        """One training draw: (x_tilde with grad, sg(z_s), s, y)."""
        x0 = batch["x0"]
        y = self.condition(batch)
        t, s_next, s = self.draw_times(len(x0), generator, x0.device)
        z_t = x0 + col(t) * batch_noise(x0.shape, generator, x0.device)
        x_tilde = student(z_t, t, y, s_next)
        z_s = ddpm_posterior(z_t, x_tilde.detach(), t, s, batch_noise(x0.shape, generator, x0.device))
        return x_tilde, z_s, s, y

    def weight(self, s):
        if self.params.weight == "edm":
            return edm_loss_weight(s, self.teacher.schedule.sigma_data)
        return torch.ones_like(s)

    def student_objective(self, x_tilde, s, direction):
        """w(s) x_tilde . sg[direction] per sample (B,): the linear MM 'loss'."""
        return self.weight(s) * _mean_pixels(x_tilde * direction.detach())

    def loss(self, nets, batch, generator):
        """Per-sample student objective (B,); gradients reach the student only."""
        if not self.alternating:
            return self.parameter_loss(nets, batch, generator)
        x_tilde, z_s, s, y = self.rollout(nets["student"], batch, generator)
        with torch.no_grad():
            direction = nets["aux"](z_s, s, y) - self.teacher.denoiser(z_s, s, y)
        return self.student_objective(x_tilde, s, direction)

    def aux_loss(self, x_tilde, phi, teacher, s):
        """w(s)[||x_tilde - phi||^2 + lambda ||teacher - phi||^2] per sample (B,)."""
        fit = _mean_pixels((x_tilde.detach() - phi).square())
        anchor = _mean_pixels((teacher - phi).square())
        return self.weight(s) * (fit + self.params.aux_teacher_weight * anchor)

    def train_step(self, nets, optimizers, batch, generator, params):
        if not self.alternating:
            return super().train_step(nets, optimizers, batch, generator, params)
        x_tilde, z_s, s, y = self.rollout(nets["student"], batch, generator)
        with torch.no_grad():
            teacher = self.teacher.denoiser(z_s, s, y)
        phi = nets["aux"](z_s, s, y)
        aux = self.aux_loss(x_tilde, phi, teacher, s).mean()
        student = self.student_objective(x_tilde, s, phi - teacher).mean()
        # aux's loss sees x_tilde detached and the student's sees (phi - teacher) detached,
        # so each backward reaches only its own network.
        return {"aux_loss": optimizer_step([optimizers["aux"]], aux, params.grad_clip),
                "loss": optimizer_step([optimizers["student"]], student, params.grad_clip)}

    def parameter_loss(self, nets, batch, generator):
        """Parameter-space MM (Sec. 3.2): per-sample (B,) objective on the second half of the
        batch, along -jvp_scale J_theta G with G from the first half."""
        half = len(batch["x0"]) // 2
        if half == 0:
            raise ValueError("the parameter-space MM variant needs a batch of at least 2")
        first = {k: v[:half] for k, v in batch.items()}
        second = {k: v[half:] for k, v in batch.items()}
        student = nets["student"]
        theta = {k: v.detach() for k, v in self.teacher.denoiser.named_parameters()}
        grad = self.teacher_grad(theta, *self.rollout(student, first, generator))
        x_tilde, z_s, s, y = self.rollout(student, second, generator)
        _, push = jvp(lambda p: functional_call(self.teacher.denoiser, p, (z_s, s, y)),
                      (theta,), (grad,))
        return self.student_objective(x_tilde, s, -self.params.jvp_scale * push)

    def teacher_grad(self, theta, x_tilde, z_s, s, y):
        """G = grad_theta E w(s) ||sg(x_tilde) - g_theta(z_s)||^2, a dict like `theta`."""
        leaves = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
        with torch.enable_grad():
            pred = functional_call(self.teacher.denoiser, leaves, (z_s, s, y))
            loss = (self.weight(s) * _mean_pixels((x_tilde.detach() - pred).square())).mean()
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        return {k: torch.zeros_like(v) if g is None else g
                for (k, v), g in zip(leaves.items(), grads)}

