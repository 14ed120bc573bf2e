"""The two teachers: a conditional EDM diffusion model and a diffusion bridge.

- `EDMDenoiser`: D(x, sigma, y) = c_skip x + c_out F(c_in x, c_noise, [y, flag])
  (Karras et al. 2022, Eq. 7). An image condition `y` is concatenated to the input
  with a flag channel; a class condition (`corruption.labels`) is a label (B,) int64
  whose embedding is added to the noise embedding (`pipeline.models.nets`). Condition
  dropout (`p_uncond`) replaces y and flag by zeros, or the label by the null class,
  so the same network also gives the unconditional prediction that classifier-free
  guidance needs (Ho & Salimans 2022).
- `BridgeDenoiser`: x0_hat(x_t, t[, y]) with DDBM-style preconditioning (Zhou
  et al. 2023, Sec. 4). `style="i2sb"` never shows `y` to the network (Liu et
  al. 2023, I2SB); `style="ddbm"` concatenates it. The network's time input is
  `t` itself, in [0, T].

Both are trained by the weighted x0-regression losses of docs/teachers.md.
"""
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.config.settings import BridgeTeacherParams, DiffusionTeacherParams, Params
from pipeline.models.bridge import BridgeSchedule, bridge_loss_weight, bridge_precond, sample_training_t
from pipeline.models.nets import UNet
from pipeline.models.schedules import edm_loss_weight, edm_precond, sample_training_sigma
from pipeline.samplers import sample
from pipeline.training.loop import Task


def _col(v):  # (B,) -> (B, 1, 1, 1) to broadcast over images
    return v.reshape(-1, 1, 1, 1)


@dataclass(frozen=True)
class DataShape:
    """What a network needs to know about the data: recorded in every checkpoint."""
    channels: int
    image_size: int
    conditional: bool  # an image condition y (a corruption)
    classes: int = 0   # > 0: class-conditional, the condition is the label

    @property
    def takes_condition(self):
        return self.conditional or self.classes > 0

    def condition(self, batch):
        """The condition a denoiser takes from a training batch {"y", "label", ...}: the label of a
        class-conditional model, y of an image-conditional one, else None."""
        if self.classes:
            return batch["label"]
        return batch["y"] if self.conditional else None


class EDMDenoiser(nn.Module):
    def __init__(self, params: DiffusionTeacherParams, shape: DataShape):
        super().__init__()
        self.schedule = params.schedule  # the samplers read sigma_min/max, rho from it
        self.sigma_data = params.schedule.sigma_data
        self.conditional, self.classes = shape.conditional, shape.classes
        cond_channels = shape.channels + 1 if shape.conditional else 0
        self.net = UNet(params.net, shape.channels + cond_channels, shape.channels, shape.image_size,
                        shape.classes)

    def net_call(self, inp, c_noise, y=None, keep=None, extra=None):
        """The raw network F on the scaled input `inp` = c_in x, given the condition y (None: the
        null condition; keep (B,) bool drops it where False) and `extra` channels appended
        after the condition's (those `widen_input` added). Every caller of the raw network
        (this forward, CD's/TDD's consistency function, MM's step-aware student) goes
        through here, so all feed the condition the same way."""
        parts, label = [inp], None
        if self.conditional:
            if y is None:  # null condition: shape of y is that of x
                y, keep = torch.zeros_like(inp), torch.zeros(len(inp), device=inp.device)
            parts.append(self.condition(y, keep))
        elif self.classes:
            label = self.class_label(y, keep)
        if extra is not None:
            parts.append(extra)
        inp = torch.cat(parts, dim=1) if len(parts) > 1 else inp
        return self.net(inp, c_noise) if label is None else self.net(inp, c_noise, label)

    def class_label(self, label, keep):
        """`label` with the null class (index `classes`) where keep is False; None stays None,
        which the net takes as the null class for every sample."""
        if label is None or keep is None:
            return label
        return torch.where(keep.bool(), label, torch.full_like(label, self.classes))

    def condition(self, y, keep):
        """[y * keep, keep] as extra channels; y=None means the null condition for every sample."""
        if y is None:
            raise ValueError("condition() needs a y to take the shape from")
        keep = torch.ones(len(y), device=y.device) if keep is None else keep.float()
        flag = _col(keep).expand(-1, 1, *y.shape[-2:])
        return torch.cat([y * _col(keep), flag], dim=1)

    def forward(self, x, sigma, y=None, keep=None):
        """x0 estimate at noise level sigma (B,); keep (B,) bool drops the condition where False."""
        c_skip, c_out, c_in, c_noise = edm_precond(sigma, self.sigma_data)
        return _col(c_skip) * x + _col(c_out) * self.net_call(_col(c_in) * x, c_noise, y, keep)


class BridgeDenoiser(nn.Module):
    def __init__(self, params: BridgeTeacherParams, shape: DataShape):
        super().__init__()
        self.schedule = BridgeSchedule.of(params.schedule)  # the settings plus the bridge math
        self.stats = (params.sigma_data, params.sigma_y, params.cov_xy)
        self.sees_y = params.style == "ddbm"
        in_channels = shape.channels * (2 if self.sees_y else 1)
        self.net = UNet(params.net, in_channels, shape.channels, shape.image_size)

    def forward(self, x_t, t, y, extra=None):
        """x0 estimate at times t (B,); `extra` (B, k, H, W) feeds k channels added by
        `widen_input` (IBMD's noise input)."""
        a, b, c = self.schedule.marginal(t)
        c_skip, c_out, c_in = bridge_precond(a, b, c, *self.stats)
        inp = [_col(c_in) * x_t] + ([y] if self.sees_y else []) + ([extra] if extra is not None else [])
        return _col(c_skip) * x_t + _col(c_out) * self.net(torch.cat(inp, dim=1), t)

    def widen_input(self, channels):
        """Add `channels` zero-initialised input channels: the output is unchanged until trained."""
        self.net.widen_input(channels)
        return self


class DiffusionTeacherTask(Task):
    """EDM training: E w(sigma) ||D(x0 + sigma eps, sigma, y) - x0||^2, sigma log-normal."""

    def __init__(self, params: DiffusionTeacherParams, shape: DataShape):
        self.params, self.shape = params, shape

    def build(self):
        return {"denoiser": EDMDenoiser(self.params, self.shape)}

    def loss(self, nets, batch, generator):
        x0, y = batch["x0"], self.shape.condition(batch)
        n, sched = len(x0), self.params.schedule
        sigma = sample_training_sigma(n, sched, generator).to(x0.device)
        eps = torch.randn(x0.shape, generator=generator).to(x0.device)
        keep = torch.rand(n, generator=generator).to(x0.device) >= self.params.p_uncond
        x0_hat = nets["denoiser"](x0 + _col(sigma) * eps, sigma, y, keep)
        weight = edm_loss_weight(sigma, sched.sigma_data)
        return weight * (x0_hat - x0).square().flatten(1).mean(1)  # (B,)


class BridgeTeacherTask(Task):
    """Bridge matching: E lambda(t) ||x0_hat(x_t, t[, y]) - x0||^2, t ~ U(t_min, T - t_min)."""

    def __init__(self, params: BridgeTeacherParams, shape: DataShape):
        self.params, self.shape = params, shape
        self.schedule = BridgeSchedule.of(params.schedule)

    def build(self):
        return {"denoiser": BridgeDenoiser(self.params, self.shape)}

    def loss(self, nets, batch, generator):
        x0, y = batch["x0"], batch["y"]
        t = sample_training_t(len(x0), self.schedule, generator).to(x0.device)
        eps = torch.randn(x0.shape, generator=generator).to(x0.device)
        a, b, c = self.schedule.marginal(t)
        x_t = _col(a) * y + _col(b) * x0 + _col(c) * eps
        x0_hat = nets["denoiser"](x_t, t, y)
        weight = bridge_loss_weight(a, b, c, self.params.sigma_data, self.params.sigma_y, self.params.cov_xy)
        return weight * (x0_hat - x0).square().flatten(1).mean(1)  # (B,)


# One entry per teacher: params model, task; the checkpoint kind is "teacher_<name>", and the
# name is also the sampler family ("diffusion/ddim", "bridge/heun").
TEACHERS = {
    "diffusion": (DiffusionTeacherParams, DiffusionTeacherTask),
    "bridge": (BridgeTeacherParams, BridgeTeacherTask),
}


@dataclass
class Teacher:
    """A trained teacher ready to sample: `denoise` follows the sampler convention of its family."""
    name: str
    family: str
    params: Params
    shape: DataShape
    denoiser: nn.Module

    @property
    def schedule(self):
        return self.denoiser.schedule

    def sample(self, sampler, y, noise, nfe, guidance=0.0, grid="fair"):
        """(x0 samples, NFE spent) with the sampler `sampler` of this teacher's family, its
        calls on the step grid `grid` (schedules.step_sigmas)."""
        y = y if self.shape.takes_condition else None
        return sample(f"{self.family}/{sampler}", self.denoiser, y, noise, nfe, self.schedule,
                      guidance, grid)


def teacher_config(name, params, shape, denoiser=None):
    """The JSON-like config a teacher checkpoint (and a student's) carries. A pretrained
    denoiser (pipeline.models.pretrained) adds its "arch", the description that rebuilds it."""
    config = {"teacher": name, "params": params.model_dump(mode="json"), "shape": shape.__dict__}
    arch = getattr(denoiser, "arch", None)
    return config if arch is None else {**config, "arch": arch}


def build_trained_teacher(config):
    """A frozen teacher of the architecture `config` (`teacher_config`, no "arch") describes,
    untrained. `models.loading.build_teacher` is the one entry point for any teacher config."""
    name = config["teacher"]
    params_cls, task_cls = TEACHERS[name]
    params = params_cls.model_validate(config["params"])
    shape = DataShape(**config["shape"])
    denoiser = task_cls(params, shape).build()["denoiser"]
    return Teacher(name, name, params, shape, denoiser.eval().requires_grad_(False))
