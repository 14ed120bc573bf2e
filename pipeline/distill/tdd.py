"""Target-Driven Distillation (Wang et al. 2024, "TDD: Target-Driven Distillation";
docs/methods/tdd.md): consistency distillation with target timestep selection, decoupled
guidance and gamma-sampling, on the shared machinery of `pipeline.distill.consistency`.

Timeline and grid: a discrete VP timeline of T = `timesteps` indices, index i at
sigma_i = vp_sigma of i uniformly spaced in VP time from sigma_min (i = 0) to sigma_max
(i = T-1) (`vp_timeline`); the DDIM training grid is `ddim_steps` equally spaced indices
0 = g_0 < ... < g_{M-1} = T-1 (`vp_grid`); a pair is (t_{n+k}, t_n) = (g_{n+1}, g_n).
As a jump *target*, index 0 means the clean x0 (sigma = 0), as the last step of TCD/TDD.

Loss: x_hi = x0 + sigma_hi eps; x_prev = one guided teacher DDIM step hi -> lo (CFG
c + w (c - u) on x0, which fixes eps in sigma space); student f at (x_hi, hi) jumped by DDIM
to s; target = the same online student under no_grad at (x_prev, lo), jumped to s;
pseudo-Huber distance (c = huber_c) on the VP-space values z_s = x_s/sqrt(1 + sigma_s^2),
applied per element and averaged (`distance: pseudo_huber_elementwise`, as TDD's public
training code does; `pseudo_huber` is Song & Dhariwal's per-sample form, which at c = 0.001
is nearly a plain L2 norm).

Decisions on unconfirmed details:
- The k-step equidistant inference schedule is the grid points at positions
  round((M-1)(1 - j/k)), j = 0..k-1 (starts at T-1); the target candidates are the union over
  k in schedule_steps[0]..schedule_steps[1] plus 0. tau = the largest candidate <= t_n; the
  target is uniform among the candidates in [tau - window, tau], `window` a span of timesteps
  (260 of 1000 by default, as the public code's); s = floor((1 - u s_ratio) target),
  u ~ U(0, 1). So s <= t_n (s = t_n makes the target the teacher step itself).
- Condition dropout (p_uncond) drops y for student, target and the teacher's conditional
  branch alike (the public code empties the prompt before all of them).
- Student x0 for the jump is f itself; the jump's eps is (x - f)/sigma.
- Sampling (gamma-sampling): times t_0 > ... > t_{N-1} (params.schedule or the N-step
  equidistant schedule above), t_N = 0; x = sigma(t_0) z; per step: x0 = student (optional
  dynamic thresholding on the first clip_x0_steps steps), DDIM jump to s = floor((1 - eta)
  t_{i+1}), re-noise to t_{i+1}; the last step lands on x0. With guidance w' != 0 each step
  calls the student with y and with the null condition: nfe = 2N, N must be in params.nfe.
- target_selection=False targets x0 (s = 0): exactly CD with grid="vp", the same timesteps
  and grid_steps = ddim_steps, solver "ddim", ema_mu 0, the same distance and huber_c, when
  guidance = 0 and p_uncond = 0 (the random draws coincide: pair index, then eps).
"""
import math
from functools import partial

import torch

from pipeline.distill.base import Method, col, trainable_copy
from pipeline.distill.consistency import (ConsistencyFunction, consistency_loss, ddim_jump, distance,
                                          draw_pairs, full, guided_x0, teacher_step, vp_grid, vp_timeline)


def equidistant_schedule(grid, steps):
    """(steps,) descending timeline indices: the grid points at round((M-1)(1 - j/steps))."""
    points = len(grid) - 1
    return grid[[math.floor(points * (1 - j / steps) + 0.5) for j in range(steps)]]


def target_candidates(grid, low, high):
    """Sorted (ascending) union of the low..high-step equidistant schedules, plus 0 (x0)."""
    times = [equidistant_schedule(grid, k) for k in range(low, high + 1)]
    return torch.cat([grid.new_zeros(1), *times]).unique(sorted=True)


# TDD target timestep selection (Wang et al. 2024, Sec. 3.1; docs/methods/tdd.md).
def select_targets(t_n, candidates, window, s_ratio, generator):
    """(B,) int64 target indices s <= t_n for the (B,) int64 lower pair indices t_n; `window`
    is the span of timesteps below tau the target is drawn from."""
    top = torch.searchsorted(candidates, t_n, right=True) - 1  # tau = candidates[top] <= t_n
    low = torch.searchsorted(candidates, candidates[top] - window)  # first candidate >= tau - window
    u = torch.rand(len(t_n), generator=generator, dtype=torch.float64)
    target = candidates[low + (u * (top - low + 1)).long()]
    u = torch.rand(len(t_n), generator=generator, dtype=torch.float64)
    return torch.floor((1 - u * s_ratio) * target).long()


def dynamic_threshold(x0, ratio):
    """Imagen's dynamic thresholding (Saharia et al. 2022, Sec. 2.3): r = max(1, the
    `ratio`-quantile of |x0| per sample), x0 -> clip(x0, -r, r)/r."""
    r = torch.quantile(x0.abs().flatten(1), ratio, dim=1).clamp_min(1.0)  # (B,)
    return x0.clamp(-col(r), col(r)) / col(r)


class TargetDrivenDistillation(Method):
    takes_guidance = True

    def __init__(self, params, teacher):
        super().__init__(params, teacher)
        self.timeline = vp_timeline(params.timesteps, teacher.schedule)  # (T,) float64
        self.grid = vp_grid(params.timesteps, params.ddim_steps)  # (M,) int64
        low, high = params.schedule_steps
        self.candidates = target_candidates(self.grid, low, high)

    def build(self):
        return {"student": ConsistencyFunction(trainable_copy(self.teacher.denoiser),
                                               self.teacher.schedule.sigma_min)}

    def jump_sigma(self, s):
        """Sigmas of target indices s (B,) int64: index 0 is x0 (sigma = 0)."""
        return torch.where(s == 0, torch.zeros((), dtype=torch.float64), self.timeline[s])

    def drop_condition(self, x0, generator):
        """keep (B,) bool, False with probability p_uncond; None when nothing is dropped."""
        if self.params.p_uncond == 0 or not self.conditional:
            return None
        return torch.rand(len(x0), generator=generator).to(x0.device) >= self.params.p_uncond

    def loss(self, nets, batch, generator):
        p, x0 = self.params, batch["x0"]
        y = self.condition(batch)
        n, eps = draw_pairs(len(self.grid), x0, generator)
        keep = self.drop_condition(x0, generator)
        s = (select_targets(self.grid[n], self.candidates, p.window, p.s_ratio, generator)
             if p.target_selection else torch.zeros_like(n))
        hi, lo, sigma_s = (v.to(x0.device, x0.dtype) for v in (
            self.timeline[self.grid[n + 1]], self.timeline[self.grid[n]], self.jump_sigma(s)))
        student = nets["student"]
        return consistency_loss(student, student, self.teacher.denoiser, x0, y, keep,
                                hi, lo, sigma_s, eps,
                                partial(teacher_step, solver="ddim", guidance=p.guidance),
                                partial(distance, kind=p.distance, c=p.huber_c))

    def nfe_choices(self):
        return list(self.params.nfe)

    def check_sample_args(self, nfe, guidance):
        """guidance = 0: nfe in params.nfe; else nfe = 2N with N in params.nfe, and only for a
        conditional student trained with condition dropout."""
        if guidance == 0:
            return super().check_sample_args(nfe, guidance)
        if self.params.p_uncond == 0 or not self.conditional:
            raise ValueError("tdd: guidance needs a conditional student trained with p_uncond > 0 "
                             "(no unconditional branch was distilled)")
        if nfe % 2 or nfe // 2 not in self.nfe_choices():
            raise ValueError(f"tdd with guidance samples with nfe = 2N, N in {self.nfe_choices()}, "
                             f"not {nfe}")

    def sampling_times(self, steps):
        """[t_0, ..., t_{N-1}, 0]: descending timeline indices, ending at x0."""
        times = self.params.schedule or equidistant_schedule(self.grid, steps).tolist()
        return list(times) + [0]

    # Gamma-sampling (Kim et al. 2023, CTM; TCD, Zheng et al. 2024; TDD Sec. 3.3).
    def sample(self, student, y, noise, nfe, guidance=0.0):
        self.check_sample_args(nfe, guidance)
        p = self.params
        times = self.sampling_times(nfe // 2 if guidance else nfe)
        x = float(self.timeline[times[0]]) * noise.randn()
        for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
            sigma = full(x, self.timeline[t])
            x0 = guided_x0(student, x, sigma, y, None, guidance)
            if i < p.clip_x0_steps:
                x0 = dynamic_threshold(x0, p.clip_ratio)
            s = math.floor((1 - p.eta) * t_next)
            sigma_s = 0.0 if s == 0 else float(self.timeline[s])
            x = ddim_jump(x, x0, sigma, full(x, sigma_s))
            if t_next > 0:  # re-noise s -> t_next: x + sqrt(sigma_next^2 - sigma_s^2) z
                x = x + (float(self.timeline[t_next]) ** 2 - sigma_s ** 2) ** 0.5 * noise.randn()
        return x
