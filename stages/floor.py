"""DVC stage `floor`: the oracle (the evaluated inputs' clean images) and the corrupted
input itself, scored like models: where zero is for every metric (docs/evaluation.md)."""
import common


def main(args):
    params = common.load(args, "floor")
    # Heavy imports only after the params validated (see common.py).
    from pipeline.data.shards import load_split
    from pipeline.evaluation.sampling import score_all
    from pipeline.evaluation.results import METRICS, FeatureSpace, write_evaluation
    from pipeline.evaluation.scoring import Scorer

    ev = params.evaluate
    features = FeatureSpace.load(args.features)  # fails fast, naming info.json and the features stage
    truth = load_split(args.data, "test").head(ev.n_samples)
    scorer = Scorer(features, ev.n_samples, ev.groups, truth.x0.shape[1:])
    rows, replicates = [], {}
    for model, sampler, images in (("oracle", "x0", truth.x0), ("input", "y", truth.y)):
        if sampler == "y" and not truth.conditional:
            continue  # y carries nothing: there is no input to score
        scored, reps = score_all({(sampler, 0): ([images], 0.0)}, truth, scorer)
        rows += [{"model": model, "method": "reference", "teacher": "", **r} for r in scored]
        replicates.update(reps)
    write_evaluation(args.out, rows, replicates, {}, {"n": ev.n_samples, "groups": ev.groups, "seeds": [0]})
    with common.stage_run(params, args, "floor") as run:
        run.log_curves("floor", rows, METRICS)
    scores = ", ".join(f"{r['model']} fid {r['fid']:.3f}" for r in rows)
    print(f"floor: {scores} -> {args.out}")


if __name__ == "__main__":
    common.run(main, common.parse("floor", __doc__, [
        ("--data", {"required": True, "type": common.path}), ("--features", {"required": True, "type": common.path}),
        ("--out", {"required": True, "type": common.path})]))
