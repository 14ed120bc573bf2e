"""Distillation methods: the registry. Nothing else branches on a method's name.

Adding a method = one module implementing `base.Method`, one line here, one
params block in `pipeline.settings` (and `params.yaml`); the contract tests
in tests/contract pick it up.
"""
from pipeline.distill.base import Method, Student, load_student as _load_student
from pipeline.distill.cd import ConsistencyDistillation
from pipeline.distill.ibmd import IBMD
from pipeline.distill.mm import MomentMatching
from pipeline.distill.pd import ProgressiveDistillation
from pipeline.distill.tdd import TargetDrivenDistillation

METHODS: dict[str, type[Method]] = {m.name: m for m in [
    IBMD, MomentMatching, TargetDrivenDistillation, ProgressiveDistillation, ConsistencyDistillation]}


def make_method(name, params, teacher) -> Method:
    """The method `name` with its validated params block, distilling `teacher`."""
    if name not in METHODS:
        raise KeyError(f"unknown distillation method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name](params, teacher)


def load_student(path) -> Student:
    return _load_student(path, METHODS)
