"""DVC stage `features`: train the FID feature classifier (Ray Train), cache test statistics."""
from pathlib import Path

import common

REFERENCE = "test"  # the FID reference set: the held-out test split's clean images


def main():
    args = common.parse("features", __doc__, [("--data", {"required": True, "type": common.path}),
                                               ("--out", {"required": True, "type": common.path}),
                                               ("--storage", {"default": "ray_results", "type": common.path})])
    params = common.load(args, section="features")
    # Heavy imports only after the params validated (see common.py).
    from pipeline.classifier import accuracy, load_classifier
    from pipeline.data.shards import load_split
    from pipeline.distributed import fit
    from pipeline.fid import cache_reference_statistics, fid_label
    from pipeline.jobs import features_job
    from pipeline.outputs import staging_dir, write_json

    feats = params.features
    job = features_job(params, args.data)  # checks every shard: fails fast, naming it
    common.connect_ray(params)
    with common.stage_run(params, "features", "features", **job.tags) as run:
        state = fit(job.task, job.load_data, job.train, params.seed, params.ray, args.storage,
                    name=f"features-{run.run_id}", log=run.logger(), progress=common.progress_enabled())
        with staging_dir(Path(args.out)) as tmp:
            job.write(tmp / "classifier.pt", state)
            test = load_split(args.data, "test")
            acc = accuracy(load_classifier(tmp / "classifier.pt"), test.x0, test.label)
            weights = feats.inception_weights if feats.extractor != "classifier" else None
            cache_reference_statistics(test.x0, cache_root=str(tmp / "fid_cache"),
                                       reference_cache_name=REFERENCE, extractor=feats.extractor,
                                       weights_path=weights or str(tmp / "classifier.pt"))
            write_json(tmp / "info.json", {
                "test_accuracy": acc, "extractor": feats.extractor, "fid_name": fid_label(feats.extractor),
                "reference": REFERENCE, "n_reference": len(test.x0)})
        run.log_metrics({"test_accuracy": acc})
    print(f"features: classifier test accuracy {acc:.4f}; wrote {args.out}")


if __name__ == "__main__":
    main()
