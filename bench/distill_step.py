"""Seconds per distillation training step, per method, against the teacher's own step.

Each method's `train_step` on the default params (architecture, batch size, L:K, ...)
with MNIST-shaped random data and an untrained teacher of the default architecture
(the cost does not depend on the weights), in a bare `run_training` loop. The
teacher's own training step (same loop, batch size of the method) is measured in
the same run as the baseline, so the ratios hold on a noisy machine. This is what
sizes `distill.<method>.train.steps` for the CPU budget.

    python bench/distill_step.py [--steps 6] [--threads 2] [--methods ibmd mm ...]
"""
import argparse
import time

import torch

from pipeline.config.schema import load_params
from pipeline.distill import METHODS, make_method
from pipeline.models.loading import build_teacher
from pipeline.models.teachers import TEACHERS, DataShape, teacher_config
from pipeline.training.loop import Task


def seconds_per_step(task: Task, train, steps, data):
    nets = task.build()
    optimizers = task.optimizers(nets, train)
    generator = torch.Generator().manual_seed(0)
    batch = {k: v[:train.batch_size] for k, v in data.items()}
    times = []
    for step in range(steps + 1):  # the first step warms up and is dropped
        tick = time.perf_counter()
        task.train_step(nets, optimizers, batch, generator, train)
        task.after_step(nets, step + 1)
        times.append(time.perf_counter() - tick)
    return sorted(times[1:])[len(times[1:]) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params("params.yaml")
    shape = DataShape(channels=1, image_size=28, conditional=True)
    data = {"x0": torch.rand(512, 1, 28, 28) * 2 - 1, "y": torch.rand(512, 1, 28, 28) * 2 - 1}
    print(f"{'method':<8} {'batch':>5} {'s/step':>8} {'teacher s/step':>15} {'ratio':>6} "
          f"{'steps':>6} {'est. train s':>12}")
    for name in args.methods:
        method_params = getattr(params.distill, name)
        teacher_name = METHODS[name].teacher
        teacher_params = getattr(params.teacher, teacher_name)
        teacher = build_teacher(teacher_config(teacher_name, teacher_params, shape))
        train = method_params.train
        cost = seconds_per_step(make_method(name, method_params, teacher), train, args.steps, data)
        teacher_task = TEACHERS[teacher_name][1](teacher_params, shape)
        base = seconds_per_step(teacher_task, teacher_params.train.model_copy(
            update={"batch_size": train.batch_size}), args.steps, data)
        print(f"{name:<8} {train.batch_size:>5} {cost:>8.3f} {base:>15.3f} {cost / base:>6.2f} "
              f"{train.steps:>6} {cost * train.steps:>12.0f}", flush=True)


if __name__ == "__main__":
    main()
