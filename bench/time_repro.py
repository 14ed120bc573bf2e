"""Wall time of `dvc repro`, per stage and in total (stage boundaries read from DVC's output).

    python bench/time_repro.py            # whatever is out of date
    python bench/time_repro.py -f         # everything (the full default run)
    python bench/time_repro.py --noop 5   # median of 5 runs with nothing changed
    python bench/time_repro.py distill@mm evaluate@mm   # only these targets (and what they need)

Before and after the run it times the default diffusion teacher's bare training step (median
of 10, 2 threads, random MNIST-shaped data): these machines' speed drifts by tens of percent
over hours, and that figure says how fast the machine was while the run was timed.
"""
import argparse
import statistics
import subprocess
import sys
import time


def teacher_step_seconds(steps=10):
    """Median seconds of one training step of the default diffusion teacher, bare loop."""
    code = f"""
import time, torch
from pipeline.config.schema import load_params
from pipeline.models.teachers import TEACHERS, DataShape
torch.set_num_threads(2)
params = load_params("params.yaml").teacher.diffusion
task = TEACHERS["diffusion"][1](params, DataShape(channels=1, image_size=28, conditional=True))
nets = task.build()
optimizers = task.optimizers(nets, params.train)
g = torch.Generator().manual_seed(0)
n = params.train.batch_size
batch = {{"x0": torch.rand(n, 1, 28, 28) * 2 - 1, "y": torch.rand(n, 1, 28, 28) * 2 - 1}}
times = []
for _ in range({steps} + 2):
    tick = time.perf_counter()
    task.train_step(nets, optimizers, batch, g, params.train)
    times.append(time.perf_counter() - tick)
print(sorted(times[2:])[{steps} // 2])
"""
    # A fresh process: the timing must not share torch's threads with this driver.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def timed_repro(extra):
    proc = subprocess.Popen(["dvc", "repro", *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    start = last = time.perf_counter()
    stages, current = [], None
    for line in proc.stdout:
        if line.startswith("Running stage"):
            now = time.perf_counter()
            if current:
                stages.append((current, now - last))
            current, last = line.split("'")[1], now
    proc.wait()
    end = time.perf_counter()
    if current:
        stages.append((current, end - last))
    if proc.returncode:
        sys.exit(f"dvc repro failed ({proc.returncode})")
    return stages, end - start


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-f", "--force", action="store_true")
    ap.add_argument("--noop", type=int, default=0, help="time N no-op runs instead")
    ap.add_argument("targets", nargs="*", help="stages to reproduce (default: all)")
    args = ap.parse_args()
    if args.noop:
        times = [timed_repro([])[1] for _ in range(args.noop)]
        print(f"no-op dvc repro: median {statistics.median(times):.2f} s over {len(times)} runs "
              f"(min {min(times):.2f}, max {max(times):.2f})")
        return
    before = teacher_step_seconds()
    stages, total = timed_repro((["-f"] if args.force else []) + args.targets)
    after = teacher_step_seconds()
    print("| stage | seconds |\n|---|---|")
    for name, seconds in stages:
        print(f"| {name} | {seconds:.1f} |")
    print(f"| **total** | **{total:.1f}** ({total / 60:.1f} min) |")
    print(f"\nmachine speed: the default diffusion teacher's bare training step took {before:.3f} s "
          f"before the run and {after:.3f} s after it")


if __name__ == "__main__":
    main()
