"""A pretrained diffusers model as the diffusion teacher (docs/pretrained.md).

A local folder in the diffusers format, a `UNet2DModel` (config + weights) and its
DDPM/DDIM scheduler config, becomes the project's diffusion denoiser D(x, sigma), so every
diffusion sampler evaluates it and MM, TDD, PD and CD distil it. Needs the optional extra
`diffusers` (imported only when a folder is read or a model built).

The conversion, everything in EDM sigma space x = x0 + sigma eps (docs/notation.md):
- the model's discrete VP timeline: timestep k has `a_bar_k = alphas_cumprod[k]` (the
  scheduler's own float32 values) and sigma_k = sqrt((1 - a_bar_k)/a_bar_k) (Ho et al. 2020;
  Karras et al. 2022, Table 1 "VP"); sigma_min = sigma_0, sigma_max = sigma_{T-1} unless set
  (within that range); timesteps with a_bar = 0 (zero terminal SNR) are left off;
- a continuous sigma goes to a timestep (`timestep`): "interpolate" (default) takes the float
  timestep linear in log-sigma between the two neighbouring timesteps (exactly k at
  sigma_k; clamped to [0, T-1]), which the positional embedding of `UNet2DModel` accepts;
  "nearest" takes the nearest timestep in log-sigma (EDM's iDDPM wrapper rounds the same
  way, in sigma). Either way the input scaling and the output conversion use the sigma
  asked for, not the timestep's;
- input in VP coordinates z = alpha x, alpha = 1/sqrt(1 + sigma^2) (= sqrt(a_bar_k) at sigma_k);
- output to x0: epsilon x0 = x - sigma eps_hat; v_prediction (Salimans & Ho 2022)
  x0 = alpha z - sigma alpha v_hat = alpha^2 x - sigma alpha v_hat; sample x0 = out. A
  learned-variance output (2C channels) keeps its first C;
- unconditional: `conditional = False`, y and keep are ignored; sigma_data = 0.5 (EDM's
  value for [-1, 1] images; it configures the students' preconditioning, not this model).

CD's and TDD's `ConsistencyFunction` and MM's `StepAwareDenoiser` call the raw network
`denoiser.net(c_in x, c_noise)` with EDM's c_in, c_noise = ln(sigma)/4 and recombine
c_skip x + c_out F. `VPNet` is that raw network: from (c_in x, c_noise) it recovers
sigma = exp(4 c_noise) and x, evaluates the model and returns F = (D - c_skip x)/c_out, so
`c_skip x + c_out net(c_in x, c_noise)` is D and the existing code runs unchanged.
`VPNet.widen_input` adds zero-initialised input channels to the UNet's first convolution
(MM's extra step-input channel), fed to the UNet unscaled next to z.

Checkpoints (`save_pretrained_teacher`, loaded by `models.loading.load_teacher`): the teacher's config
(teachers.teacher_config) plus "arch", the JSON-like description of the model (UNet and
scheduler configs, options, source); the state holds the weights. Loaded with
`weights_only=True` like every checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from pipeline.config.settings import DiffusionTeacherParams, EDMSchedule, PretrainedParams
from pipeline.data.shards import read_manifest, sha256
from pipeline.errors import PipelineError
from pipeline.models.checkpoint import save_checkpoint
from pipeline.models.schedules import edm_precond
from pipeline.models.teachers import DataShape, Teacher, teacher_config


TIMESTEP_MODES = ("interpolate", "nearest")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
ATTENTION = ("sdpa", "explicit")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
ARCH_FORMAT = "diffusers-unet2d"


class PretrainedError(PipelineError, ValueError):
    """A pretrained folder that is missing, unsupported or does not fit the data."""


def _col(v):  # (B,) -> (B, 1, 1, 1)
    return v.reshape(-1, 1, 1, 1)


def _import_diffusers():
    try:
        import diffusers
    except ImportError as err:
        raise ImportError("a pretrained diffusers teacher needs the optional extra `diffusers` "
                          "(pip install 'distill-pipeline[diffusers]' or pip install diffusers)") from err
    return diffusers


# --- the timeline --------------------------------------------------------------------------

def timeline_sigmas(alphas_cumprod):
    """(T',) float64 sigma_k = sqrt((1 - a_bar_k)/a_bar_k), strictly increasing; timesteps with
    a_bar = 0 (infinite sigma, zero terminal SNR) are left off the end."""
    a_bar = torch.as_tensor(alphas_cumprod).double()
    finite = int((a_bar > 0).sum())
    if finite < 2 or not bool((a_bar[:finite] > 0).all()):
        raise PretrainedError("alphas_cumprod must be positive on at least two leading timesteps")
    sigmas = ((1 - a_bar[:finite]) / a_bar[:finite]).sqrt()
    if not bool((sigmas[1:] > sigmas[:-1]).all()) or float(sigmas[0]) <= 0:
        raise PretrainedError("the scheduler's sigma_k = sqrt((1 - a_bar)/a_bar) must be positive and "
                              "strictly increasing in k")
    return sigmas


def scheduler_alphas_cumprod(scheduler_config):
    """The scheduler's own alphas_cumprod (T,), built by diffusers from its config."""
    diffusers = _import_diffusers()
    name = scheduler_config.get("_class_name", "DDPMScheduler")
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise PretrainedError(f"unknown diffusers scheduler class {name!r}")
    scheduler = cls.from_config(scheduler_config)
    if not hasattr(scheduler, "alphas_cumprod"):
        raise PretrainedError(f"{name} has no alphas_cumprod: only DDPM-style (VP) schedulers are supported")
    return scheduler.alphas_cumprod


# --- the networks --------------------------------------------------------------------------

class VPNet(nn.Module):
    """A diffusers `UNet2DModel` on its discrete VP timeline, seen two ways:
    `x0(x, sigma)`: the x0 estimate in sigma space; `forward(c_in x, c_noise)`: the raw
    EDM-preconditioned network F of `EDMDenoiser.net` (module docstring)."""

    def __init__(self, unet, alphas_cumprod, prediction_type, channels, sigma_data=0.5,
                 timestep="interpolate", clip_x0=None):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise PretrainedError(f"prediction_type {prediction_type!r} not supported; known: {PREDICTION_TYPES}")
        if timestep not in TIMESTEP_MODES:
            raise PretrainedError(f"timestep must be one of {TIMESTEP_MODES}, got {timestep!r}")
        embedding = unet.config.get("time_embedding_type", "positional")
        if embedding == "fourier":
            raise PretrainedError("a UNet2DModel with Fourier time embedding is a VE score model "
                                  "(score_sde_ve), not a DDPM/DDIM VP model")
        if embedding == "learned" and timestep == "interpolate":
            raise PretrainedError("a UNet2DModel with a learned time embedding takes integer timesteps: "
                                  "use timestep='nearest'")
        if unet.config.get("num_class_embeds") is not None or unet.config.get("class_embed_type") is not None:
            raise PretrainedError("class-conditional UNet2DModel is not supported: the pipeline's condition "
                                  "is an image y, and a pretrained teacher is unconditional")
        if unet.config.out_channels not in (channels, 2 * channels):
            raise PretrainedError(f"UNet2DModel out_channels {unet.config.out_channels} must be in_channels "
                                  f"({channels}) or twice that (learned variance)")
        self.unet = unet
        self.sigmas = timeline_sigmas(alphas_cumprod)        # (T,) float64, a plain CPU tensor
        self.log_sigmas = self.sigmas.log()
        self.prediction_type, self.timestep_mode = prediction_type, timestep
        self.channels, self.extra_channels = channels, 0
        self.sigma_data, self.clip_x0 = sigma_data, clip_x0

    def timestep(self, sigma):
        """The model timestep of each sigma (B,): float64 (interpolate) or int64 (nearest)."""
        log_s = self.log_sigmas.to(sigma.device)
        ls = sigma.detach().double().log().clamp(log_s[0], log_s[-1])
        hi = torch.searchsorted(log_s, ls).clamp(1, len(log_s) - 1)
        lo = hi - 1
        w = (ls - log_s[lo]) / (log_s[hi] - log_s[lo])
        if self.timestep_mode == "nearest":
            return torch.where(w > 0.5, hi, lo)
        return lo.double() + w

    def x0(self, x, sigma, extra=None):
        """x0 estimate (B, C, H, W) of x at noise levels sigma (B,); `extra` (B, k, H, W) feeds
        the k channels added by `widen_input`."""
        s = sigma.detach().double().to(x.device)
        alpha = (1 + s ** 2).rsqrt()
        t = self.timestep(s)
        t = t if t.dtype == torch.long else t.float()
        z = x * _col(alpha).to(x.dtype)
        inp = z if extra is None else torch.cat([z, extra.to(x.dtype)], dim=1)
        out = self.unet(inp, t, return_dict=False)[0][:, :self.channels].to(x.dtype)
        sigma_, alpha_ = _col(s).to(x.dtype), _col(alpha).to(x.dtype)
        if self.prediction_type == "epsilon":
            d = x - sigma_ * out
        elif self.prediction_type == "v_prediction":
            d = alpha_ ** 2 * x - sigma_ * alpha_ * out
        else:
            d = out
        return d if self.clip_x0 is None else d.clamp(-self.clip_x0, self.clip_x0)

    def forward(self, inp, c_noise):
        """EDM's raw network: F with D = c_skip x + c_out F, from inp = [c_in x, extra] and
        c_noise = ln(sigma)/4 (the same preconditioning, sigma_data `self.sigma_data`)."""
        sigma = (4 * c_noise.detach().double()).exp()
        c_skip, c_out, c_in, _ = (_col(c).to(inp.dtype) for c in edm_precond(sigma, self.sigma_data))
        x = inp[:, :self.channels] / c_in
        extra = inp[:, self.channels:] if inp.shape[1] > self.channels else None
        return (self.x0(x, sigma, extra) - c_skip * x) / c_out

    def explicit_attention(self):
        """Give every attention layer diffusers' plain `AttnProcessor` (matmul and softmax)
        instead of scaled_dot_product_attention, which has no forward-mode AD: MM's parameter
        variant takes a JVP through the teacher. The outputs change by rounding only."""
        from diffusers.models.attention_processor import Attention, AttnProcessor
        for module in self.unet.modules():
            if isinstance(module, Attention):
                module.set_processor(AttnProcessor())
        return self

    def widen_input(self, channels):
        """Append `channels` input channels with zero weights in the UNet's first convolution,
        so the output is unchanged until trained (as `nets.UNet.widen_input`)."""
        if any(hasattr(b, "skip_conv") for b in self.unet.down_blocks):
            raise PretrainedError("widen_input: UNet2DModel skip blocks (score-SDE style) feed the raw "
                                  "input to every level; not supported")
        old = self.unet.conv_in
        new = nn.Conv2d(old.in_channels + channels, old.out_channels, old.kernel_size, old.stride,
                        old.padding, bias=old.bias is not None).to(old.weight.device, old.weight.dtype)
        with torch.no_grad():
            new.weight.zero_()
            new.weight[:, :old.in_channels] = old.weight
            if old.bias is not None:
                new.bias.copy_(old.bias)
        new.requires_grad_(old.weight.requires_grad)
        self.unet.conv_in = new
        self.extra_channels += channels
        return self


class DiffusersDenoiser(nn.Module):
    """D(x, sigma, y=None, keep=None): the `EDMDenoiser` interface around a `VPNet`.
    `arch` is the JSON-like description that rebuilds it (`build_denoiser`)."""

    conditional, classes = False, 0

    def __init__(self, net: VPNet, schedule: EDMSchedule, arch: dict):
        super().__init__()
        self.net = net
        self.schedule = schedule  # the samplers and students read sigma_min/max, rho, sigma_data
        self.sigma_data = schedule.sigma_data
        self.arch = arch

    def condition(self, y, keep):
        raise ValueError("a pretrained diffusers teacher is unconditional: it has no condition input")

    def net_call(self, inp, c_noise, y=None, keep=None, extra=None):
        """The raw network on c_in x (plus `extra` channels), as `EDMDenoiser.net_call`; y and
        keep are ignored (unconditional)."""
        return self.net(inp if extra is None else torch.cat([inp, extra], dim=1), c_noise)

    def forward(self, x, sigma, y=None, keep=None):
        """x0 estimate at noise levels sigma (B,); y and keep are ignored (unconditional)."""
        return self.net.x0(x, sigma)


# --- building ------------------------------------------------------------------------------

def resolve_schedule(sigmas, sigma_min=None, sigma_max=None, base: Optional[EDMSchedule] = None):
    """The EDMSchedule of a timeline: sigma_min/max default to its ends and must lie within
    them; sigma_data, rho, P_mean, P_std come from `base` (default EDMSchedule())."""
    base = base or EDMSchedule()
    lo, hi = float(sigmas[0]), float(sigmas[-1])
    smin = lo if sigma_min is None else float(sigma_min)
    smax = hi if sigma_max is None else float(sigma_max)
    tol = 1e-9 * hi
    if not lo - tol <= smin < smax <= hi + tol:
        raise PretrainedError(f"sigma_min={smin:g}, sigma_max={smax:g} must satisfy "
                              f"{lo:g} <= sigma_min < sigma_max <= {hi:g} (the model's timeline)")
    return base.model_copy(update={"sigma_min": smin, "sigma_max": smax})


def build_denoiser(arch, schedule: EDMSchedule) -> DiffusersDenoiser:
    """The denoiser `arch` describes, with freshly initialised weights (load a state dict)."""
    if arch.get("format") != ARCH_FORMAT:
        raise ValueError(f"not a pretrained-teacher description (format {arch.get('format')!r})")
    diffusers = _import_diffusers()
    unet = diffusers.UNet2DModel.from_config(arch["unet"])
    scheduler = arch["scheduler"]
    net = VPNet(unet, scheduler_alphas_cumprod(scheduler), scheduler.get("prediction_type", "epsilon"),
                unet.config.in_channels, schedule.sigma_data, arch["timestep"], arch["clip_x0"])
    if arch.get("attention", "sdpa") == "explicit":
        net.explicit_attention()
    return DiffusersDenoiser(net, schedule, arch)


def data_shape(unet_config) -> DataShape:
    size = unet_config.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise PretrainedError(f"only square models are supported, sample_size {size}")
        size = size[0]
    if not isinstance(size, int):
        raise PretrainedError(f"the UNet2DModel config needs an integer sample_size, got {size!r}")
    return DataShape(channels=int(unet_config["in_channels"]), image_size=size, conditional=False)


def _find(folder, names, sub):
    """The first of folder/sub/name, folder/name that exists (pipeline or flat layout)."""
    for base in (folder / sub, folder):
        for name in names:
            if (base / name).is_file():
                return base / name
    raise PretrainedError(f"{folder}: none of {list(names)} found in {folder / sub} or {folder}")


def read_folder(folder):
    """(unet, unet config, scheduler config, weights file) of a diffusers folder: pipeline layout
    (unet/, scheduler/, as DDPMPipeline.save_pretrained writes) or flat (config.json,
    scheduler_config.json and the weights side by side)."""
    diffusers = _import_diffusers()
    folder = Path(folder)
    if not folder.is_dir():
        raise PretrainedError(f"pretrained teacher folder {folder} does not exist: download the model "
                              "there (docs/pretrained.md)")
    unet_file = _find(folder, ("config.json",), "unet")
    weights = _find(unet_file.parent, WEIGHT_FILES, ".")
    scheduler_file = _find(folder, ("scheduler_config.json",), "scheduler")
    unet_config = json.loads(unet_file.read_text())
    name = unet_config.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise PretrainedError(f"{unet_file}: a {name}, not a UNet2DModel (only pixel-space UNet2DModel "
                              "teachers are supported)")
    unet = diffusers.UNet2DModel.from_pretrained(unet_file.parent, low_cpu_mem_usage=False)
    scheduler = json.loads(scheduler_file.read_text())
    return unet, unet_config, scheduler, weights


def load_diffusers_teacher(folder, *, timestep="interpolate", sigma_min=None, sigma_max=None,
                           clip_x0: Optional[float] = None, attention="sdpa",
                           params: Optional[DiffusionTeacherParams] = None, dtype=torch.float32) -> Teacher:
    """The diffusers model in `folder` as a frozen diffusion `Teacher` (module docstring).

    timestep: "interpolate" or "nearest" (sigma -> model timestep); sigma_min, sigma_max: the
    samplers' and students' range, None for the model's timeline ends; clip_x0: clamp the x0
    estimate to [-clip_x0, clip_x0] (None: never, the default; the scheduler's clip_sample is
    not applied); attention: "sdpa" (diffusers' default) or "explicit" (`VPNet.explicit_attention`,
    needed by MM's parameter variant); params: the teacher.diffusion block whose schedule
    gives sigma_data, rho, P_mean, P_std (its sigma_min/max and net are ignored), default
    DiffusionTeacherParams(). The weights are cast to `dtype`."""
    if attention not in ATTENTION:
        raise PretrainedError(f"attention must be one of {ATTENTION}, got {attention!r}")
    params = params or DiffusionTeacherParams()
    unet, unet_config, scheduler, weights = read_folder(folder)
    prediction = scheduler.get("prediction_type", "epsilon")
    alphas_cumprod = scheduler_alphas_cumprod(scheduler)
    schedule = resolve_schedule(timeline_sigmas(alphas_cumprod), sigma_min, sigma_max, params.schedule)
    arch = {"format": ARCH_FORMAT, "unet": unet_config, "scheduler": scheduler, "timestep": timestep,
            "clip_x0": clip_x0, "attention": attention, "prediction_type": prediction,
            "source": {"folder": str(folder), "weights": weights.name, "sha256": sha256(weights)}}
    net = VPNet(unet, alphas_cumprod, prediction, unet.config.in_channels, schedule.sigma_data,
                timestep, clip_x0)
    if attention == "explicit":
        net.explicit_attention()
    denoiser = DiffusersDenoiser(net, schedule, arch).to(dtype).eval().requires_grad_(False)
    teacher_params = params.model_copy(update={"schedule": schedule})
    return Teacher("diffusion", "diffusion", teacher_params, data_shape(unet_config), denoiser)


def pretrained_teacher(pretrained: PretrainedParams, params: Optional[DiffusionTeacherParams] = None,
                       dtype=torch.float32) -> Teacher:
    """The teacher a `PretrainedParams` block names (`load_diffusers_teacher` with its fields)."""
    return load_diffusers_teacher(pretrained.path, timestep=pretrained.timestep, sigma_min=pretrained.sigma_min,
                                  sigma_max=pretrained.sigma_max, clip_x0=pretrained.clip_x0,
                                  attention=pretrained.attention, params=params, dtype=dtype)


def check_data(shape: DataShape, data_dir):
    """Raise PretrainedError unless the prepared data (its manifest) fit the model: the same
    (C, H, W) and unconditional (corruption.kind: none)."""
    manifest = read_manifest(data_dir)
    want = [shape.channels, shape.image_size, shape.image_size]
    if list(manifest["x0_shape"])[-3:] != want:
        raise PretrainedError(f"the pretrained teacher makes {tuple(want)} images, the prepared data in "
                              f"{data_dir} are {tuple(manifest['x0_shape'])[-3:]}: set data.source to the "
                              "model's data (docs/pretrained.md)")
    if manifest["conditional"]:
        raise PretrainedError("a pretrained diffusers teacher is unconditional: set corruption.kind: none")


# --- checkpoints ---------------------------------------------------------------------------

def write_pretrained_teacher(path, pretrained: PretrainedParams, params: Optional[DiffusionTeacherParams] = None,
                             data_dir=None) -> Teacher:
    """What `teacher@diffusion` does when `teacher.diffusion.pretrained` is set: no training;
    the model is checked against the prepared data (if `data_dir`) and written as a
    self-describing checkpoint embedding its weights (float32). Returns the teacher."""
    teacher = pretrained_teacher(pretrained, params)
    if data_dir is not None:
        check_data(teacher.shape, data_dir)
    save_pretrained_teacher(path, teacher)
    return teacher


def pretrained_teacher_config(teacher: Teacher):
    """teachers.teacher_config plus "arch": everything `build_pretrained_teacher` needs."""
    return {**teacher_config(teacher.name, teacher.params, teacher.shape), "arch": teacher.denoiser.arch}


def build_pretrained_teacher(config) -> Teacher:
    """A frozen teacher of the architecture `config` (`pretrained_teacher_config`) describes,
    untrained; needs no file but the checkpoint."""
    params = DiffusionTeacherParams.model_validate(config["params"])
    denoiser = build_denoiser(config["arch"], params.schedule)
    return Teacher(config["teacher"], config["teacher"], params, DataShape(**config["shape"]),
                   denoiser.eval().requires_grad_(False))


def save_pretrained_teacher(path, teacher: Teacher):
    """A self-describing `teacher_diffusion` checkpoint embedding the pretrained weights."""
    save_checkpoint(path, "teacher_diffusion", pretrained_teacher_config(teacher),
                    {"denoiser": teacher.denoiser.state_dict()})
