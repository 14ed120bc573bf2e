"""Loading a model from its checkpoint: one loader per checkpoint kind, each reading the file
once, and the one place that knows which kinds exist.

| checkpoint kind | written by | rebuilt by |
|---|---|---|
| `teacher_<name>` | `teacher@<name>` | `load_teacher`: `teachers.build_trained_teacher`, or `pretrained.build_pretrained_teacher` when the config carries a diffusers "arch" |
| `student_<method>` | `distill@<method>` | `load_student`: its teacher rebuilt from the config it embeds (no teacher file needed), then the registry's method |

`load_model` takes either kind, by what the file records. Every checkpoint is read with
`weights_only=True` (`checkpoint.load_checkpoint`).
"""
from pipeline.config.settings import TEACHER_NAMES
from pipeline.distill import METHODS, registration
from pipeline.models.checkpoint import load_checkpoint
from pipeline.models.pretrained import build_pretrained_teacher
from pipeline.models.students import Student
from pipeline.models.teachers import Teacher, build_trained_teacher



def student_kinds():
    """The student checkpoint kinds of the methods registered now."""
    return {f"student_{m}" for m in METHODS}


def model_kind(name):
    """The checkpoint kind of the model `name` of evaluate.models."""
    return f"teacher_{name}" if name in TEACHER_NAMES else f"student_{name}"


def build_teacher(config) -> Teacher:
    """A frozen, untrained teacher of the architecture `config` (`teachers.teacher_config`)
    describes; a diffusers model (config with "arch") needs the optional extra `diffusers`."""
    return build_pretrained_teacher(config) if "arch" in config else build_trained_teacher(config)


def _teacher(payload) -> Teacher:
    teacher = build_teacher(payload["config"])
    teacher.denoiser.load_state_dict(payload["state"]["denoiser"])
    return teacher


def _student(payload) -> Student:
    config = payload["config"]
    entry = registration(config["method"])
    method = entry.load()(entry.params.model_validate(config["params"]), build_teacher(config["teacher"]))
    net = method.build()["student"]
    net.load_state_dict(payload["state"]["student"])
    return Student(method, net.eval().requires_grad_(False))


def load_teacher(path, names=TEACHER_NAMES) -> Teacher:
    """The teacher (EMA weights) a `teacher_<name>` checkpoint holds, `name` one of `names`."""
    return _teacher(load_checkpoint(path, kinds={f"teacher_{n}" for n in names}))


def load_student(path) -> Student:
    """The student a `student_<method>` checkpoint holds (any registered method)."""
    return _student(load_checkpoint(path, kinds=student_kinds()))


def load_model(path, name=None):
    """A `Teacher` or a `Student` (both `sample` alike), by the kind its checkpoint records;
    with `name` (of evaluate.models), the checkpoint must be that model's (CheckpointError
    naming the stage that writes it)."""
    payload = load_checkpoint(path, {model_kind(name)} if name else {f"teacher_{n}" for n in TEACHER_NAMES} | student_kinds())
    return _student(payload) if payload["kind"].startswith("student_") else _teacher(payload)
