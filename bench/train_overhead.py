"""Ray Train overhead: the same training step in a bare loop and inside a 1-worker TorchTrainer.

Both runs execute `pipeline.training.loop.run_training` on the default diffusion
teacher (MNIST shape, params.yaml), with the same threads, each in a fresh
process (torch's idle OpenMP threads from one run must not steal CPU from the
other). Throughput comes from the loop's own per-window samples/s (the first
window, warm-up, is dropped); each Ray window includes its `ray.train.report`
barrier. Prints both figures and their ratio (target: Ray step time <= 1.10x
bare); `--repeats` alternates the two and reports medians.

    python bench/train_overhead.py [--steps 300] [--threads 2] [--repeats 1]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from pipeline.config.schema import load_params
from pipeline.runtime.cluster import RAY_ENV, connect
from pipeline.training.ray_train import fit
from pipeline.models.teachers import DataShape, DiffusionTeacherTask
from pipeline.runtime.tracking import StageRun
from pipeline.training.loop import LoopHooks, TrainRun, run_training

ROOT = Path(__file__).resolve().parent.parent


def fake_mnist(n=2048):
    g = torch.Generator().manual_seed(0)
    return {"x0": torch.rand(n, 1, 28, 28, generator=g) * 2 - 1,
            "y": torch.rand(n, 1, 28, 28, generator=g) * 2 - 1}


def measure(mode, steps, threads):
    """samples/s of one mode ("bare" or "ray") and its wall time, in this process."""
    params = load_params(ROOT / "params.yaml")
    teacher = params.teacher.diffusion
    train = teacher.train.model_copy(update={"steps": steps, "log_every": 50, "checkpoint_every": steps})
    task = DiffusionTeacherTask(teacher, DataShape(1, 28, True))
    tick = time.perf_counter()
    if mode == "bare":
        torch.set_num_threads(threads)
        hooks = LoopHooks()
        run_training(task, fake_mnist(), train, 0, hooks)
        speeds = [m["samples_per_sec"] for m in hooks.history[1:]]
        return statistics.median(speeds), time.perf_counter() - tick, train.batch_size
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    connect(None, num_cpus=os.cpu_count())
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        run = StageRun(uri, "bench", "overhead", {"group": "bench", "stage": "bench"}, {},
                       artifact_root=Path(tmp, "a").as_uri())
        scaling = params.ray.model_copy(update={"num_workers": 1, "threads_per_worker": threads})
        fit(TrainRun(task, fake_mnist, train, 0, scaling, log=run.logger()), Path(tmp) / "ray", "overhead")
        history = sorted(MlflowClient(uri).get_metric_history(run.run_id, "train/samples_per_sec"),
                         key=lambda m: m.step)
        return statistics.median(m.value for m in history[1:]), time.perf_counter() - tick, train.batch_size


def run_mode(mode, args):
    out = subprocess.run([sys.executable, __file__, "--mode", mode, "--steps", str(args.steps),
                          "--threads", str(args.threads)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--mode", choices=["bare", "ray"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(measure(args.mode, args.steps, args.threads)))
        return
    results = {"bare": [], "ray": []}
    for _ in range(args.repeats):
        for mode in ("bare", "ray"):
            results[mode].append(run_mode(mode, args))
    bare = statistics.median(r[0] for r in results["bare"])
    ray = statistics.median(r[0] for r in results["ray"])
    batch = results["bare"][0][2]
    print(f"steps={args.steps} batch={batch} threads={args.threads} repeats={args.repeats}")
    print(f"bare loop      : {bare:8.1f} samples/s  ({1000 * batch / bare:.1f} ms/step)")
    print(f"TorchTrainer x1: {ray:8.1f} samples/s  ({1000 * batch / ray:.1f} ms/step), "
          f"wall incl. start-up {statistics.median(r[1] for r in results['ray']):.1f} s")
    print(f"step time ratio Ray/bare: {bare / ray:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
