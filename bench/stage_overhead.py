"""Per-stage fixed cost: each kind of stage run exactly as DVC runs it (`python stages/<x>.py`),
with a trivial workload, against the work itself.

    python bench/stage_overhead.py [--repeats 2] [--project DIR --python PY]

A throwaway copy of the project gets a params file shrunk to nothing (8x8 digits, tiny
nets, 1 training step, 1 evaluated point with 1 seed) and runs the chain prepare ->
features -> teacher@diffusion -> evaluate@diffusion -> floor -> report twice over:

- `fresh local Ray`: no RAY_ADDRESS, so every stage starts and stops its own local Ray;
- `existing cluster`: RAY_ADDRESS names a cluster this script started before (what
  `scripts/ray_cluster.sh` sets up for a whole `dvc repro`).

For each stage it prints the median wall time of the stage process over `--repeats`, and the
work itself: the same workload timed in this process with every import done and no Ray
(the training step in a bare loop, the evaluation's sampling and scoring, the report).
Overhead = wall - work. It then breaks the fixed cost down: the interpreter and the stage's
imports (a process that only imports what the stage imports), DVC's resolution of the stage's
params, joining against starting Ray, and Ray Train's own floor: a `TorchTrainer.fit` of a
function that only imports torch and reports once.

`--project DIR --python PY` runs the stage processes of another checkout with its own
interpreter (e.g. the previous commit, for a before/after figure in one run); the work is
always measured with this checkout's library.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
COPIED = ["pipeline", "stages", "dvc.yaml", "pyproject.toml", ".dvc/config", ".dvcignore"]

# (label, dvc stage, argv after `python`)
CHAIN = [
    ("prepare", "prepare", ["stages/prepare.py", "--out", "data/prepared"]),
    ("features (training, 1 step)", "features",
     ["stages/features.py", "--data", "data/prepared", "--out", "models/features"]),
    ("teacher@diffusion (training, 1 step)", "teacher@diffusion",
     ["stages/teacher.py", "diffusion", "--data", "data/prepared", "--out", "models/diffusion.pt"]),
    ("evaluate@diffusion (1 point, 1 seed)", "evaluate@diffusion",
     ["stages/evaluate.py", "diffusion", "--model", "models/diffusion.pt", "--data", "data/prepared",
      "--features", "models/features", "--out", "results/eval/diffusion"]),
    ("floor (2 points)", "floor",
     ["stages/floor.py", "--data", "data/prepared", "--features", "models/features", "--out", "results/eval/floor"]),
    ("report", "report", ["stages/report.py", "--evals", "results/eval", "--features", "models/features",
                          "--out", "results"]),
]


def trivial_params(project):
    """params.yaml of `project` shrunk to a trivial workload: 1 step, 1 point, 1 seed."""
    p = yaml.safe_load((project / "params.yaml").read_text())
    p["data"].update(source={"kind": "digits"}, n_test=100, n_reference=200, shard_size=400)
    p["corruption"] = {"kind": "super_resolution", "factor": 2, "mode": "pool"}
    p["features"]["train"].update(steps=1, log_every=1, checkpoint_every=1)
    p["features"]["classifier"].update(channels=[16, 32], feature_dim=32)
    t = p["teacher"]["diffusion"]
    t["net"].update(patch=2, channels=[16, 16], emb_dim=32)
    t["train"].update(steps=1, batch_size=32, log_every=1, checkpoint_every=1, warmup_steps=0)
    p["distill"]["methods"] = {}
    p["evaluate"].update(models=["diffusion"], nfe=[1], n_samples=48, batch_size=48, seeds=[1], groups=8,
                         grid_samples=8, samplers={"diffusion": ["euler"], "bridge": ["euler"]}, max_nfe={})
    return p


def make_project(source, dest):
    for name in COPIED:
        src = source / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dest / name)
    (dest / "params.yaml").write_text(yaml.safe_dump(trivial_params(source), sort_keys=False))
    (dest / "pretrained" / "diffusion").mkdir(parents=True)
    subprocess.run("git init -q && git add -A && git -c user.name=b -c user.email=b@b commit -qm bench",
                   cwd=dest, shell=True, check=True)
    return dest


def run_stage(python, project, argv, env):
    print(f"  {'joined' if env.get('RAY_ADDRESS') else 'fresh'}: {argv[0]}", file=sys.stderr, flush=True)
    tick = time.perf_counter()
    out = subprocess.run([python, *argv], cwd=project, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - tick
    if out.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed:\n{out.stderr[-3000:]}")
    return wall


def chain_walls(python, project, env, repeats):
    """{stage label: [wall seconds]} of the chain, run `repeats` times in order."""
    walls = {label: [] for label, _, _ in CHAIN}
    for _ in range(repeats):
        for label, _, argv in CHAIN:
            walls[label].append(run_stage(python, project, argv, env))
    return walls


def import_walls(python, project, env, repeats):
    """Seconds of a process that imports what each kind of stage imports, and nothing else."""
    probes = {
        "interpreter + torch": "import torch",
        "training stage's imports": "import common, mlflow, torch, ray.train.torch; import pipeline.training.ray_train, "
                                    "pipeline.training.jobs, pipeline.runtime.tracking",
        "evaluation stage's imports": "import common, mlflow, torch, ray; import pipeline.evaluation.sampling, "
                                      "pipeline.evaluation.scoring, pipeline.runtime.tracking",
    }
    out = {}
    for label, code in probes.items():
        times = []
        for _ in range(repeats):
            tick = time.perf_counter()
            r = subprocess.run([python, "-c", f"import sys; sys.path.insert(0, 'stages'); {code}"], cwd=project,
                               env=env, capture_output=True, text=True)
            if r.returncode:
                out[label] = f"failed: {r.stderr.strip().splitlines()[-1]}"
                break
            times.append(time.perf_counter() - tick)
        else:
            out[label] = statistics.median(times)
    return out


def dvc_resolution(python, project, env):
    code = ("import sys, time; sys.path.insert(0, 'stages'); import common; t = time.perf_counter(); "
            "common.stage_params('evaluate@diffusion'); print(time.perf_counter() - t)")
    r = subprocess.run([python, "-c", code], cwd=project, env=env, capture_output=True, text=True)
    return float(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else float("nan")


def ray_start(python, project, env, address):
    code = ("import time, ray; t = time.perf_counter(); "
            + (f"ray.init(address='{address}', log_to_driver=False)" if address else
               "ray.init(address='local', num_cpus=2, include_dashboard=False, log_to_driver=False)")
            + "; print(time.perf_counter() - t)")
    r = subprocess.run([python, "-c", code], cwd=project, env=env, capture_output=True, text=True)
    return float(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else float("nan")


TRIVIAL_FIT = """
import os, sys, tempfile, time
t0 = time.perf_counter()
import ray, ray.train, ray.train.torch
t1 = time.perf_counter()
ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
def train_fn(config):
    import torch  # noqa: F401  (what every training worker imports)
    ray.train.report({"step": 1})
with tempfile.TemporaryDirectory() as d:
    t2 = time.perf_counter()
    ray.train.torch.TorchTrainer(train_fn, scaling_config=ray.train.ScalingConfig(num_workers=1),
                                 run_config=ray.train.RunConfig(name="trivial", storage_path=d)).fit()
    print(t1 - t0, time.perf_counter() - t2)
"""


def ray_train_floor(python, project, env, repeats):
    """(import ray.train.torch, TorchTrainer.fit of a function that imports torch and reports
    once) in seconds, medians over `repeats` processes joined to the cluster in `env`."""
    runs = []
    for _ in range(repeats):
        r = subprocess.run([python, "-c", TRIVIAL_FIT], cwd=project, env=env, capture_output=True, text=True)
        if r.returncode:
            return float("nan"), float("nan")
        runs.append([float(v) for v in r.stdout.split()[-2:]])
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def work_seconds(project):
    """The chain's work in this process, imports done, no Ray: {stage label: seconds}."""
    import torch

    from pipeline.config.schema import load_params
    from pipeline.data.prepare import prepare_dataset
    from pipeline.data.shards import load_split
    from pipeline.evaluation.results import FeatureSpace
    from pipeline.evaluation.sampling import evaluate_model, score_all
    from pipeline.evaluation.scoring import Scorer
    from pipeline.report import write_report
    from pipeline.training.jobs import features_job, teacher_job
    from pipeline.training.loop import LoopHooks, run_training

    torch.set_num_threads(2)
    params = load_params(project / "params.yaml")
    data, work = project / "data" / "prepared", {}
    with tempfile.TemporaryDirectory() as tmp:
        tick = time.perf_counter()
        prepare_dataset(params.data.source, params.corruption, params.data.n_test, params.data.shard_size,
                        params.seed, Path(tmp) / "prepared", map_fn=lambda fn, jobs: [fn(j) for j in jobs],
                        n_reference=params.data.n_reference)
        work["prepare"] = time.perf_counter() - tick
        for label, job in (("features (training, 1 step)", features_job(params.features, data)),
                           ("teacher@diffusion (training, 1 step)", teacher_job("diffusion", params.teacher.diffusion,
                                                                                data))):
            tick = time.perf_counter()
            run_training(job.task, job.load_data(), job.train, params.seed, LoopHooks())
            work[label] = time.perf_counter() - tick
        ev, features = params.evaluate, FeatureSpace.load(project / "models" / "features")
        truth = load_split(data, "test").head(ev.n_samples)
        scorer = Scorer(features, ev.n_samples, ev.groups, truth.x0.shape[1:])
        tick = time.perf_counter()
        evaluate_model("diffusion", project / "models" / "diffusion.pt", data, scorer, ev, 1,
                       lambda fn, jobs, on_done=None: [fn(*j) for j in jobs])
        work["evaluate@diffusion (1 point, 1 seed)"] = time.perf_counter() - tick
        tick = time.perf_counter()
        for images in (truth.x0, truth.y):
            score_all({("x", 0): ([images], 0.0)}, truth, scorer)
        work["floor (2 points)"] = time.perf_counter() - tick
        tick = time.perf_counter()
        write_report([project / "results" / "eval" / m for m in ("diffusion", "floor")], Path(tmp) / "report",
                     json.loads((project / "models" / "features" / "info.json").read_text()))
        work["report"] = time.perf_counter() - tick
    return work


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--project", type=Path, default=ROOT, help="checkout whose stages run (default: this one)")
    parser.add_argument("--python", default=sys.executable, help="its interpreter (default: this one)")
    args = parser.parse_args()
    import ray

    from pipeline.runtime.cluster import RAY_ENV

    env = {**os.environ, **RAY_ENV, "CI": "true", "PATH": f"{Path(args.python).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    with tempfile.TemporaryDirectory() as tmp:
        project = make_project(args.project.resolve(), Path(tmp) / "project")
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        fresh = chain_walls(args.python, project, env, args.repeats)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": dict(RAY_ENV)})
        address = ray.get_runtime_context().gcs_address
        env = {**os.environ, **env, "RAY_ADDRESS": address}  # what ray.init set (the cluster's auth) included
        joined = chain_walls(args.python, project, env, args.repeats)
        floor_import, floor_fit = ray_train_floor(args.python, project, env, args.repeats)
        env.pop("RAY_ADDRESS")
        parts = {**import_walls(args.python, project, env, args.repeats),
                 "DVC resolves a stage's params": dvc_resolution(args.python, project, env),
                 "ray.init, local Ray started": ray_start(args.python, project, env, None),
                 "ray.init, existing cluster joined": ray_start(args.python, project, env, address),
                 "import ray.train.torch (Ray Train's floor, 1)": floor_import,
                 "TorchTrainer.fit, trivial function, existing cluster (Ray Train's floor, 2)": floor_fit}
        ray.shutdown()
        print(f"stages of {args.project} (median of {args.repeats}; seconds)\n", flush=True)
        print("| part of the fixed cost | seconds |\n|---|---|")
        for label, value in parts.items():
            print(f"| {label} | {value:.2f} |" if isinstance(value, float) else f"| {label} | {value} |")
        print("\nwalls: " + json.dumps({"fresh": fresh, "joined": joined}), flush=True)
        work = work_seconds(project)
    print("\n| stage | work | wall, fresh local Ray | overhead | wall, existing cluster | overhead |")
    print("|---|---|---|---|---|---|")
    for label, _, _ in CHAIN:
        f, j, w = statistics.median(fresh[label]), statistics.median(joined[label]), work[label]
        print(f"| {label} | {w:.2f} | {f:.1f} | {f - w:.1f} | {j:.1f} | {j - w:.1f} |")


if __name__ == "__main__":
    main()
