"""Ray Train overhead: the same training step in a bare loop and inside a 1-worker TorchTrainer.

Both runs execute `pipeline.training.run_training` on the default diffusion
teacher (MNIST shape, params.yaml), with the same threads. Throughput comes
from the loop's own per-window samples/s (the first window, warm-up, is
dropped); each Ray window includes its `ray.train.report` barrier. Prints
both figures and their ratio (target: Ray step time <= 1.10x bare).

    python bench/train_overhead.py [--steps 300] [--threads 2]
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from pipeline.config import load_params
from pipeline.distributed import RAY_ENV, connect, fit
from pipeline.teachers import DataShape, DiffusionTeacherTask
from pipeline.tracking import StageRun
from pipeline.training import LoopHooks, run_training

ROOT = Path(__file__).resolve().parent.parent


def fake_mnist(n=2048):
    g = torch.Generator().manual_seed(0)
    return {"x0": torch.rand(n, 1, 28, 28, generator=g) * 2 - 1,
            "y": torch.rand(n, 1, 28, 28, generator=g) * 2 - 1}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    params = load_params(ROOT / "params.yaml")
    teacher = params.teacher.diffusion
    train = teacher.train.model_copy(update={"steps": args.steps, "log_every": 50,
                                             "checkpoint_every": args.steps})
    task = DiffusionTeacherTask(teacher, DataShape(1, 28, True))

    torch.set_num_threads(args.threads)
    hooks = LoopHooks()
    tick = time.perf_counter()
    run_training(task, fake_mnist(), train, 0, hooks)
    bare_wall = time.perf_counter() - tick
    bare = statistics.median(m["samples_per_sec"] for m in hooks.history[1:])

    import os
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    connect(None, num_cpus=os.cpu_count())
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        run = StageRun(uri, "bench", "overhead", {"group": "bench", "stage": "bench"}, {},
                       artifact_root=Path(tmp, "a").as_uri())
        tick = time.perf_counter()
        fit(task, fake_mnist, train, 0, params.ray.model_copy(update={"num_workers": 1,
            "threads_per_worker": args.threads}), Path(tmp) / "ray", "overhead", log=run.logger())
        ray_wall = time.perf_counter() - tick
        history = sorted(MlflowClient(uri).get_metric_history(run.run_id, "train/samples_per_sec"),
                         key=lambda m: m.step)
        ray = statistics.median(m.value for m in history[1:])
    print(f"steps={args.steps} batch={train.batch_size} threads={args.threads}")
    print(f"bare loop      : {bare:8.1f} samples/s  ({1000 * train.batch_size / bare:.1f} ms/step), "
          f"wall {bare_wall:.1f} s")
    print(f"TorchTrainer x1: {ray:8.1f} samples/s  ({1000 * train.batch_size / ray:.1f} ms/step), "
          f"wall {ray_wall:.1f} s incl. start-up")
    print(f"step time ratio Ray/bare: {bare / ray:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
