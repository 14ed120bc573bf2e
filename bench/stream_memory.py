"""Peak memory and throughput of training data loading: the whole split in memory
(`ray.buffer_shards: null`) against streaming K shards per worker, as the split grows 10x.

Writes synthetic 28x28 shards (1,000 samples each) of N and 10N samples, then trains the
default diffusion teacher for a few steps in a fresh process per configuration (bare loop,
one worker), and prints each process's peak RSS and the loop's samples/s (first window
dropped). Streaming should keep peak memory flat as N grows 10x, at the samples/s of the
in-memory loader (ratios from the same run).

    python bench/stream_memory.py [--n 5000] [--steps 120] [--buffer 2]
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.data.shards import write_manifest, write_split  # noqa: E402


def synthetic(out, n, shard_size=1000):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    y = torch.rand(n, 1, 28, 28, generator=g) * 2 - 1
    label = torch.randint(0, 10, (n,), generator=g)
    out.mkdir(parents=True)
    entry = write_split(out, "train", x0, y, label, shard_size)
    write_manifest(out, {"splits": {"train": entry}, "x0_shape": [1, 28, 28], "y_shape": [1, 28, 28],
                         "conditional": True, "num_classes": 10})


def measure(data_dir, buffer, steps):
    from pipeline.config.schema import load_params
    from pipeline.data.stream import TrainData
    from pipeline.models.teachers import DataShape, DiffusionTeacherTask
    from pipeline.training.loop import LoopHooks, run_training
    torch.set_num_threads(2)
    params = load_params(ROOT / "params.yaml")
    teacher = params.teacher.diffusion
    train = teacher.train.model_copy(update={"steps": steps, "log_every": max(1, steps // 6),
                                             "checkpoint_every": steps})
    data = TrainData(str(data_dir), "train", ("x0", "y"), buffer_shards=buffer)()
    hooks = LoopHooks()
    run_training(DiffusionTeacherTask(teacher, DataShape(1, 28, True)), data, train, 0, hooks)
    speed = statistics.median(m["samples_per_sec"] for m in hooks.history[1:])
    return speed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MB (Linux: KB)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--buffer", type=int, default=2)
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        buffer = None if args.one[1] == "none" else int(args.one[1])
        print(json.dumps(measure(args.one[0], buffer, args.steps)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        figures = {}
        for n in (args.n, 10 * args.n):
            synthetic(Path(tmp) / str(n), n)
            for buffer in ("none", str(args.buffer)):
                out = subprocess.run([sys.executable, __file__, "--one", str(Path(tmp) / str(n)), buffer,
                                      "--steps", str(args.steps)], capture_output=True, text=True)
                if out.returncode:
                    sys.exit(out.stderr[-3000:])
                figures[n, buffer] = json.loads(out.stdout.strip().splitlines()[-1])
                speed, rss = figures[n, buffer]
                label = "whole split" if buffer == "none" else f"stream K={buffer}"
                print(f"N={n:6d} {label:12s}: peak RSS {rss:7.0f} MB, {speed:6.1f} samples/s", flush=True)
    k = str(args.buffer)
    print(f"peak RSS 10N / N: whole split {figures[10 * args.n, 'none'][1] / figures[args.n, 'none'][1]:.2f}, "
          f"stream {figures[10 * args.n, k][1] / figures[args.n, k][1]:.2f}")
    print(f"samples/s stream / whole split at N: {figures[args.n, k][0] / figures[args.n, 'none'][0]:.3f}")


if __name__ == "__main__":
    main()
