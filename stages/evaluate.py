"""DVC stage `evaluate@<model>`: every sampler x every NFE x every sampling seed, sharded over
Ray workers, scored with 95 % intervals."""
from pathlib import Path

import common


def main(args):
    params = common.load(args, f"evaluate@{args.name}")
    # Heavy imports only after the params validated (see common.py).
    from pipeline.data.shards import load_split
    from pipeline.distributed import cluster_cpus, parallel_map
    from pipeline.evaluation import describe, evaluate_model, load_model
    from pipeline.results import METRICS, FeatureSpace, write_evaluation
    from pipeline.scoring import Scorer

    ev = params.evaluate
    method, teacher = describe(load_model(args.model, args.name))  # fails fast on a missing or wrong-kind checkpoint
    features = FeatureSpace.load(args.features)  # fails fast, naming info.json and the features stage
    scorer = Scorer(features, ev.n_samples, ev.groups, load_split(args.data, "test").x0.shape[1:])
    common.connect_ray()
    with common.stage_run(params, args, "evaluate", model=args.name, method=method, teacher=teacher) as run:
        rows, replicates, grids = evaluate_model(args.name, args.model, args.data, scorer, ev, cluster_cpus(),
                                                 parallel_map, show=common.progress_enabled())
        protocol = {"n": ev.n_samples, "groups": ev.groups, "seeds": list(ev.seeds)}
        write_evaluation(args.out, rows, replicates, grids, protocol)
        run.log_curves(args.name, rows, METRICS)
        run.log_artifact(Path(args.out) / "grids", "grids")
        run.log_artifact(Path(args.out) / "metrics.csv")
    print(f"evaluate@{args.name}: {len(rows)} (sampler, nfe) points -> {args.out}")


if __name__ == "__main__":
    common.run(main, common.parse("evaluate", __doc__, [
        ("name", {}), ("--model", {"required": True, "type": common.path}),
        ("--data", {"required": True, "type": common.path}),
        ("--features", {"required": True, "type": common.path}), ("--out", {"required": True, "type": common.path})]))
