"""IBMD: Inverse Bridge Matching Distillation (Gushchin et al. 2025; docs/methods/ibmd.md).

Distils a bridge teacher (`BridgeDenoiser`, I2SB or DDBM style) into a stochastic
few-step generator, training on corrupted images y only (never x0).

Student. One step: x0 = G(y, T, y, z), z ~ N(0, I) entering through `widen_input(C)`
(zero-initialised extra input channels, so G starts as the teacher's blurry posterior
mean). N steps on `bridge_times(N)` (T = t_N > ... > t_1 > 0):
x0_tilde = G(x_{t_n}, t_n, y, z_n), then x_{t_{n-1}} ~ q(x_{t_{n-1}} | x0_tilde, x_{t_n})
(`BridgeSchedule.posterior`); every step draws a fresh z. N steps cost N NFE.

Objective. With x0 = G(y, z), t ~ U(t_min, T - t_min), x_t = a_t y + b_t x0 + c_t eps,
all reparameterised,

    min_G  E lambda(t) ||teacher(x_t, t, y) - x0||^2 - min_phi E lambda(t) ||phi(x_t, t, y) - x0||^2,

lambda = 1/c_out^2, the teacher's own DDBM weight (`bridge_loss_weight`). The inner
minimum is the bridge-matching loss of the student's own bridge, i.e. its
conditional variance: the minus sign is what keeps G diverse. G's gradient flows
through x0 and x_t into the frozen teacher and a frozen copy of phi.

Algorithm (one `train_step` = one round): L = `aux_updates` Adam steps on phi
(x0 = G(y, z) detached, loss lambda ||phi(x_t, t, y) - x0||^2), then K =
`student_updates` Adam steps on G with the objective above. `train.steps` counts
rounds, so one step costs (L + K) forward/backward passes.

Decisions on details the paper leaves open, each a param (docs/methods/ibmd.md):
- `grad_through_chain` (default False): multi-step students detach each x_{t_n}
  fed to G, so a gradient reaches G only through its own last call. Cheaper, and
  each step is then trained as the one-step problem at its time; True backpropagates
  through the whole chain (closer to training the chain end to end).
- `multistep_x0` (default "stopped", the DDBM setups): each sample runs the chain
  from T to its own uniformly drawn grid index n and uses that step's x0_tilde;
  "chain" (the I2SB setups) uses the last step's. In both cases the bridge in the
  objective is q(x_t | x0, y) over the whole (0, T), as at one step: if the chain
  is right, x0_tilde at any stop is a draw from p(x0 | y).
- Fresh samples: one round uses the loop's single batch of y for all L + K
  updates (the data loader gives one batch per step), with fresh z, t and eps for
  each update. Resampling rows of the same batch would add no information.
- `aux_term` (default True) and `detach_xt` (default False) are ablations: without
  the -phi term the generator collapses to a point per y; detaching x_t drops the
  gradient through the teacher's input.
"""
import torch

from pipeline.distill.base import Method, batch_noise, col, frozen_copy, trainable_copy, unwrap
from pipeline.models.bridge import bridge_loss_weight, sample_training_t
from pipeline.samplers.bridge import bridge_times
from pipeline.training.loop import optimizer_step


def _sq(v):  # per-sample mean squared value, (B,)
    return v.square().flatten(1).mean(1)


def _times(x, t):
    return torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)  # (B,)


class IBMD(Method):
    data_keys = ("y",)  # IBMD never sees clean x0

    def __init__(self, params, teacher):
        super().__init__(params, teacher)
        self.schedule = teacher.schedule
        self._phi = None  # frozen copy of phi for the student step (see `_frozen_aux`)

    def to(self, device):
        super().to(device)
        if self._phi is not None:
            self._phi.to(device)
        return self

    def build(self):
        """G: the teacher widened by C noise channels; phi: the teacher (the student's bridge)."""
        channels = self.teacher.shape.channels
        return {"student": trainable_copy(self.teacher.denoiser).widen_input(channels),
                "aux": trainable_copy(self.teacher.denoiser)}

    def optimizers(self, nets, params):
        def adam(net):
            return torch.optim.Adam(unwrap(net).parameters(), lr=params.lr, betas=params.adam_betas)
        return {"student": adam(nets["student"]), "aux": adam(nets["aux"])}

    def nfe_choices(self):
        return [self.params.nfe]

    # --- the student's generator ------------------------------------------------

    def _posterior_step(self, x_t, x0, t, s, eps):
        """x_s ~ q(x_s | x0, x_t), s < t (I2SB Alg. 2's ancestral step)."""
        k_xt, k_x0, std = (float(v) for v in self.schedule.posterior(s, t))
        return k_xt * x_t + k_x0 * x0 + std * eps

    def sample(self, student, y, noise, nfe, guidance=0.0):
        """x0 ~ G's chain from x_T = y; `nfe` calls of student(x_t, t, y, extra=z), z fresh each."""
        self.check_sample_args(nfe, guidance)
        times = bridge_times(nfe, self.schedule)
        x = y
        for t, s in zip(times[:-1], times[1:]):
            x0 = student(x, _times(x, t), y, extra=noise.randn())
            if s == 0:
                return x0
            x = self._posterior_step(x, x0, t, s, noise.randn())
        raise AssertionError("the time grid ends at 0")

    def generate(self, student, y, generator):
        """Training-time x0 = G(y, z) (one step) or a chain's x0_tilde (`multistep_x0`)."""
        z = batch_noise(y.shape, generator, y.device)
        if self.params.nfe == 1:
            return student(y, _times(y, self.schedule.T), y, extra=z)
        return self._chain_x0(student, y, z, generator)

    def _chain_x0(self, student, y, z, generator):
        """x0_tilde of the step each sample stops at: a uniform grid index ("stopped") or the last."""
        times, n = bridge_times(self.params.nfe, self.schedule), self.params.nfe
        stop = (torch.full((len(y),), n - 1) if self.params.multistep_x0 == "chain"
                else torch.randint(0, n, (len(y),), generator=generator)).to(y.device)
        x, x0 = y, None
        for k in range(int(stop.max()) + 1):
            x_in = x if self.params.grad_through_chain else x.detach()
            x0_k = student(x_in, _times(y, times[k]), y, extra=z)
            x0 = x0_k if x0 is None else torch.where(col(stop == k), x0_k, x0)
            if k < stop.max():
                eps = batch_noise(y.shape, generator, y.device)
                x = self._posterior_step(x_in, x0_k, times[k], times[k + 1], eps)
                z = batch_noise(y.shape, generator, y.device)
        return x0

    # --- the two losses -----------------------------------------------------------

    def _bridge_point(self, x0, y, generator):
        """(x_t, t, lambda(t)): t ~ U(t_min, T - t_min), x_t ~ q(x_t | x0, y) reparameterised."""
        t = sample_training_t(len(y), self.schedule, generator).to(y.device)
        a, b, c = self.schedule.marginal(t)
        x_t = col(a) * y + col(b) * x0 + col(c) * batch_noise(y.shape, generator, y.device)
        p = self.teacher.params
        return x_t, t, bridge_loss_weight(a, b, c, p.sigma_data, p.sigma_y, p.cov_xy)

    def _frozen_aux(self, phi):
        """A frozen copy of phi's current weights: the student step never touches phi's
        parameters (no gradient, DDP-safe)."""
        phi = unwrap(phi)
        if self._phi is None:
            self._phi = frozen_copy(phi)
        else:
            self._phi.load_state_dict(phi.state_dict())
        return self._phi

    def loss(self, nets, batch, generator):
        """G's objective, (B,): lambda ||teacher - x0||^2 - lambda ||phi - x0||^2 (docs/methods/ibmd.md)."""
        y = batch["y"]
        phi = self._frozen_aux(nets["aux"]) if self.params.aux_term else None
        x0 = self.generate(nets["student"], y, generator)
        x_t, t, weight = self._bridge_point(x0, y, generator)
        if self.params.detach_xt:
            x_t = x_t.detach()
        loss = weight * _sq(self.teacher.denoiser(x_t, t, y) - x0)
        if phi is not None:
            loss = loss - weight * _sq(phi(x_t, t, y) - x0)
        return loss

    def aux_loss(self, nets, batch, generator):
        """phi's bridge-matching loss on the student's (detached) x0, (B,)."""
        y = batch["y"]
        with torch.no_grad():
            x0 = self.generate(unwrap(nets["student"]), y, generator)
        x_t, t, weight = self._bridge_point(x0, y, generator)
        return weight * _sq(nets["aux"](x_t, t, y) - x0)

    # --- one round: L phi updates, then K G updates -----------------------------------

    def train_step(self, nets, optimizers, batch, generator, params):
        aux = [optimizer_step([optimizers["aux"]], self.aux_loss(nets, batch, generator).mean(),
                              params.grad_clip) for _ in range(self.params.aux_updates)]
        student = [optimizer_step([optimizers["student"]], self.loss(nets, batch, generator).mean(),
                                  params.grad_clip) for _ in range(self.params.student_updates)]
        return {"loss": sum(student) / len(student), "aux_loss": sum(aux) / len(aux)}
