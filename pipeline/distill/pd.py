"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling
of Diffusion Models", Alg. 2; docs/methods/pd.md), in EDM sigma space (alpha = 1).

Round r (0-based) distils a target DDIM sampler of N_r = start_steps / 2^r steps into a student
of N_r / 2 steps. For a student step t -> t'' the target takes two DDIM steps t -> t' -> t''
(x_next = D + (s_next/s)(x - D)) and the student's x0 target is the x that one DDIM step
from z_t must predict to land on z_t'':
    x_target = (z_t'' - (t''/t) z_t) / (1 - t''/t)   (= z_t'' when t'' = 0),
loss max(SNR, 1) ||x_hat - x_target||^2 with SNR = 1/t^2 ("truncated SNR" weighting, Sec. 4:
the x0-error scaled like an eps-error at low noise, never below the x0-error at high noise).
The student starts as the teacher; when a round ends its weights become the next target.

Decisions on (unconfirmed) details:
- Grids are nested: round r's target runs on `vp_sigmas(start_steps)[::2^r]` (the teacher's
  DDIM grid thinned), the student on `[::2^(r+1)]`, so each student step is exactly two
  target steps and the round-0 target is the teacher's own start_steps-step DDIM. The final
  student samples on `vp_sigmas(start_steps)[::2^rounds]` (start and end points shared with
  `vp_sigmas(nfe)`; the interior differs).
- t is a uniformly drawn student grid point (the paper draws t on the student grid too).
- `train.steps` is split evenly over rounds (the last round also takes the remainder).
- Round state survives a checkpoint: the target is a frozen network in `build()`'s dict
  (checkpointed, never DDP-wrapped) and carries the round index as the buffer `pd_round`.
- No condition dropout: the student always sees y (it samples without guidance).
"""
import torch

from pipeline.distill.base import Method, batch_noise, col, frozen_copy, trainable_copy, unwrap
from pipeline.models.schedules import vp_sigmas


# DDIM, eta = 0 (Song et al. 2021, Eq. 12) in sigma space.
def ddim_step(x, d, t, t_next):
    """x at t_next from x at t and the x0 estimate d; t, t_next both (B,) or both floats."""
    ratio = torch.as_tensor(t_next / t, dtype=x.dtype, device=x.device)
    return d + (col(ratio) if ratio.ndim else ratio) * (x - d)


# Salimans & Ho 2022, Alg. 2: the x0 that a single DDIM step t -> t'' must predict to land on z''.
def pd_target(z_t, z_next, t, t_next):
    """x_target = (z'' - (t''/t) z_t) / (1 - t''/t); t, t_next (B,) with t_next < t."""
    ratio = col(t_next / t)
    return (z_next - ratio * z_t) / (1 - ratio)


def truncated_snr_weight(t):
    """max(SNR, 1), SNR = 1/t^2 in sigma space (Salimans & Ho 2022, Sec. 4)."""
    return (1 / t ** 2).clamp_min(1.0)


class ProgressiveDistillation(Method):

    def build(self):
        target = frozen_copy(self.teacher.denoiser)   # round 0: the teacher itself
        target.register_buffer("pd_round", torch.zeros((), dtype=torch.long))
        return {"student": trainable_copy(self.teacher.denoiser), "target": target}

    def nfe_choices(self):
        return [self.params.start_steps // 2 ** self.params.rounds]

    def grid(self, stride):
        """Every `stride`-th point of the teacher's start_steps DDIM grid (float64, ends at 0)."""
        sched = self.teacher.schedule
        return vp_sigmas(self.params.start_steps, sched.sigma_min, sched.sigma_max)[::stride]

    @property
    def steps_per_round(self):
        return max(1, self.params.train.steps // self.params.rounds)

    def round_at(self, step):
        """The round that optimiser step `step` (1-based, after it) leaves training."""
        return min(step // self.steps_per_round, self.params.rounds - 1)

    def after_step(self, nets, step):
        """At a round's end the student becomes the target of the next round."""
        target = nets["target"]
        new_round = self.round_at(step)
        if new_round > int(target.pd_round):
            target.load_state_dict({**unwrap(nets["student"]).state_dict(), "pd_round": torch.tensor(new_round)})

    def draw_times(self, r, n, generator, device):
        """(t, t', t'') each (n,): a student step of round r and its target midpoint."""
        fine = self.grid(2 ** r)                                   # target grid, (2M+1,)
        i = torch.randint(0, (len(fine) - 1) // 2, (n,), generator=generator)
        return tuple(fine[2 * i + j].float().to(device) for j in range(3))

    def loss(self, nets, batch, generator):
        """max(SNR, 1) ||student(z_t) - x_target||^2 per sample (B,)."""
        x0 = batch["x0"]
        y = self.condition(batch)
        target = unwrap(nets["target"])
        t, t_mid, t_next = self.draw_times(int(target.pd_round), len(x0), generator, x0.device)
        z_t = x0 + col(t) * batch_noise(x0.shape, generator, x0.device)
        with torch.no_grad():
            z_mid = ddim_step(z_t, target(z_t, t, y), t, t_mid)
            z_next = ddim_step(z_mid, target(z_mid, t_mid, y), t_mid, t_next)
            x_target = pd_target(z_t, z_next, t, t_next)
        x_hat = nets["student"](z_t, t, y)
        return truncated_snr_weight(t) * (x_hat - x_target).square().flatten(1).mean(1)

    def sample(self, student, y, noise, nfe, guidance=0.0):
        """The student's DDIM on the final round's grid: exactly nfe calls."""
        self.check_sample_args(nfe, guidance)
        sigmas = self.grid(2 ** self.params.rounds).tolist()
        x = sigmas[0] * noise.randn()
        for t, t_next in zip(sigmas[:-1], sigmas[1:]):
            d = student(x, torch.full((len(x),), t, dtype=x.dtype, device=x.device), y)
            x = ddim_step(x, d, t, t_next)
        return x
