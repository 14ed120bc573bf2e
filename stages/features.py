"""DVC stage `features`: train the FID feature classifier (Ray Train), cache test statistics."""
from pathlib import Path

import common

REFERENCE = "reference"  # the FID reference set: the reference split's clean images (disjoint from the inputs)


def main(args):
    params = common.load(args, "features")
    # Heavy imports only after the params validated (see common.py).
    from pipeline.features.classifier import accuracy, load_classifier
    from pipeline.data.shards import load_split
    from pipeline.features.fid import cache_reference_statistics, fid_label, resolve_weights
    from pipeline.training.jobs import features_job
    from pipeline.runtime.outputs import staging_dir, write_json

    feats = params.features
    job = features_job(feats, args.data)  # checks every shard: fails fast, naming it
    from pipeline.training.ray_train import fit  # Ray Train (~4 s of imports) once the inputs are good
    common.connect_ray()
    with common.stage_run(params, args, "features", **job.tags) as run:
        state = fit(job.run(params.seed, params.ray, log=run.logger()), args.storage,
                    f"features-{run.run_id}", progress=common.progress_enabled())
        with staging_dir(Path(args.out)) as tmp:
            job.write(tmp / "classifier.pt", state)
            test, reference = load_split(args.data, "test"), load_split(args.data, REFERENCE)
            acc = accuracy(load_classifier(tmp / "classifier.pt"), test.x0, test.label)
            weights = ("classifier.pt" if feats.extractor == "classifier"  # else an absolute path
                       else resolve_weights(feats.extractor, feats.inception_weights))
            cache_reference_statistics(reference.x0, cache_root=str(tmp / "fid_cache"), reference_cache_name=REFERENCE,
                                       extractor=feats.extractor, weights_path=str(tmp / weights))
            write_json(tmp / "info.json", {  # what evaluation reads (evaluation.FeatureSpace)
                "test_accuracy": acc, "extractor": feats.extractor, "fid_name": fid_label(feats.extractor),
                "weights": weights, "reference": REFERENCE, "n_reference": len(reference.x0)})
        run.log_metrics({"test_accuracy": acc})
    print(f"features: classifier test accuracy {acc:.4f}; wrote {args.out}")


if __name__ == "__main__":
    common.run(main, common.parse("features", __doc__, [
        ("--data", {"required": True, "type": common.path}), ("--out", {"required": True, "type": common.path}),
        ("--storage", {"default": "ray_results", "type": common.path})]))
