"""Wall time of `dvc repro`, per stage and in total (stage boundaries read from DVC's output).

    python bench/time_repro.py            # whatever is out of date
    python bench/time_repro.py -f         # everything (the full default run)
    python bench/time_repro.py --noop 5   # median of 5 runs with nothing changed
    python bench/time_repro.py distill@mm evaluate@mm   # only these targets (and what they need)
"""
import argparse
import statistics
import subprocess
import sys
import time


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
    stages, total = timed_repro((["-f"] if args.force else []) + args.targets)
    print("| stage | seconds |\n|---|---|")
    for name, seconds in stages:
        print(f"| {name} | {seconds:.1f} |")
    print(f"| **total** | **{total:.1f}** ({total / 60:.1f} min) |")


if __name__ == "__main__":
    main()
