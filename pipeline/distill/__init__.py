"""Distillation methods: the registry. Nothing else branches on a method's name.

Each method is a params block here and one line in `METHODS`: the teacher it distils, its
params model and the `module:Class` of its implementation (a `base.Method`). This file
imports nothing heavier than pydantic, so the settings schema is built from it and a bad
`distill.<method>` key fails in well under a second; an implementation (torch) is imported
only when a method is built or a student loaded.

Adding a method (docs/methods/README.md): one module `pipeline/distill/<name>.py`, its
params model and one `METHODS` line below, one `distill.<name>` block in params.yaml (and
`distill.methods` / `evaluate.models` entries). The contract tests pick it up.

Every field's meaning, default and the reason for it: docs/methods/<name>.md.
"""
from dataclasses import dataclass
from importlib import import_module
import math
from typing import Literal, Optional

from pydantic import Field, model_validator

from pipeline.config.settings import NfeList, Params, TrainParams


def _student_train(**overrides):
    defaults = dict(steps=400, batch_size=64, lr=1e-4, warmup_steps=0, ema_decay=0.99,
                    log_every=25, checkpoint_every=100)
    return TrainParams(**{**defaults, **overrides})


# --- params blocks: distill.<method> in params.yaml ---------------------------------------

class IBMDParams(Params):
    """Inverse Bridge Matching Distillation (Gushchin et al. 2025) of the bridge teacher."""
    nfe: int = Field(1, ge=1, le=64)  # student steps; 1 = one-step generator x0 = G(y, z)
    aux_updates: int = Field(5, ge=1, le=100)  # L: auxiliary-bridge updates per ...
    student_updates: int = Field(1, ge=1, le=100)  # ... K generator updates (the L:K ratio)
    aux_term: bool = True  # ablation: False drops the -phi term (the generator collapses)
    detach_xt: bool = False  # ablation: True stops the gradient through x_t
    # nfe > 1: x0 from the chain stopped at a uniformly drawn grid step per sample (DDBM
    # setups) or from the full chain (I2SB setups); whether gradients flow through the
    # earlier steps (False: each x_{t_n} fed to the student is detached).
    multistep_x0: Literal["stopped", "chain"] = "stopped"
    grad_through_chain: bool = False
    train: TrainParams = _student_train(lr=1e-4)


class MMParams(Params):
    """Multistep Moment Matching (Salimans et al. 2024) of the diffusion teacher."""
    variant: Literal["alternating", "parameter"] = "alternating"
    nfe: NfeList = [4, 8]  # student step counts k trained together; t from the union of grids
    aux_teacher_weight: float = Field(1.0, ge=0.0)  # the ||g_theta - g_phi||^2 regulariser
    jvp_scale: float = Field(1.0, gt=0.0)  # parameter variant: step of the teacher-space push
    s_draw: Literal["uniform", "next"] = "uniform"  # s ~ U(VP time of grid[i+1], t) or s = grid[i+1]
    weight: Literal["edm", "one"] = "edm"  # w(s): EDM's 1/c_out^2 or 1
    step_input: bool = True  # the student also sees the noise level it steps to (one net, every k)
    # The student's k-step grid (schedules.step_sigmas): "fair" puts every call where it does
    # work; "edm" ends with a call at sigma_min (the DDPM grid of the paper's samplers).
    grid: Literal["fair", "edm"] = "fair"
    train: TrainParams = _student_train(adam_betas=(0.0, 0.99))


class ConsistencyParams(Params):
    """Consistency distillation (Song et al. 2023) of the diffusion teacher."""
    grid_steps: int = Field(18, ge=2, le=2000)  # N points of the training discretisation
    # karras: Karras et al. Eq. 5 (rho of the teacher schedule); vp: grid_steps equally spaced
    # points of a `timesteps`-step VP timeline, the DDIM grid TDD trains on
    grid: Literal["karras", "vp"] = "karras"
    timesteps: int = Field(1000, ge=10, le=100_000)  # grid="vp" only
    solver: Literal["heun", "euler", "ddim"] = "heun"  # the teacher's ODE step t_{n+1} -> t_n
    ema_mu: float = Field(0.95, ge=0.0, lt=1.0)  # target network EMA; 0 = the online student
    distance: Literal["l2", "pseudo_huber", "pseudo_huber_elementwise"] = "l2"
    huber_c: float = Field(0.03, gt=0.0)
    nfe: NfeList = [1, 2, 4, 8]  # multistep sampling by re-noising
    train: TrainParams = _student_train()

    @model_validator(mode="after")
    def _grid(self):
        if self.grid == "vp" and self.grid_steps > self.timesteps:
            raise ValueError(f"grid_steps={self.grid_steps} exceeds timesteps={self.timesteps}")
        return self


class TDDParams(Params):
    """Target-Driven Distillation (Wang et al. 2024) of the diffusion teacher."""
    timesteps: int = Field(1000, ge=10, le=100_000)  # the teacher's discrete VP timeline
    ddim_steps: int = Field(50, ge=2, le=1000)  # training grid: t_{n+k} -> t_n one grid step
    target_selection: bool = True  # False: always target x0 (plain consistency distillation)
    schedule_steps: tuple[int, int] = (4, 8)  # union of the equidistant 4..8-step schedules
    window: int = Field(260, ge=0, le=100_000)  # span of timesteps below tau the target is drawn from
    s_ratio: float = Field(0.3, ge=0.0, lt=1.0)  # stochastic offset s = floor((1 - u s_ratio) target)
    guidance: float = Field(0.0, ge=0.0, le=20.0)  # teacher CFG scale w during training
    p_uncond: float = Field(0.2, ge=0.0, le=0.9)  # condition dropout during training
    huber_c: float = Field(0.001, gt=0.0)
    distance: Literal["pseudo_huber_elementwise", "pseudo_huber"] = "pseudo_huber_elementwise"
    eta: float = Field(0.2, ge=0.0, lt=1.0)  # gamma-sampling at inference (the paper's 0.2)
    schedule: Optional[list[int]] = None  # non-equidistant inference timesteps (descending)
    clip_x0_steps: int = Field(0, ge=0)  # dynamic thresholding on this many first steps
    clip_ratio: float = Field(0.995, gt=0.5, le=1.0)
    nfe: NfeList = [4, 6, 8]
    train: TrainParams = _student_train()

    @model_validator(mode="after")
    def _schedules(self):
        lo, hi = self.schedule_steps
        if not 1 <= lo <= hi:
            raise ValueError(f"schedule_steps {self.schedule_steps} must be 1 <= low <= high")
        if self.schedule is not None:
            if sorted(set(self.schedule), reverse=True) != list(self.schedule) or \
                    not all(0 <= t < self.timesteps for t in self.schedule):
                raise ValueError(f"schedule must be strictly descending timesteps in [0, {self.timesteps})")
            if self.nfe != [len(self.schedule)]:
                raise ValueError(f"a schedule of {len(self.schedule)} steps needs nfe [{len(self.schedule)}]")
        if self.ddim_steps > self.timesteps:
            raise ValueError(f"ddim_steps={self.ddim_steps} exceeds timesteps={self.timesteps}")
        if max(hi, max(self.nfe)) >= self.ddim_steps:
            raise ValueError(f"schedules of up to {max(hi, max(self.nfe))} steps need ddim_steps above that")
        return self


class PDParams(Params):
    """Progressive distillation (Salimans & Ho 2022) of the diffusion teacher."""
    start_steps: int = Field(64, ge=2, le=4096)  # the teacher's DDIM steps that round 1 halves
    rounds: int = Field(4, ge=1, le=12)  # each halves the step count; train.steps split evenly
    train: TrainParams = _student_train()

    @model_validator(mode="after")
    def _halvable(self):
        if self.start_steps % 2 ** self.rounds:
            raise ValueError(f"start_steps={self.start_steps} cannot be halved {self.rounds} times")
        if self.train.steps < self.rounds:
            raise ValueError(f"train.steps={self.train.steps} gives no step to some of {self.rounds} rounds")
        return self


class DMD2Params(Params):
    """Improved Distribution Matching Distillation (Yin et al. 2024) of the diffusion teacher."""
    nfe: NfeList = [1, 2, 4]  # generator step counts, trained together by backward simulation
    fake_updates: int = Field(5, ge=1, le=100)  # (D_fake, C) updates per generator update (TTUR)
    gan_weight: float = Field(3e-3, ge=0.0)  # the generator's GAN term; 0 = no realism head
    cls_weight: float = Field(1e-2, ge=0.0)  # the head's classification loss in D_fake's objective
    karras_steps: int = Field(1000, ge=10, le=100_000)  # points of the Karras grid levels come from
    dm_range: tuple[float, float] = (0.02, 0.98)  # quantiles of that grid's indices (DMD's 2 %-98 %)
    fake_term: bool = True  # ablation: False replaces D_fake by x0 itself (the generator collapses)
    train: TrainParams = _student_train()

    @model_validator(mode="after")
    def _check(self):
        if self.nfe[0] < 1:
            raise ValueError(f"nfe {self.nfe}: a generator step costs one call, so nfe >= 1")
        lo, hi = self.dm_range
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"dm_range {self.dm_range} must satisfy 0 <= low < high <= 1")
        if (self.gan_weight > 0) != (self.cls_weight > 0):
            raise ValueError("gan_weight and cls_weight are on (> 0) or off together: a head that never "
                             "trains gives the generator noise, one the generator never uses is wasted")
        return self

class SCMParams(Params):
    """sCM, continuous-time consistency distillation (Lu & Song 2025) of the diffusion teacher."""
    nfe: NfeList = [1, 2]  # 1 or 2 steps (the paper's samplers); nothing else
    mid_t: float = Field(1.1, gt=0.0, lt=math.pi / 2)  # TrigFlow time of the 2-step re-noising
    p_mean: float = Field(-1.0, ge=-10.0, le=10.0)  # ln sigma ~ N(p_mean, p_std^2) in training
    p_std: float = Field(1.4, gt=0.0, le=10.0)
    tangent_warmup: int = Field(100, ge=0, le=10_000_000)  # H steps: r ramps 0 -> 1; 0 = no warm-up
    tangent_c: float = Field(0.1, gt=0.0)  # c of g / (rms(g) + c)
    train: TrainParams = _student_train()

    @model_validator(mode="after")
    def _steps(self):
        if not set(self.nfe) <= {1, 2}:
            raise ValueError(f"sCM samples with 1 or 2 steps, not nfe {self.nfe}")
        return self

class CDBMParams(Params):
    """Consistency bridge distillation (He et al. 2024) of the DDBM-style bridge teacher."""
    nfe: NfeList = [2, 3]  # calls per sample, the booting call at T included: 2 or 3
    grid_steps: int = Field(40, ge=3, le=2000)  # N of bridge_times(N, power 3); N - 1 grid times
    ema_mu: float = Field(0.95, ge=0.0, lt=1.0)  # target network EMA; 0 = the online student
    anchor_weight: float = Field(1.0, ge=0.0)  # keeps the student's call at T the teacher's
    mid_t: float = Field(0.5, gt=0.0, lt=1.0)  # nfe 3: the time the sample is re-noised to
    train: TrainParams = _student_train()

    @model_validator(mode="after")
    def _nfe(self):
        if not set(self.nfe) <= {2, 3}:
            raise ValueError(f"nfe {self.nfe}: a CDBM sample costs 2 (boot at T + one f) or 3 NFE")
        return self


# --- the registry ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Registration:
    """One method: the teacher it distils, its params model, its implementation."""
    teacher: str  # "diffusion" or "bridge" (pipeline.models.teachers.TEACHERS)
    params: type[Params]
    implementation: str  # "module:Class" of its base.Method subclass, imported on demand
    # the bridge teacher styles (teacher.bridge.style) whose sampler the method can distil
    bridge_styles: tuple[str, ...] = ("i2sb", "ddbm")

    def load(self):
        """The implementation class (imports torch)."""
        module, _, name = self.implementation.partition(":")
        return getattr(import_module(module), name)


METHODS: dict[str, Registration] = {
    "ibmd": Registration("bridge", IBMDParams, "pipeline.distill.ibmd:IBMD"),
    "mm": Registration("diffusion", MMParams, "pipeline.distill.mm:MomentMatching"),
    "tdd": Registration("diffusion", TDDParams, "pipeline.distill.tdd:TargetDrivenDistillation"),
    "pd": Registration("diffusion", PDParams, "pipeline.distill.pd:ProgressiveDistillation"),
    "cd": Registration("diffusion", ConsistencyParams, "pipeline.distill.cd:ConsistencyDistillation"),
    "dmd2": Registration("diffusion", DMD2Params, "pipeline.distill.dmd2:DMD2"),
    "scm": Registration("diffusion", SCMParams, "pipeline.distill.scm:ContinuousConsistency"),
    "cdbm": Registration("bridge", CDBMParams, "pipeline.distill.cdbm:ConsistencyBridgeDistillation",
                         bridge_styles=("ddbm",)),  # the posterior's PF-ODE (docs/methods/cdbm.md)
}


def registration(name):
    if name not in METHODS:
        raise KeyError(f"unknown distillation method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name]


def name_of(params) -> str:
    """The registered name of a method's params block (its type identifies the method)."""
    for name, entry in METHODS.items():
        if type(params) is entry.params:
            return name
    raise KeyError(f"{type(params).__name__} is not the params model of a registered method")


def make_method(name, params, teacher):
    """The method `name` with its validated params block, distilling `teacher`."""
    return registration(name).load()(params, teacher)
