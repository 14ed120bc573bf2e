"""The interface every distillation method implements (the trained student it produces is a
`models.students.Student`, loaded by `models.loading.load_student`).

A method is a `Method`: a frozen params model (registered in `pipeline.distill`) plus
- `build()`: init from the frozen teacher: {"student": ..., [auxiliary nets]},
  each a trainable copy of the teacher's denoiser (or a frozen target);
- `loss(nets, batch, generator)`: the student's per-sample objective (B,);
- `train_step(...)`: one optimisation step (methods with an auxiliary network
  alternate their updates here); `after_step(nets, step)`: EMA targets, rounds;
- `sample(student, y, noise, nfe, guidance)`: a sample that calls `student`
  exactly `nfe` times (the caller counts), for each nfe in `nfe_choices()`.

A method is a `training.Task`, so `run_training` (bare or under Ray Train)
trains it like a teacher. The frozen teacher lives on the method, not in
`build()`'s dict: it is never checkpointed, wrapped in DDP or averaged.
"""
import copy
from typing import ClassVar

import torch
from torch import nn

from pipeline.config.settings import Params
from pipeline.distill import name_of, registration
from pipeline.models.teachers import Teacher, teacher_config
from pipeline.training.loop import Task


def col(v):  # (B,) -> (B, 1, 1, 1) to broadcast over images
    return v.reshape(-1, 1, 1, 1)


def trainable_copy(net: nn.Module) -> nn.Module:
    """A deep copy of a (frozen) network with every parameter trainable, in train mode."""
    return copy.deepcopy(net).requires_grad_(True).train()


def frozen_copy(net: nn.Module) -> nn.Module:
    """A deep copy with no trainable parameter, in eval mode."""
    return copy.deepcopy(net).requires_grad_(False).eval()


def unwrap(net):
    """The module inside its training wrappers (torch.compile, bf16 autocast, DDP; see
    pipeline.training.compute.for_training), or the module itself."""
    from pipeline.training.compute import Autocast
    while True:
        if hasattr(net, "_orig_mod"):  # torch.compile's OptimizedModule
            net = net._orig_mod
        elif isinstance(net, Autocast):
            net = net.net
        elif isinstance(net, torch.nn.parallel.DistributedDataParallel):
            net = net.module
        else:
            return net


def batch_noise(shape, generator, device):
    """Standard normal noise from the loop's CPU generator, on `device`."""
    return torch.randn(shape, generator=generator).to(device)


class Method(Task):
    """A distillation method (see the module docstring). Its name and the teacher it distils
    come from the registry entry of its params model (`pipeline.distill.METHODS`)."""

    data_keys: ClassVar[tuple] = ("x0", "y")  # what training reads from the train split
    takes_guidance: ClassVar[bool] = False  # True: sample() accepts guidance != 0

    def __init__(self, params: Params, teacher: Teacher):
        self.name = name_of(params)
        wanted = registration(self.name).teacher
        if teacher.name != wanted:
            raise ValueError(f"{self.name} distils the {wanted} teacher, got {teacher.name!r}")
        self.params, self.teacher = params, teacher

    @property
    def conditional(self):
        """The teacher takes a condition (an image y or a class label)."""
        return self.teacher.shape.takes_condition

    def condition(self, batch):
        """The teacher's condition from a training batch (`DataShape.condition`)."""
        return self.teacher.shape.condition(batch)

    @property
    def train_keys(self):
        """The train split's fields training reads: `data_keys`, plus the label of a
        class-conditional teacher."""
        return (*self.data_keys, "label") if self.teacher.shape.classes else tuple(self.data_keys)

    def to(self, device):
        self.teacher.denoiser.to(device)
        return self

    def nfe_choices(self) -> list[int]:
        """The NFEs this student samples with."""
        raise NotImplementedError

    def sample(self, student, y, noise, nfe, guidance=0.0):
        """x0 samples (raw, callers clip) calling `student` exactly `nfe` times; `noise` is
        a `SeededNoise` shaped like one sample (all randomness comes from it)."""
        raise NotImplementedError

    def check_sample_args(self, nfe, guidance):
        if nfe not in self.nfe_choices():
            raise ValueError(f"{self.name} student samples with nfe in {self.nfe_choices()}, not {nfe}")
        if guidance != 0 and not self.takes_guidance:
            raise ValueError(f"{self.name} student takes no classifier-free guidance (got {guidance})")


def student_config(method: Method):
    """The JSON-like config a student checkpoint carries: enough to rebuild and sample it."""
    t = method.teacher
    return {"method": method.name,
            "params": method.params.model_dump(mode="json"),
            "teacher": teacher_config(t.name, t.params, t.shape, t.denoiser)}
