"""DVC stage `evaluate@<model>`: every sampler x every NFE x every sampling seed, sharded over
Ray workers, scored with 95 % intervals."""
import os
from functools import partial
from pathlib import Path

import common

from pipeline.errors import PipelineError


def main(args):
    params = common.load(args, f"evaluate@{args.name}")
    ev = params.evaluate
    check_device(ev.device)  # before anything is loaded
    # Heavy imports only after the params validated (see common.py).
    from pipeline.data.shards import load_split
    from pipeline.evaluation.sampling import describe, evaluate_model
    from pipeline.models.loading import load_model
    from pipeline.evaluation.results import METRICS, FeatureSpace, write_evaluation
    from pipeline.evaluation.scoring import Scorer

    method, teacher = describe(load_model(args.model, args.name))  # fails fast on a missing or wrong-kind checkpoint
    features = FeatureSpace.load(args.features)  # fails fast, naming info.json and the features stage
    common.connect_ray()
    jobs, map_fn, feature_device = sampling(ev.device)
    scorer = Scorer(features, ev.n_samples, ev.groups, load_split(args.data, "test").x0.shape[1:], feature_device)
    with common.stage_run(params, args, "evaluate", model=args.name, method=method, teacher=teacher) as run:
        rows, replicates, grids = evaluate_model(args.name, args.model, args.data, scorer, ev, jobs,
                                                 map_fn, show=common.progress_enabled())
        protocol = {"n": ev.n_samples, "groups": ev.groups, "seeds": list(ev.seeds)}
        write_evaluation(args.out, rows, replicates, grids, protocol)
        run.log_curves(args.name, rows, METRICS)
        run.log_artifact(Path(args.out) / "grids", "grids")
        run.log_artifact(Path(args.out) / "metrics.csv")
    print(f"evaluate@{args.name}: {len(rows)} (sampler, nfe) points -> {args.out}")


NO_GPU = ("evaluate.device is cuda but there is no GPU to sample on ({}): set evaluate.device: cpu "
          "or run where there are GPUs (this machine, or the cluster RAY_ADDRESS names)")


def check_device(device):
    """One line, before anything loads, when evaluate.device is cuda, this machine has no GPU
    and no cluster is named (a named cluster's GPUs are counted once joined, in `sampling`)."""
    if device != "cuda" or os.environ.get("RAY_ADDRESS"):
        return
    import torch
    if not torch.cuda.is_available():
        raise PipelineError(NO_GPU.format("none on this machine, no RAY_ADDRESS"))


def sampling(device):
    """(number of sampling jobs, map_fn, feature-extraction device) for evaluate.device: one job
    per CPU of the cluster, or one per GPU, each holding its GPU, with the features extracted on
    this process's GPU when it sees one."""
    from pipeline.runtime.cluster import cluster_cpus, cluster_gpus, parallel_map
    if device == "cpu":
        return cluster_cpus(), parallel_map, "cpu"
    import torch
    gpus = cluster_gpus()
    if gpus == 0:
        raise PipelineError(NO_GPU.format("the joined cluster has none"))
    return gpus, partial(parallel_map, gpus_per_job=1), "cuda" if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    common.run(main, common.parse("evaluate", __doc__, [
        ("name", {}), ("--model", {"required": True, "type": common.path}),
        ("--data", {"required": True, "type": common.path}),
        ("--features", {"required": True, "type": common.path}), ("--out", {"required": True, "type": common.path})]))
