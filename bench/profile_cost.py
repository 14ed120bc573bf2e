"""The compute a params file asks for: FLOPs of every training stage and of the evaluation,
and the hours they take at an assumed sustained throughput. An estimate from counted FLOPs,
not a timing: run bench/gpu_check.sh on the GPU to measure samples/s.

Counts with torch's FlopCounterMode (matmuls and convolutions; elementwise work is left
out) on the CPU: one real training step of each stage's task (the teacher's loss, each
method's full `train_step`, alternating updates included) at a batch of 2, scaled to the
params' batch and steps; the evaluation as the network calls of every (model, sampler, NFE)
point of the plan times n_samples x seeds, plus the feature extractor on every sample (a fixed
figure for an Inception one, INCEPTION_FLOPS). Untrained networks of the params' sizes: FLOPs do not depend on weights.

    python bench/profile_cost.py profiles/cifar10-class.yaml [--tflops 100]
"""
import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config.schema import load_params
from pipeline.distill import make_method
from pipeline.evaluation.sampling import plan
from pipeline.models.loading import build_teacher
from pipeline.models.teachers import TEACHERS, DataShape, teacher_config

PROBE = 2  # samples in the counted step


def flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def data_shape(params):
    c, h, _ = params.data.source.image_shape
    classes = 10 if params.corruption.class_conditional else 0  # the label's range; FLOPs need only its shape
    return DataShape(c, h, params.corruption.conditional, classes)


def probe_batch(shape):
    size = (PROBE, shape.channels, shape.image_size, shape.image_size)
    return {"x0": torch.randn(size).clamp(-1, 1), "y": torch.randn(size).clamp(-1, 1),
            "label": torch.randint(0, max(shape.classes, 1), (PROBE,))}


def step_flops(task, train):
    """FLOPs of one optimisation step at the params' batch size."""
    nets = task.build()
    optimizers = task.optimizers(nets, train)
    generator = torch.Generator().manual_seed(0)
    batch = probe_batch(task.teacher.shape if hasattr(task, "teacher") else task.shape)
    return flops(lambda: task.train_step(nets, optimizers, batch, generator, train)) * train.batch_size / PROBE


def forward_flops(denoiser, shape):
    batch = probe_batch(shape)
    x, sigma = batch["x0"], torch.ones(PROBE)
    cond = batch["label"] if shape.classes else batch["y"] if shape.conditional else None
    if hasattr(denoiser, "sees_y"):  # a bridge: (x_t, t, y)
        return flops(lambda: denoiser(x, sigma * 0.5, batch["y"])) / PROBE
    return flops(lambda: denoiser(x, sigma, cond)) / PROBE


# Inception-v3's forward at 299x299, ~5.7 G multiply-adds (the figure torchvision's model
# card gives): a TorchScript network, which FlopCounterMode does not trace into.
INCEPTION_FLOPS = 2 * 5.7e9


def extractor_flops(params):
    return INCEPTION_FLOPS if params.features.extractor.startswith("inception") else 0.0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("params")
    parser.add_argument("--tflops", type=float, default=100.0,
                        help="assumed sustained TFLOP/s (default 100: ~10 %% of an H100's dense bf16 peak)")
    args = parser.parse_args()
    params = load_params(args.params)
    shape, ev = data_shape(params), params.evaluate
    rows, teachers = [], {}
    for name in ("diffusion", "bridge"):
        section = getattr(params.teacher, name)
        task = TEACHERS[name][1](section, shape)
        teachers[name] = build_teacher(teacher_config(name, section, shape))
        if name == "bridge" and not shape.conditional:
            continue
        rows.append((f"teacher@{name}", step_flops(task, section.train) * section.train.steps))
    for method, teacher in params.distill.methods.items():
        block = getattr(params.distill, method)
        task = make_method(method, block, teachers[teacher])
        rows.append((f"distill@{method}", step_flops(task, block.train) * block.train.steps))
    per_sample = extractor_flops(params)
    for model in ev.models:
        teacher = model if model in TEACHERS else params.distill.methods[model]
        call = forward_flops(teachers[teacher].denoiser, shape)
        if model in TEACHERS:
            points = plan(model, getattr(ev.samplers, model), ev.nfe, ev.guidance if model == "diffusion" else 0.0)
        else:
            points = [("student", n) for n in make_method(model, getattr(params.distill, model),
                                                           teachers[teacher]).nfe_choices()]
        calls = sum(nfe for _, nfe in points)
        rows.append((f"evaluate@{model}", (calls * call + len(points) * per_sample) * ev.n_samples * len(ev.seeds)))
    total = sum(f for _, f in rows)
    print(f"{args.params}: {len(rows)} stages, at {args.tflops:g} TFLOP/s sustained (an assumption)")
    for name, f in rows:
        print(f"  {name:<20} {f / 1e15:10.2f} PFLOP  {f / (args.tflops * 1e12) / 3600:7.2f} h")
    print(f"  {'total':<20} {total / 1e15:10.2f} PFLOP  {total / (args.tflops * 1e12) / 3600:7.2f} h")


if __name__ == "__main__":
    main()
