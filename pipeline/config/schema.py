"""params.yaml: the schema of the whole file, loading it, and explaining its errors.

The schema is assembled here from the sections of `pipeline.config.settings` and the params
blocks of the method registry (`pipeline.distill.METHODS`), plus the checks that span
sections. `load_params` turns pydantic's errors into one line per problem naming the key
(`teacher.bridge.train.lr`), what is wrong and the value given. It imports only pydantic,
PyYAML and those two torch-free modules, so it answers in a fraction of a second.
"""
from functools import lru_cache
from pathlib import Path

import yaml
from pydantic import Field, ValidationError, create_model, field_validator, model_validator

from pipeline import distill
from pipeline.config.settings import (TEACHER_NAMES, Corruption, DataParams, EvaluateParams, FeaturesParams, Params,
                                      RayParams, ReportParams, SuperResolution, TeachersParams, TrackingParams,
                                      check_known)
from pipeline.errors import PipelineError


class ConfigError(PipelineError, ValueError):
    """params.yaml is missing, unparsable or invalid; the message names each bad key."""


class DistillSection(Params):
    """`distill`: which methods run (`methods`: method -> the teacher it distils; dvc.yaml's
    foreach makes one distill@<method> stage each) and one block per registered method."""
    methods: dict[str, str]

    @field_validator("methods")
    @classmethod
    def _methods(cls, methods):
        check_known(list(methods), distill.METHODS, "method(s)")
        wrong = {m: t for m, t in methods.items() if distill.METHODS[m].teacher != t}
        if wrong:
            raise ValueError(f"wrong teacher for {wrong}: " + ", ".join(
                f"{m} distils {distill.METHODS[m].teacher!r}" for m in wrong))
        return methods


class PipelineBase(Params):
    """The whole of params.yaml; `schema` adds `distill` (one block per registered method)
    and `evaluate` (whose default lists every teacher and method) in the file's order."""
    seed: int = Field(0, ge=0, le=2**31 - 1)
    data: DataParams = DataParams()
    corruption: Corruption = Field(default_factory=lambda: SuperResolution(factor=4))
    ray: RayParams = RayParams()
    tracking: TrackingParams = TrackingParams()
    features: FeaturesParams = FeaturesParams()
    teacher: TeachersParams = TeachersParams()

    @model_validator(mode="after")
    def _consistent(self):
        ev, shape, methods = self.evaluate, self.data.source.image_shape, self.distill.methods
        check_known(ev.models, (*TEACHER_NAMES, *distill.METHODS), "evaluate.models")
        if ev.n_samples > self.data.n_test:
            raise ValueError(f"evaluate.n_samples ({ev.n_samples}) exceeds data.n_test ({self.data.n_test})")
        if ev.groups > ev.n_samples:
            raise ValueError(f"evaluate.groups ({ev.groups}) exceeds evaluate.n_samples ({ev.n_samples})")
        if self.corruption.uses_source_y != (self.data.source.kind == "paired"):
            raise ValueError(f"corruption.kind={self.corruption.kind!r} does not fit data.source.kind="
                             f"{self.data.source.kind!r}: 'paired' goes with 'paired' and only with it")
        if not self.corruption.conditional and "bridge" in ev.models:
            raise ValueError("corruption.kind='none' gives the bridge nothing to start from: "
                             "remove 'bridge' from evaluate.models or choose a corruption")
        missing = [m for m in methods if m not in ev.models]
        if missing:
            raise ValueError(f"evaluate.models lacks the distilled student(s) {missing}: every "
                             "distill.methods entry is evaluated and reported")
        unmade = [m for m in ev.models if m in distill.METHODS and m not in methods]
        if unmade:
            raise ValueError(f"evaluate.models lists {unmade}, which distill.methods does not train")
        if not self.corruption.conditional and "bridge" in methods.values():
            raise ValueError("corruption.kind='none' gives the bridge nothing to start from: "
                             "remove the bridge's students from distill.methods or choose a corruption")
        style = self.teacher.bridge.style
        for m in methods:
            if style not in distill.METHODS[m].bridge_styles:
                raise ValueError(f"distill.methods: {m} distils a bridge of style {distill.METHODS[m].bridge_styles}, "
                                 f"but teacher.bridge.style is {style!r}: change the style or remove {m} from "
                                 f"distill.methods and evaluate.models (docs/methods/{m}.md)")
        models = (*TEACHER_NAMES, *distill.METHODS)  # a target on a model this run skips reads "not evaluated"
        for i, target in enumerate(self.report.targets):
            if target.model not in models:
                raise ValueError(f"report.targets[{i}].model {target.model!r}: a teacher or method, one of {models}")
            if target.than not in ("teacher_best", "teacher_same_nfe", *models):
                raise ValueError(f"report.targets[{i}].than {target.than!r}: 'teacher_best', 'teacher_same_nfe' "
                                 f"or a teacher or method, one of {models}")
        self.corruption.check(shape)
        if self.teacher.diffusion.pretrained is not None and self.corruption.class_conditional:
            raise ValueError("teacher.diffusion.pretrained: a pretrained diffusers teacher is unconditional; "
                             "set corruption.labels: false")
        if self.teacher.diffusion.pretrained is not None and self.corruption.conditional:
            raise ValueError("teacher.diffusion.pretrained: a pretrained diffusers teacher is unconditional; "
                             f"set corruption.kind: none (got {self.corruption.kind!r})")
        for name in TEACHER_NAMES:
            if name == "diffusion" and self.teacher.diffusion.pretrained is not None:
                continue  # its net is the pretrained model's
            net = getattr(self.teacher, name).net
            factor = net.patch * 2 ** (len(net.channels) - 1)
            if shape[1] % factor:
                raise ValueError(f"teacher.{name}.net: patch {net.patch} and {len(net.channels)} levels "
                                 f"downsample by {factor}, which does not divide the image size {shape[1]}")
            sides = [shape[1] // net.patch // 2 ** i for i in range(len(net.channels))]  # as nets.level_sides
            if not set(net.attention) <= set(sides):
                raise ValueError(f"teacher.{name}.net.attention {list(net.attention)}: each must be a feature-map "
                                 f"side of this net, {sides} for {shape[1]}x{shape[1]} images")
        return self


@lru_cache(maxsize=8)
def _schema(registered):
    style = TeachersParams().bridge.style  # the default run: every method that can distil the default teachers
    names = [name for name, entry in registered if style in entry.bridge_styles]
    blocks = {name: (entry.params, entry.params()) for name, entry in registered}  # a block for every method
    section = create_model("DistillParams", __base__=DistillSection, **blocks,
                           methods=(dict[str, str], {n: distill.METHODS[n].teacher for n in names}))
    evaluate = EvaluateParams(models=[*TEACHER_NAMES, *names])
    return create_model("PipelineParams", __base__=PipelineBase, distill=(section, section()),
                        evaluate=(EvaluateParams, evaluate), report=(ReportParams, ReportParams()))


def schema():
    """The model of the whole params file for the methods registered now."""
    return _schema(tuple(distill.METHODS.items()))


def format_errors(err: ValidationError, source):
    lines = []
    for e in err.errors():
        # Drop pydantic's union-branch markers so the key reads as in params.yaml.
        key = ".".join(str(p) for p in e["loc"] if not str(p).startswith(("function-", "tagged-")))
        given = e.get("input")
        shown = "" if isinstance(given, dict) else f" (got {given!r})"
        lines.append(f"{source}: {key or '<top level>'}: {e['msg']}{shown}")
    return "\n".join(lines)


def parse_params(raw, source="params.yaml"):
    """Validate an already-parsed dict; raise ConfigError listing every bad key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(raw).__name__}")
    try:
        return schema().model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_errors(err, source)) from None


def read_params(path):
    """The parsed (not yet validated) params file; ConfigError if missing or not YAML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such params file")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None


def load_params(path):
    return parse_params(read_params(path), source=str(path))
