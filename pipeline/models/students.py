"""A trained student ready to sample, with the same `sample` signature as `teachers.Teacher`.

`method` is the `distill.base.Method` that trained it (its params and frozen teacher); `net`
its network. `models.loading.load_student` rebuilds one from its checkpoint.
"""
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.samplers.nfe import CountingDenoiser


@dataclass
class Student:
    method: "Method"  # noqa: F821 (pipeline.distill.base.Method)
    net: nn.Module

    @property
    def name(self):
        return self.method.name

    @property
    def teacher_name(self):
        return self.method.teacher.name

    def sample(self, sampler, y, noise, nfe, guidance=0.0, grid=None):
        """(x0 samples, NFE spent); `sampler` must be "student". `grid` is the teachers'
        option and is ignored: a student samples on the grid its params define."""
        if sampler != "student":
            raise ValueError(f"a {self.name} student has one sampler, 'student', not {sampler!r}")
        self.method.check_sample_args(nfe, guidance)
        y = y if self.method.conditional else None
        counted = CountingDenoiser(self.net)
        with torch.no_grad():
            x = self.method.sample(counted, y, noise, nfe, guidance)
        if counted.calls != nfe:
            raise RuntimeError(f"{self.name} student: asked for {nfe} NFE, made {counted.calls} calls")
        return x, counted.calls
