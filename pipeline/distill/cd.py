"""Consistency distillation (Song et al. 2023, "Consistency Models", Alg. 2; docs/methods/cd.md),
in EDM sigma space, on the shared machinery of `pipeline.distill.consistency`.

Loss: n ~ U{0..N-2} on a grid sigma_0 = sigma_min < ... < sigma_{N-1} = sigma_max of N =
`grid_steps` points; x_{n+1} = x0 + sigma_{n+1} eps; x_hat_n = one teacher ODE step (`solver`);
d(f(x_{n+1}, sigma_{n+1}), sg f_target(x_hat_n, sigma_n)) with `distance` (l2 or
pseudo-Huber, unweighted: lambda = 1 as in the paper's experiments).

Decisions on unconfirmed details:
- Grid: `grid="karras"` is the paper's (EDM Eq. 5, the teacher's rho); `grid="vp"` takes
  `grid_steps` equally spaced points of TDD's discrete VP timeline, so that TDD with target
  selection off is this method exactly (tests/unit/test_distill_cd_tdd.py).
- Target: an EMA copy (`ema_mu`) held as the frozen net "target" (checkpointed, updated in
  `after_step`, starting as the student); ema_mu = 0 uses the online student under no_grad
  and builds no "target".
- Multistep sampling (Alg. 1): sigmas = the first nfe points of a Karras grid of nfe + 1
  points (sigma_max, then Karras-spaced levels strictly above sigma_min); re-noise with
  sqrt(sigma^2 - sigma_min^2). Exactly nfe calls; no guidance (the student has none).
- A conditional teacher's condition is always kept (no condition dropout in CD).
"""
from functools import partial

from pipeline.distill.base import Method, frozen_copy, trainable_copy
from pipeline.distill.consistency import (ConsistencyFunction, consistency_loss, distance, draw_pairs,
                                          karras_grid, multistep_sample, teacher_step, vp_grid, vp_timeline)
from pipeline.models.schedules import karras_sigmas
from pipeline.training.loop import update_ema


class ConsistencyDistillation(Method):

    def build(self):
        student = ConsistencyFunction(trainable_copy(self.teacher.denoiser),
                                      self.teacher.schedule.sigma_min)
        nets = {"student": student}
        if self.params.ema_mu > 0:
            nets["target"] = frozen_copy(student)
        return nets

    def grid(self):
        """(grid_steps,) float64 sigmas, ascending from sigma_min to sigma_max."""
        p, schedule = self.params, self.teacher.schedule
        if p.grid == "karras":
            return karras_grid(p.grid_steps, schedule)
        return vp_timeline(p.timesteps, schedule)[vp_grid(p.timesteps, p.grid_steps)]

    def loss(self, nets, batch, generator):
        p, x0 = self.params, batch["x0"]
        y = self.condition(batch)
        sigmas = self.grid()
        n, eps = draw_pairs(len(sigmas), x0, generator)
        hi, lo = (sigmas[i].to(x0.device, x0.dtype) for i in (n + 1, n))
        target = nets.get("target", nets["student"])
        return consistency_loss(nets["student"], target, self.teacher.denoiser, x0, y, None,
                                hi, lo, hi.new_zeros(hi.shape), eps,
                                partial(teacher_step, solver=p.solver),
                                partial(distance, kind=p.distance, c=p.huber_c))

    def after_step(self, nets, step):
        if "target" in nets:  # theta^- <- mu theta^- + (1 - mu) theta (Alg. 2)
            update_ema(nets["target"], nets["student"], self.params.ema_mu)

    def nfe_choices(self):
        return list(self.params.nfe)

    def sampling_sigmas(self, nfe):
        """sigma_max, then nfe - 1 Karras-spaced levels above sigma_min (floats, descending)."""
        s = self.teacher.schedule
        return karras_sigmas(nfe + 1, s.sigma_min, s.sigma_max, s.rho)[:nfe].tolist()

    def sample(self, student, y, noise, nfe, guidance=0.0):
        self.check_sample_args(nfe, guidance)
        return multistep_sample(student, y, noise, self.sampling_sigmas(nfe),
                                self.teacher.schedule.sigma_min)
