"""DVC stage `evaluate@<model>`: every sampler x every NFE, sharded over Ray workers."""
from pathlib import Path

import common


def main(args):
    params = common.load(args, f"evaluate@{args.name}")
    # Heavy imports only after the params validated (see common.py).
    from pipeline.distributed import cluster_cpus, parallel_map
    from pipeline.evaluation import (
        METRICS,
        FeatureSpace,
        describe,
        evaluate_model,
        load_model,
        write_evaluation,
    )

    ev = params.evaluate
    method, teacher = describe(load_model(args.model, args.name))  # fails fast on a missing or wrong-kind checkpoint
    features = FeatureSpace.load(args.features)  # fails fast, naming info.json and the features stage
    common.connect_ray()
    with common.stage_run(params, args, "evaluate", model=args.name, method=method, teacher=teacher) as run:
        rows, results, truth = evaluate_model(args.name, args.model, args.data, features, ev, cluster_cpus(),
                                              parallel_map, show=common.progress_enabled())
        write_evaluation(args.out, rows, results, truth, ev.grid_samples)
        run.log_curves(args.name, rows, METRICS)
        run.log_artifact(Path(args.out) / "grids", "grids")
        run.log_artifact(Path(args.out) / "metrics.csv")
    print(f"evaluate@{args.name}: {len(rows)} (sampler, nfe) points -> {args.out}")


if __name__ == "__main__":
    common.run(main, common.parse("evaluate", __doc__, [
        ("name", {}), ("--model", {"required": True, "type": common.path}),
        ("--data", {"required": True, "type": common.path}),
        ("--features", {"required": True, "type": common.path}), ("--out", {"required": True, "type": common.path})]))
