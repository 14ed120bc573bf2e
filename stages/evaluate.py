"""DVC stage `evaluate@<model>`: every sampler x every NFE, sharded over Ray workers."""
import csv
import json
from pathlib import Path

import common


def write_outputs(out, rows, results, truth, grid_n):
    from pipeline.evaluation import COLUMNS, METRICS, sample_grid
    from pipeline.outputs import staging_dir, write_json
    with staging_dir(Path(out)) as tmp:
        nested = {}
        for r in rows:
            nested.setdefault(r["sampler"], {})[f"nfe_{r['nfe']:03d}"] = {m: r[m] for m in METRICS}
        write_json(tmp / "metrics.json", nested)
        with open(tmp / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        (tmp / "grids").mkdir()
        index = {}
        for nfe in sorted({n for _, n in results}):
            keys = [k for k in sorted(results) if k[1] == nfe]
            name = f"nfe_{nfe:03d}.png"
            index[name] = ["y (input)", "x0 (truth)", *[sampler for sampler, _ in keys]]
            sample_grid(tmp / "grids" / name,
                        [truth.y[:grid_n], truth.x0[:grid_n], *[results[k][0][:grid_n] for k in keys]])
        write_json(tmp / "grids" / "rows.json", index)  # which row of each grid is what


def sample_all(shards, show):
    """Every shard x (sampler, nfe) as its own Ray task, a "sampling" bar advancing as they finish."""
    from pipeline.distributed import parallel_map
    from pipeline.evaluation import merge_shards, sample_shard, split_by_plan
    from pipeline.progress import bar
    jobs = split_by_plan(shards)
    with bar(len(jobs), "sampling", show, unit="job") as sampling:
        def done(i):
            (sampler, nfe), = jobs[i].plan
            sampling.set_postfix(sampler=sampler, nfe=nfe, refresh=False)
            sampling.update()
        return merge_shards(parallel_map(sample_shard, [(j,) for j in jobs], on_done=done))


def main():
    args = common.parse("evaluate", __doc__, [
        ("name", {}), ("--model", {"required": True, "type": common.path}), ("--data", {"required": True, "type": common.path}),
        ("--features", {"required": True, "type": common.path}), ("--out", {"required": True, "type": common.path})])
    params = common.load(args, section="evaluate")
    # Heavy imports only after the params validated (see common.py).
    from pipeline.classifier import load_classifier
    from pipeline.data.shards import load_split
    from pipeline.distributed import cluster_cpus
    from pipeline.evaluation import METRICS, describe, load_model, model_plan, score, shard_jobs
    from pipeline.progress import bar

    ev = params.evaluate
    model = load_model(args.model)  # fails fast on a missing or wrong-kind checkpoint
    method, teacher = describe(model)
    jobs, guidance = model_plan(model, ev)
    samplers = list(dict.fromkeys(s for s, _ in jobs))
    features = json.loads((Path(args.features) / "info.json").read_text())
    common.connect_ray(params)
    with common.stage_run(params, "evaluate", "evaluate", model=args.name, method=method,
                          teacher=teacher) as run:
        shards = shard_jobs(args.model, args.data, ev.n_samples, cluster_cpus(), jobs, ev.seed,
                            guidance, ev.batch_size)
        show = common.progress_enabled()
        results = sample_all(shards, show)
        truth = load_split(args.data, "test").head(ev.n_samples)
        classifier = load_classifier(Path(args.features) / "classifier.pt")
        fid_kwargs = {"extractor": features["extractor"], "cache_root": str(Path(args.features) / "fid_cache"),
                      "reference_cache_name": features["reference"], "kid_subset_size": ev.kid_subset_size,
                      "weights_path": str(Path(args.features) / "classifier.pt")
                      if features["extractor"] == "classifier" else params.features.inception_weights}
        rows = []
        with bar(len(results), "FID features", show, unit="point") as scoring:
            for (s, nfe), (x, secs) in sorted(results.items()):
                scoring.set_postfix(sampler=s, nfe=nfe)
                rows.append({"model": args.name, "method": method, "teacher": teacher, "sampler": s,
                             "nfe": nfe, **score(x, secs, truth, classifier, fid_kwargs, truth.conditional)})
                scoring.update()
        write_outputs(args.out, rows, results, truth, ev.grid_samples)
        for sampler in samplers:
            curve = [r for r in rows if r["sampler"] == sampler]
            child = run.child(f"{args.name}/{sampler}", {"sampler": sampler, "stage": "evaluate",
                              "nfe": ",".join(str(r["nfe"]) for r in curve)})
            with child:
                for r in curve:
                    child.log_metrics({m: r[m] for m in METRICS}, step=r["nfe"])
        run.log_artifact(Path(args.out) / "grids", "grids")
        run.log_artifact(Path(args.out) / "metrics.csv")
    print(f"evaluate@{args.name}: {len(rows)} (sampler, nfe) points -> {args.out}")


if __name__ == "__main__":
    main()
