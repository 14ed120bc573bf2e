"""CDBM: consistency bridge distillation (He, Zheng, Chen, Bao, Zhu, "Consistency Diffusion
Bridge Models", NeurIPS 2024, arXiv 2410.22637; docs/methods/cdbm.md) of the DDBM-style
bridge teacher.

The student learns the consistency function of the teacher's bridge PF-ODE (the paper's
consistency bridge distillation, CBD; consistency models: Song et al. 2023, Eq. 10 and
Alg. 2): f(x_t, t, y) is the end, at the smallest grid time, of the ODE trajectory through
x_t, for every t on the grid. (CDBM's own equation numbers are not cited: not checked
against the paper's text here; its figures and table below are.)
The PF-ODE is singular at t = T, where x_T = y is pinned, so sampling first spends one
network call at T on a coarse x0 and takes a stochastic bridge step to t_1 < T (the
paper's Fig. 1); only then does f apply.

Student. f = D_theta, a trainable copy of the teacher's `BridgeDenoiser`, called exactly as
the teacher (x_t, t, y). Boundary condition: D's DDBM preconditioning (`bridge_precond`,
D = c_skip x_t + c_out F) has c_skip -> 1 and c_out -> 0 as t -> 0 (a_t -> 0, b_t -> 1,
c_t -> 0), so f(x, 0, y) = x exactly and f(x, t_eps, y) = x + O(c_out) at the smallest grid
time t_eps (c_out = 3.4e-3 there on the default schedule and the toy's): the boundary
holds to that accuracy, with no new scalings (the paper tabulates each bridge's network
parametrisation, its Table 1 and App. B.4; the teacher's is kept unchanged here).

Loss (one sample): adjacent grid times t_{n+1} > t_n, n uniform;
    x_{t_{n+1}} = a y + b x0 + c eps                        (DDBM Thm. 1, the bridge marginal)
    x_hat_{t_n} = one first-order bridge-ODE step of the teacher from t_{n+1} to t_n
                  (DBIM Eq. 13 with eta = 0, the step of `samplers.bridge.euler`)
    loss = ||f_theta(x_{t_{n+1}}, t_{n+1}) - sg f_{theta^-}(x_hat_{t_n}, t_n)||^2
           + anchor_weight ||D_theta(y, T, y) - D_teacher(y, T, y)||^2,
squared norms the mean over pixels, unweighted (lambda = 1, one of the paper's two
settings, its Fig. 3). theta^- is an EMA of the student (`ema_mu`), updated in `after_step`.

Decisions on details the paper leaves open (docs/methods/cdbm.md gives the reasons):
- Grid: `bridge_times(grid_steps, power 3)` of the bridge ODE samplers with both endpoints
  dropped: t_1 > ... > t_{N-1} = t_eps (N = `grid_steps`, default 40); the paper draws t
  with a constant interval Delta t instead.
- Anchor: the consistency loss never trains the call at T (not on the grid), yet the
  sampler's first call is there and the weights are shared; `anchor_weight` (default 1)
  keeps it at the teacher's E[x0 | y].
- NFE counts every call, the one at T included: nfe 2 = boot at T + f at t_1 (one
  consistency step, a "1-step" CDBM sample); nfe 3 re-noises the result to `mid_t`
  (default 0.5) with the bridge marginal and applies f once more. Only 2 and 3.
- Teacher: DDBM style only. An I2SB-style teacher's PF-ODE is that of the bridge's
  Markovian projection, which does not transport to p(x0 | y) (docs/teachers.md).
"""
import torch

from pipeline.distill.base import Method, col, frozen_copy, trainable_copy
from pipeline.distill.consistency import distance, draw_pairs, full
from pipeline.samplers.bridge import ODE_TIME_POWER, bridge_times
from pipeline.training.loop import update_ema


class ConsistencyBridgeDistillation(Method):
    """CDBM's student f(x_t, t, y) and its 2- or 3-call sampler (see the module docstring)."""

    def __init__(self, params, teacher):
        super().__init__(params, teacher)
        style = teacher.params.style
        if style != "ddbm":
            raise ValueError(f"cdbm needs teacher.bridge.style: ddbm, got {style!r} (an I2SB-style "
                             "bridge's PF-ODE is its Markovian projection's, not the posterior's)")
        self.schedule = teacher.schedule
        self.times = bridge_times(params.grid_steps, self.schedule, ODE_TIME_POWER)[1:-1]  # t_1 > ... > t_eps
        if 3 in params.nfe and not self.schedule.t_min < params.mid_t < self.times[0]:
            raise ValueError(f"mid_t={params.mid_t} must lie in (t_min, t_1) = ({self.schedule.t_min}, "
                             f"{self.times[0]:.4f}) for grid_steps={params.grid_steps}")

    def build(self):
        """f: a trainable copy of the teacher's denoiser; "target": its frozen EMA (ema_mu > 0)."""
        student = trainable_copy(self.teacher.denoiser)
        nets = {"student": student}
        if self.params.ema_mu > 0:
            nets["target"] = frozen_copy(student)
        return nets

    def after_step(self, nets, step):
        if "target" in nets:  # theta^- <- mu theta^- + (1 - mu) theta (Song et al. 2023, Alg. 2)
            update_ema(nets["target"], nets["student"], self.params.ema_mu)

    def nfe_choices(self):
        return list(self.params.nfe)

    # --- training -------------------------------------------------------------------------

    @torch.no_grad()
    def teacher_step(self, x, y, t, s):
        """x_hat at s from x at t, s < t < T, both (B,): one Euler step in rho = b/c of
        du/drho = D (u = (x - a y)/c; DBIM Eq. 13, eta = 0), 1 teacher call:
        x_s = a_s y + b_s D + c_s eps_hat, eps_hat = (x_t - a_t y - b_t D)/c_t."""
        d = self.teacher.denoiser(x, t, y)
        a_t, b_t, c_t = (col(v) for v in self.schedule.marginal(t))
        a_s, b_s, c_s = (col(v) for v in self.schedule.marginal(s))
        return a_s * y + b_s * d + c_s * (x - a_t * y - b_t * d) / c_t

    def loss(self, nets, batch, generator):
        """Per sample (B,): the consistency loss on one grid pair plus the anchor at T."""
        x0, y = batch["x0"], batch["y"]
        grid = torch.tensor(self.times[::-1], dtype=torch.float64)  # ascending, t_eps first
        n, eps = draw_pairs(len(grid), x0, generator)
        hi, lo = (grid[i].to(x0.device, x0.dtype) for i in (n + 1, n))
        a, b, c = (col(v) for v in self.schedule.marginal(hi))
        x_hi = a * y + b * x0 + c * eps
        x_lo = self.teacher_step(x_hi, y, hi, lo)
        student, target = nets["student"], nets.get("target", nets["student"])
        with torch.no_grad():
            goal = target(x_lo, lo, y)
        if self.params.anchor_weight == 0:
            return distance(student(x_hi, hi, y), goal)
        # One student call on both inputs (one forward under DDP): (x_hi, t_{n+1}) and (y, T).
        T = full(y, self.schedule.T)
        pred, at_T = student(torch.cat([x_hi, y]), torch.cat([hi, T]), torch.cat([y, y])).chunk(2)
        with torch.no_grad():
            anchor = self.teacher.denoiser(y, T, y)
        return distance(pred, goal) + self.params.anchor_weight * distance(at_T, anchor)

    # --- sampling -------------------------------------------------------------------------

    def _bridge_point(self, y, x0, t, eps):
        """x_t ~ q(x_t | x0, y) = a_t y + b_t x0 + c_t eps: the bridge posterior given x0 and x_T = y."""
        a, b, c = (float(v) for v in self.schedule.marginal(t))
        return a * y + b * x0 + c * eps

    def sample(self, student, y, noise, nfe, guidance=0.0):
        """x0 (raw) in exactly `nfe` calls: the boot at T on y, a stochastic bridge step to t_1
        with fresh noise and f there; nfe 3 re-noises to `mid_t` and applies f again."""
        self.check_sample_args(nfe, guidance)
        x0 = student(y, full(y, self.schedule.T), y)  # coarse x0 = E[x0 | y]
        for t in [self.times[0], self.params.mid_t][:nfe - 1]:
            x = self._bridge_point(y, x0, t, noise.randn())
            x0 = student(x, full(y, t), y)
        return x0
