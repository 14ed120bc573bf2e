"""DMD2: Improved Distribution Matching Distillation (Yin, Gharbi, Park, Zhang, Shechtman,
Durand, Freeman, NeurIPS 2024, arXiv 2405.14867; docs/methods/dmd2.md) of the EDM diffusion
teacher into a one- or few-step generator.

Networks. Generator G (the student) and fake denoiser D_fake both start as the teacher's
denoiser; the frozen teacher is D_real. G is called as a denoiser: one step is
x0 = G(sigma_max z, sigma_max, y). k steps (k in `nfe`) run on the levels
sigma_0 = sigma_max > ... > sigma_{k-1} of `step_sigmas("vp", k, schedule, "fair")[:k]`:
x0 = G(x, sigma_i, y), then x = x0 + sigma_{i+1} n with fresh n; k calls, k NFE.

Generator objective, per sample (all squared norms and |.| are means over pixels):
    sigma from the Karras grid, x_s = x0 + sigma eps,
    grad = (D_fake(x_s) - D_real(x_s)) / mean|x0 - D_real(x_s)|
        (DMD2 Eq. 1, the reverse-KL gradient, in x0 form; normaliser: DMD Eq. 7-8),
    L_G = 0.5 ||x0 - sg(x0 - grad)||^2 + gan_weight softplus(-C(x0 + sigma' eps'))
        (its gradient in x0 is grad / pixels; the second term: DMD2 Eq. 2, non-saturating).
D_fake and the realism head C (on D_fake's middle-block features), per sample:
    L_fake = lambda(sigma) ||D_fake(x_s) - sg(x0)||^2
             + cls_weight [softplus(C(x_s)) + softplus(-C(x0_real + sigma eps''))],
lambda = 1/c_out^2, the teacher's own EDM weight; x0_real a training image noised at the
same level as the generator's sample.

Algorithm (one `train_step` = one round; the two time-scale update rule of DMD2):
`fake_updates` Adam steps on (D_fake, C), each on a fresh generator sample, then one Adam
step on G. G's loss goes through a frozen snapshot of (D_fake, C), so no gradient reaches
them from it.

Decisions on details the paper leaves open (docs/methods/dmd2.md gives the reasons):
- Levels: one law for the DM term, the GAN term and D_fake's own loss: an index uniform
  over the `dm_range` quantiles (0.02, 0.98) of a `karras_steps`-point Karras grid
  (rho of the teacher's schedule). D_fake is trained exactly where it is queried.
- Backward simulation (few steps): per sample, k uniform over `nfe` and a stop index
  uniform in [0, k); G's own chain runs without gradient up to the stop, then the graded
  call. D_fake learns the law of these graded outputs, a mixture over the stops, so the DM
  term matches that mixture, not each stop's law: a known limitation (on the Gaussian toy
  the 4-step samples stay off while the mixture matches; docs/methods/dmd2.md).
- Realism head: conv3x3, GroupNorm, SiLU, global average pool, linear; on the output of
  the denoiser's lowest-resolution block (the module held as `mid`, or `mid_block` in a
  diffusers UNet), taken by a forward hook that stops the pass there. The head exists
  only with `gan_weight` > 0 (and then `cls_weight` > 0).
- D_fake keeps the condition (no condition dropout: DMD2 samples without guidance).
- `fake_term: false` is an ablation: D_fake(x_s) is replaced by x0 itself, and the
  generator collapses to the teacher's mode.
"""
import math

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.distill.base import Method, batch_noise, col, frozen_copy, trainable_copy, unwrap
from pipeline.distill.consistency import karras_grid
from pipeline.models.schedules import edm_loss_weight, step_sigmas
from pipeline.training.loop import optimizer_step


def _mean_pixels(v):  # (B, ...) -> (B,)
    return v.flatten(1).mean(1)


def _full(x, value):  # a (B,) tensor of the float `value`, in x's dtype and device
    return torch.full((len(x),), float(value), dtype=x.dtype, device=x.device)


# --- the realism head on D_fake's middle block (DMD2's GAN classifier) ----------------------------

class _Stop(Exception):
    """Raised by the hook on the middle block once it has its features: nothing after it runs."""


def middle_block(denoiser):
    """The denoiser's lowest-resolution block: the first module held as attribute `mid`
    (`nets.UNet`) or `mid_block` (diffusers' UNet2DModel). Keys of a ModuleDict do not count
    (`UNet.attn["mid"]` is the attention after the block, not the block)."""
    for module in denoiser.modules():
        if isinstance(module, (nn.ModuleDict, nn.ModuleList)):
            continue
        for name in ("mid", "mid_block"):
            block = getattr(module, name, None)
            if isinstance(block, nn.Module):
                return block
    raise ValueError(f"{type(denoiser).__name__} has no middle block (a module named 'mid' or 'mid_block') "
                     "for DMD2's realism head: set gan_weight and cls_weight to 0")


def middle_features(denoiser, x, sigma, y=None):
    """(B, C, h, w): the middle block's output in D(x, sigma, y); the forward pass stops there."""
    captured = []

    def capture(module, inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _Stop

    handle = middle_block(denoiser).register_forward_hook(capture)
    try:
        denoiser(x, sigma, y)
    except _Stop:
        return captured[0]
    finally:
        handle.remove()
    raise RuntimeError(f"{type(denoiser).__name__}'s forward pass never reached its middle block")


def feature_channels(denoiser, shape):
    """Channels of the middle block's output, from one probe pass on a zero image."""
    p = next(denoiser.parameters())
    x = torch.zeros(1, shape.channels, shape.image_size, shape.image_size, device=p.device, dtype=p.dtype)
    y = torch.zeros_like(x) if shape.conditional else None  # a class-conditional net: the null class
    with torch.no_grad():
        return middle_features(denoiser, x, torch.ones(1, device=p.device, dtype=p.dtype), y).shape[1]


def realism_head(channels):
    """C: conv3x3, GroupNorm, SiLU, global average pool, linear -> one logit per sample."""
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1),
                         nn.GroupNorm(math.gcd(8, channels), channels), nn.SiLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 1))


class FakeCritic(nn.Module):
    """D_fake (its forward is the denoiser's x0 estimate) and, with the GAN term, the realism
    head C on its middle-block features: one network, one optimiser, one checkpoint entry."""

    def __init__(self, denoiser, head=None):
        super().__init__()
        self.denoiser, self.head = denoiser, head

    def forward(self, x, sigma, y=None):
        return self.denoiser(x, sigma, y)

    def logits(self, x, sigma, y=None):
        """(B,) realism logits at (x, sigma, y): positive means "a noised training image"."""
        return self.head(middle_features(self.denoiser, x, sigma, y)).squeeze(1)


# --- the method ----------------------------------------------------------------------------------

class DMD2(Method):

    def __init__(self, params, teacher):
        super().__init__(params, teacher)
        steps, (lo, hi) = params.karras_steps, params.dm_range
        self.levels = karras_grid(steps, teacher.schedule)  # (steps,) float64, ascending, built once
        self.level_range = (int(lo * steps), min(int(hi * steps), steps - 1))  # inclusive indices
        self._step_levels = {}  # k -> the k-step sampler's levels
        self.level_table = self._level_table()  # (len(nfe), max nfe): backward simulation's levels
        self._critic = None  # frozen snapshot of (D_fake, C) for G's loss (`_frozen_critic`)

    @property
    def uses_gan(self):
        return self.params.gan_weight > 0

    def to(self, device):
        super().to(device)
        if self._critic is not None:
            self._critic.to(device)
        return self

    def build(self):
        """G and D_fake: copies of the teacher's denoiser; C on D_fake's middle block if GAN."""
        fake = trainable_copy(self.teacher.denoiser)
        head = realism_head(feature_channels(fake, self.teacher.shape)) if self.uses_gan else None
        return {"student": trainable_copy(self.teacher.denoiser), "fake": FakeCritic(fake, head)}

    def optimizers(self, nets, params):
        def adam(net):
            return torch.optim.Adam(unwrap(net).parameters(), lr=params.lr, betas=params.adam_betas)
        return {"student": adam(nets["student"]), "fake": adam(nets["fake"])}

    def nfe_choices(self):
        return list(self.params.nfe)

    # --- the generator -------------------------------------------------------------------------

    def step_levels(self, k):
        """The k-step generator's input levels (k floats, sigma_max first), one call each."""
        if k not in self._step_levels:
            self._step_levels[k] = step_sigmas("vp", k, self.teacher.schedule, "fair")[:k].tolist()
        return self._step_levels[k]

    def sample(self, student, y, noise, nfe, guidance=0.0):
        """DMD2's few-step sampler: x0 = G(x, sigma_i, y), re-noised to sigma_{i+1} with fresh
        noise; exactly `nfe` calls, the last call's x0 returned."""
        self.check_sample_args(nfe, guidance)
        levels = self.step_levels(nfe)
        x = levels[0] * noise.randn()
        for i, sigma in enumerate(levels):
            x0 = student(x, _full(x, sigma), y)
            if i + 1 < nfe:
                x = x0 + levels[i + 1] * noise.randn()
        return x0

    def _level_table(self):
        """(len(nfe), max nfe) float64: row j the levels of nfe[j], padded with its last level."""
        width = max(self.params.nfe)
        return torch.tensor([self.step_levels(k) + [self.step_levels(k)[-1]] * (width - k)
                             for k in self.params.nfe], dtype=torch.float64)

    def generate(self, student, batch, generator):
        """(x0, y): G's training output by backward simulation. Per sample k uniform over `nfe`
        and a stop uniform in [0, k); the chain up to the stop runs without gradient, then one
        graded call. One step (nfe [1]): x0 = G(sigma_max z, sigma_max, y), one call."""
        ref, y = batch["x0"], self.condition(batch)
        n, device = len(ref), ref.device
        pick = torch.randint(0, len(self.params.nfe), (n,), generator=generator)
        k = torch.tensor(self.params.nfe)[pick]
        stop = (torch.rand(n, generator=generator) * k).long()  # (n,) uniform in [0, k)
        sigma = self.level_table[pick].to(device, ref.dtype)  # (n, max nfe)
        x = col(sigma[:, 0]) * batch_noise(ref.shape, generator, device)
        stop_at = stop.to(device)
        with torch.no_grad():
            for i in range(int(stop.max())):
                x0 = student(x, sigma[:, i], y)
                renoised = x0 + col(sigma[:, i + 1]) * batch_noise(ref.shape, generator, device)
                x = torch.where(col(stop_at > i), renoised, x)  # a sample stays at its stop
        return student(x, sigma.gather(1, stop_at[:, None]).squeeze(1), y), y

    # --- levels and the distribution-matching direction ------------------------------------------

    def noised(self, x0, generator):
        """(x0 + sigma eps, sigma): sigma (B,) from `level_range` of the Karras grid, uniform
        over its indices (DMD's t ~ U[0.02 T, 0.98 T] on EDM's grid)."""
        lo, hi = self.level_range
        sigma = self.levels[torch.randint(lo, hi + 1, (len(x0),), generator=generator)]
        sigma = sigma.to(x0.device, x0.dtype)
        return x0 + col(sigma) * batch_noise(x0.shape, generator, x0.device), sigma

    def dm_grad(self, critic, x0, y, generator):
        """The normalised DM direction (B, C, H, W), no gradient (DMD2 Eq. 1; DMD Eq. 7-8 with
        alpha = 1, scores turned into x0 estimates): (D_fake - D_real)(x_s) / mean|x0 - D_real(x_s)|."""
        with torch.no_grad():
            x_s, sigma = self.noised(x0, generator)
            real = self.teacher.denoiser(x_s, sigma, y)
            fake = critic(x_s, sigma, y) if self.params.fake_term else x0
            scale = _mean_pixels((x0 - real).abs()).clamp_min(1e-12)  # (B,)
            return (fake - real) / col(scale)

    # --- the two losses ------------------------------------------------------------------------

    def _frozen_critic(self, fake):
        """A frozen copy of (D_fake, C)'s current weights: G's loss never touches their
        parameters (no gradient, DDP-safe)."""
        fake = unwrap(fake)
        if self._critic is None:
            self._critic = frozen_copy(fake)
        else:
            self._critic.load_state_dict(fake.state_dict())
        return self._critic

    def loss(self, nets, batch, generator):
        """G's objective (B,): 0.5 ||x0 - sg(x0 - grad)||^2 [+ gan_weight softplus(-C(x0 noised))]."""
        critic = self._frozen_critic(nets["fake"])
        x0, y = self.generate(nets["student"], batch, generator)
        grad = self.dm_grad(critic, x0, y, generator)
        loss = 0.5 * _mean_pixels((x0 - (x0 - grad).detach()).square())
        if self.uses_gan:
            x_s, sigma = self.noised(x0, generator)
            loss = loss + self.params.gan_weight * F.softplus(-critic.logits(x_s, sigma, y))
        return loss

    def fake_loss(self, nets, batch, generator):
        """(D_fake, C)'s objective (B,) on a detached generator sample: the teacher's EDM-weighted
        denoising loss [+ cls_weight (softplus(C(fake)) + softplus(-C(real))), one level each]."""
        with torch.no_grad():
            x0, y = self.generate(unwrap(nets["student"]), batch, generator)
        x_s, sigma = self.noised(x0, generator)
        weight = edm_loss_weight(sigma, self.teacher.schedule.sigma_data)
        loss = weight * _mean_pixels((nets["fake"](x_s, sigma, y) - x0).square())
        if self.uses_gan:
            real = batch["x0"] + col(sigma) * batch_noise(x0.shape, generator, x0.device)
            both = None if y is None else torch.cat([y, y])
            fake_logit, real_logit = unwrap(nets["fake"]).logits(
                torch.cat([x_s, real]), sigma.repeat(2), both).chunk(2)
            loss = loss + self.params.cls_weight * (F.softplus(fake_logit) + F.softplus(-real_logit))
        return loss

    # --- one round: fake_updates (D_fake, C) updates, then one G update ----------------------------

    def train_step(self, nets, optimizers, batch, generator, params):
        fake = [optimizer_step([optimizers["fake"]], self.fake_loss(nets, batch, generator).mean(),
                               params.grad_clip) for _ in range(self.params.fake_updates)]
        loss = optimizer_step([optimizers["student"]], self.loss(nets, batch, generator).mean(),
                              params.grad_clip)
        return {"loss": loss, "fake_loss": sum(fake) / len(fake)}
