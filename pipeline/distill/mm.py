"""Multistep distillation via Moment Matching (Salimans et al. 2024, "Multistep Distillation
of Diffusion Models via Moment Matching"; methods.md Sec. 3), in EDM sigma space.

Student sampler (k steps, k in `params.nfe`), on the teacher's DDPM grid `vp_sigmas(k)`:
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
  k-step grid; t = grid[i], s = grid[i+1]. The grid ends at 0, where q(z_s | .) and the
  teacher are undefined (c_noise = log s), so s is floored at sigma_min; the final step
  (t = sigma_min) then has s = t, z_s = z_t, and its signal pulls x_tilde to the teacher's
  prediction at sigma_min (a near-identity step of the shared DDPM grid).
- w(s) = EDM weight (s^2 + sd^2)/(s sd)^2 = 1/c_out^2: the aux loss is a denoising regression
  like the teacher's, and g_phi - g_theta ~ s^2 (score difference), so the same weight puts
  every s on the scale of a score difference. Squared norms are means over pixels.
- The student step uses g_phi(z_s) from before the aux update (both gradients from one
  snapshot; one forward pass fewer).
- Optimisers: Adam betas `train.adam_betas` (default (0, 0.99), reported in public
  reimplementations), same lr for student and aux; gradients clipped to `train.grad_clip`
  per network. Posterior coefficients are computed in float64.
- Parameter variant: the batch is split in two halves (the two independent minibatches).
"""
import torch
from torch.func import functional_call, jvp

from pipeline.distill.base import Method, batch_noise, col, trainable_copy
from pipeline.schedules import edm_loss_weight, vp_sigmas
from pipeline.settings import MMParams


# DDPM posterior q(z_s | z_t, x0 = x_tilde) in sigma space (Ho et al. 2020, Eq. 6-7, alpha = 1).
def ddpm_posterior(z_t, x_tilde, t, s, eps):
    """A draw of z_s; t, s are (B,) or floats with 0 < s <= t; coefficients in float64."""
    t, s = torch.as_tensor(t, dtype=torch.float64), torch.as_tensor(s, dtype=torch.float64)
    ratio2 = (s / t) ** 2
    std = s * (1 - ratio2).clamp_min(0).sqrt()
    ratio2, std = (v.to(z_t.device, z_t.dtype).reshape(-1, 1, 1, 1) for v in (ratio2, std))
    return x_tilde + ratio2 * (z_t - x_tilde) + std * eps


def _mean_pixels(v):  # (B, C, H, W) -> (B,)
    return v.flatten(1).mean(1)


class MomentMatching(Method):
    name = "mm"
    params_cls = MMParams
    teacher_name = "diffusion"

    @property
    def alternating(self):
        return self.params.variant == "alternating"

    def build(self):
        nets = {"student": trainable_copy(self.teacher.denoiser)}
        if self.alternating:
            nets["aux"] = trainable_copy(self.teacher.denoiser)
        return nets

    def optimizers(self, nets, params):
        return {k: torch.optim.Adam(net.parameters(), lr=params.lr, betas=params.adam_betas)
                for k, net in nets.items()}

    def nfe_choices(self):
        return list(self.params.nfe)

    def grid(self, k):
        """The k-step student's sigma grid: (k+1,) float64, the teacher's DDPM grid."""
        sched = self.teacher.schedule
        return vp_sigmas(k, sched.sigma_min, sched.sigma_max)

    def sample(self, student, y, noise, nfe, guidance=0.0):
        """Salimans et al. 2024, Alg. 1: k = nfe stochastic steps, one student call each."""
        self.check_sample_args(nfe, guidance)
        sigmas = self.grid(nfe).tolist()
        x = sigmas[0] * noise.randn()
        for t, s in zip(sigmas[:-1], sigmas[1:]):
            x_tilde = student(x, torch.full((len(x),), t, dtype=x.dtype, device=x.device), y)
            if s == 0:
                return x_tilde
            x = ddpm_posterior(x, x_tilde, t, s, noise.randn())
        return x

    def draw_times(self, n, generator, device):
        """(t, s), each (n,) float32: consecutive points of a k-step grid, k uniform over
        params.nfe, s floored at sigma_min (see the module docstring)."""
        pairs = torch.cat([torch.stack([g[:-1], g[1:]], 1) for g in map(self.grid, self.params.nfe)])
        ks = torch.tensor(self.params.nfe, dtype=torch.float64)
        # P(pair of grid k) = 1/(len(nfe) k): k uniform, then the index uniform on its grid.
        probs = torch.cat([torch.full((int(k),), 1 / k) for k in ks])
        idx = torch.multinomial(probs, n, replacement=True, generator=generator)
        t, s = pairs[idx].T
        s = s.clamp_min(self.teacher.schedule.sigma_min)
        return t.float().to(device), s.float().to(device)

    def rollout(self, student, batch, generator):
        """One training draw: (x_tilde with grad, sg(z_s), s, y)."""
        x0 = batch["x0"]
        y = batch["y"] if self.conditional else None
        t, s = self.draw_times(len(x0), generator, x0.device)
        z_t = x0 + col(t) * batch_noise(x0.shape, generator, x0.device)
        x_tilde = student(z_t, t, y)
        z_s = ddpm_posterior(z_t, x_tilde.detach(), t, s, batch_noise(x0.shape, generator, x0.device))
        return x_tilde, z_s, s, y

    def weight(self, s):
        return edm_loss_weight(s, self.teacher.schedule.sigma_data)

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
        _step(optimizers["aux"], aux, params.grad_clip)
        _step(optimizers["student"], student, params.grad_clip)
        return {"loss": student.item(), "aux_loss": aux.item()}

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


def _step(optimizer, loss, grad_clip):
    """zero_grad, backward, clip, step for one network's optimiser."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward(inputs=[p for g in optimizer.param_groups for p in g["params"]])
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    optimizer.step()
