"""A slow tracking server against the training loop: metrics sent in the background
(`tracking.MetricLogger`) against the same calls made in the loop (synchronous `log_batch`).

The default diffusion teacher's training step (MNIST shape, params.yaml) runs in the bare
`run_training` loop three ways in this process, alternated `--repeats` times: without a
logger, with a synchronous logger, and with `MetricLogger`. Each `log_batch` request is
delayed by `--delay` seconds before it goes to a local SQLite store (a server that takes
that long to answer). Prints the loop's steps/s in each mode, its ratio to the run without
a logger (target: the background logger within a few per cent of 1), and the share of the
loop's time spent inside the logger's calls: the direct cost to training, which, unlike
the steps/s ratio, does not move with other load on the machine.

    python bench/slow_tracking.py [--steps 120] [--log-every 10] [--delay 1.0] [--repeats 2]
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from pipeline.config.schema import load_params
from pipeline.models.teachers import DataShape, DiffusionTeacherTask
from pipeline.runtime.tracking import MetricLogger, StageRun
from pipeline.training.loop import LoopHooks, run_training

ROOT = Path(__file__).resolve().parent.parent


def slow_server(delay_s):
    """Delay every log_batch request by `delay_s` (all clients of this process)."""
    send = MlflowClient.log_batch

    def slow(self, *args, **kwargs):
        time.sleep(delay_s)
        return send(self, *args, **kwargs)

    MlflowClient.log_batch = slow


class SyncLogger:
    """What the loop did before: one blocking log_batch per call."""

    def __init__(self, uri, run_id):
        self.client, self.run_id = MlflowClient(uri), run_id

    def __call__(self, metrics, step):
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


class Timed:
    """A logger wrapper that adds up the seconds the loop spends inside its calls."""

    def __init__(self, log):
        self.log, self.seconds = log, 0.0

    def __call__(self, metrics, step):
        tick = time.perf_counter()
        self.log(metrics, step)
        self.seconds += time.perf_counter() - tick


def steps_per_sec(task, data, train, log):
    """(steps/s of the loop, share of its time spent inside `log` calls)."""
    timed = Timed(log) if log is not None else None
    tick = time.perf_counter()
    run_training(task, data, train, 0, LoopHooks(log=timed))
    seconds = time.perf_counter() - tick
    if hasattr(log, "flush"):
        log.flush()  # delivered after the loop: not part of its time, as in a Ray worker's end
    return train.steps / seconds, (timed.seconds / seconds if timed else 0.0)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--delay", type=float, default=1.0, help="seconds per log_batch request")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(ROOT / "params.yaml")
    teacher = params.teacher.diffusion
    train = teacher.train.model_copy(update={"steps": args.steps, "log_every": args.log_every,
                                             "checkpoint_every": args.steps, "warmup_steps": 0})
    task = DiffusionTeacherTask(teacher, DataShape(1, 28, True))
    g = torch.Generator().manual_seed(0)
    data = {"x0": torch.rand(2048, 1, 28, 28, generator=g) * 2 - 1,
            "y": torch.rand(2048, 1, 28, 28, generator=g) * 2 - 1}
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        run = StageRun(uri, "bench", "slow tracking", {"group": "bench", "stage": "bench"}, {},
                       artifact_root=Path(tmp, "a").as_uri())
        slow_server(args.delay)
        steps_per_sec(task, data, train.model_copy(update={"steps": args.log_every}), None)  # warm-up
        results = {"no logger": [], "synchronous log_batch": [], "MetricLogger (background)": []}
        for _ in range(args.repeats):
            results["no logger"].append(steps_per_sec(task, data, train, None))
            results["synchronous log_batch"].append(steps_per_sec(task, data, train, SyncLogger(uri, run.run_id)))
            results["MetricLogger (background)"].append(
                steps_per_sec(task, data, train, MetricLogger(uri, run.run_id)))
    base = statistics.median(s for s, _ in results["no logger"])
    print(f"{args.steps} steps, a log every {args.log_every}, {args.delay:g} s per log_batch request, "
          f"{args.threads} threads, median of {args.repeats}:")
    print(f"{'mode':28s} {'steps/s':>8s} {'ratio to no logger':>19s} {'share in log calls':>19s}")
    for mode, runs in results.items():
        speed, share = statistics.median(s for s, _ in runs), statistics.median(f for _, f in runs)
        print(f"{mode:28s} {speed:8.3f} {speed / base:19.3f} {share:19.3%}")


if __name__ == "__main__":
    main()
