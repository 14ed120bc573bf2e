"""Run a command (e.g. `dvc repro`) with one local Ray cluster that every stage joins.

    python scripts/with_ray.py dvc repro
    python scripts/with_ray.py --num-cpus 8 dvc exp run -S distill.mm.lr=1e-4

Without it each stage starts and stops a local Ray of its own (~5-7 s of its fixed cost,
BENCHMARKS.md "Stage fixed cost"). This script starts one cluster, hands its address to the
command as RAY_ADDRESS (the stages join it, stages/common.connect_ray), waits for the
command, then stops exactly the cluster it started (never `ray stop`, which would stop every
Ray on the host). Its exit status is the command's. With RAY_ADDRESS already set it starts
nothing and runs the command on that cluster.
"""
import argparse
import os
import subprocess
import sys


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs of the cluster (default: all)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command and its arguments")
    args = parser.parse_args()
    if not args.command:
        parser.error("give the command to run, e.g. `python scripts/with_ray.py dvc repro`")
    if os.environ.get("RAY_ADDRESS"):
        sys.exit(subprocess.call(args.command))
    import ray

    from pipeline.runtime.cluster import RAY_ENV
    for key, value in RAY_ENV.items():  # the cluster's own processes see them too
        os.environ.setdefault(key, value)
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": dict(RAY_ENV)})
    try:  # os.environ after ray.init: it holds what joining needs (the cluster's auth token)
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
        print(f"with_ray: Ray cluster at {env['RAY_ADDRESS']} ({args.num_cpus} CPUs)", file=sys.stderr)
        status = subprocess.call(args.command, env=env)
    finally:
        ray.shutdown()
    sys.exit(status)


if __name__ == "__main__":
    main()
