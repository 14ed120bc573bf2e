"""CPU milliseconds per image of the "inception" FID extractor (pipeline/features/inception.py).

Times the extractor's forward (uint8 grayscale 28x28 -> TF-bilinear resize to 299 ->
Inception pool3) on random images, per thread count, after one warm-up batch, and the
resize alone: wall time and this process's CPU time (user + system, all its threads).
The cost does not depend on the pixel values. On a busy machine the wall time grows with
the load average it prints; the CPU time per image at 1 thread is the better measure of
the cost then (it is what the extractor takes from the machine).

    python bench/inception_cost.py [--threads 1 2] [--batch 32] [--repeats 3] [--size 28]
"""
import argparse
import os
import time

import torch

from pipeline.features.extractors import InceptionFeatureExtractor
from pipeline.features.inception import to_network_input


def ms_per_image(fn, x, repeats):
    """(best wall, median wall, median CPU) milliseconds per image."""
    with torch.no_grad():
        fn(x)  # warm-up
        wall, cpu = [], []
        for _ in range(repeats):
            tick, cpu_tick = time.perf_counter(), time.process_time()
            fn(x)
            wall.append(time.perf_counter() - tick)
            cpu.append(time.process_time() - cpu_tick)
    median = len(wall) // 2
    return tuple(1000 * t / len(x) for t in (min(wall), sorted(wall)[median], sorted(cpu)[median]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--channels", type=int, default=1, choices=(1, 3))
    args = parser.parse_args()
    extractor = InceptionFeatureExtractor("inception", ["2048"]).eval()
    x = torch.randint(0, 256, (args.batch, args.channels, args.size, args.size), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0))
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; "
          f"batch {args.batch} of {args.channels}x{args.size}x{args.size} uint8")
    for threads in args.threads:
        torch.set_num_threads(threads)
        best, median, cpu = ms_per_image(extractor, x, args.repeats)
        resize = ms_per_image(to_network_input, x, args.repeats)[1]
        print(f"{threads} thread(s): wall {best:.1f} ms/image best, {median:.1f} median; CPU {cpu:.1f} ms/image "
              f"(resize + scaling: {resize:.2f} ms wall); load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
