"""Training throughput on one GPU: the bare loop against a 1-worker TorchTrainer (use_gpu),
and bf16 autocast against fp32, for a network of the GPU size: the diffusion teacher of
profiles/cifar10-class.yaml (3x32x32, class-conditional, attention at 16x16, 26.7M parameters).

Each (mode, precision) runs in its own process; throughput is the loop's own per-window
samples/s with the first window (warm-up, cuDNN autotuning) dropped. Prints the four
figures and two ratios measured in the same run: TorchTrainer / bare (fp32) and bf16 / fp32
(bare). `bash bench/gpu_check.sh` runs it; `--device cpu --small` checks the script itself.

    python bench/gpu_train.py [--steps 200] [--batch 128] [--device cuda] [--small]
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config.schema import load_params  # noqa: E402
from pipeline.config.settings import ComputeParams, RayParams, TrainParams, UNetParams  # noqa: E402
from pipeline.models.teachers import DataShape, DiffusionTeacherTask  # noqa: E402
from pipeline.training.loop import LoopHooks, TrainRun, run_training  # noqa: E402


def fake_cifar(n=4096, size=32):
    g = torch.Generator().manual_seed(0)
    return {"x0": torch.rand(n, 3, size, size, generator=g) * 2 - 1,
            "label": torch.randint(0, 10, (n,), generator=g)}


def task(small):
    params = load_params(ROOT / "profiles" / "cifar10-class.yaml").teacher.diffusion
    if small:
        params = params.model_copy(update={"net": UNetParams(channels=(16, 32), blocks_per_level=1, emb_dim=32)})
    return DiffusionTeacherTask(params, DataShape(3, 32, False, classes=10))


def measure(mode, precision, args):
    """(median samples/s, parameters) of one (mode, precision) in this process."""
    compute = ComputeParams(precision=precision, tf32=args.device == "cuda", channels_last=args.device == "cuda")
    train = TrainParams(steps=args.steps, batch_size=args.batch, lr=2e-4, warmup_steps=10,
                        log_every=max(1, args.steps // 10), checkpoint_every=args.steps)
    job = task(args.small)
    params = sum(p.numel() for p in job.build()["denoiser"].parameters())
    if mode == "bare":
        hooks = LoopHooks(device=torch.device(args.device), compute=compute)
        run_training(job, fake_cifar(), train, 0, hooks)
        return statistics.median(m["samples_per_sec"] for m in hooks.history[1:]), params
    from mlflow.tracking import MlflowClient

    from pipeline.runtime.cluster import RAY_ENV, connect

    from pipeline.training.ray_train import fit
    from pipeline.runtime.tracking import StageRun
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    connect(None, num_cpus=os.cpu_count())
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        run = StageRun(uri, "bench", "gpu", {"group": "bench", "stage": "bench"}, {},
                       artifact_root=Path(tmp, "a").as_uri())
        scaling = RayParams(num_workers=1, use_gpu=args.device == "cuda", threads_per_worker=2, compute=compute)
        fit(TrainRun(job, fake_cifar, train, 0, scaling, log=run.logger()), Path(tmp) / "ray", "gpu")
        history = sorted(MlflowClient(uri).get_metric_history(run.run_id, "train/samples_per_sec"),
                         key=lambda m: m.step)
        return statistics.median(m.value for m in history[1:]), params


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="a tiny network (checks the script)")
    ap.add_argument("--one", nargs=2, metavar=("MODE", "PRECISION"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one, args)))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu_train.py: torch sees no CUDA device (use --device cpu --small to check the script)")
    figures = {}
    for mode, precision in (("bare", "fp32"), ("ray", "fp32"), ("bare", "bf16"), ("ray", "bf16")):
        tick = time.perf_counter()
        cmd = [sys.executable, __file__, "--one", mode, precision, "--steps", str(args.steps),
               "--batch", str(args.batch), "--device", args.device] + (["--small"] if args.small else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{mode}/{precision} failed:\n{out.stderr[-3000:]}")
        figures[mode, precision], params = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{mode:4s} {precision}: {figures[mode, precision]:9.1f} samples/s "
              f"(process wall {time.perf_counter() - tick:.0f} s)", flush=True)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device={name} params={params / 1e6:.1f}M batch={args.batch} steps={args.steps}")
    print(f"TorchTrainer / bare, fp32: {figures['ray', 'fp32'] / figures['bare', 'fp32']:.3f}")
    print(f"TorchTrainer / bare, bf16: {figures['ray', 'bf16'] / figures['bare', 'bf16']:.3f}")
    print(f"bf16 / fp32, bare loop   : {figures['bare', 'bf16'] / figures['bare', 'fp32']:.3f}")


if __name__ == "__main__":
    main()
