"""DVC stage `report`: the answer (summary.md), every comparison, the pictures and the headline
metrics of every evaluated model (pipeline.report)."""
from pathlib import Path

import common


def main(args):
    params = common.load(args, "report")
    # Heavy imports only after the params validated (see common.py).
    from pipeline.evaluation.results import FeatureSpace
    from pipeline.report import write_report

    fid_name = FeatureSpace.load(args.features).fid_name
    folders = [Path(args.evals) / m for m in (*params.evaluate.models, "floor")]
    style = params.teacher.bridge.style if "bridge" in params.evaluate.models else None
    table = write_report(folders, args.out, fid_name, params.data.n_reference, style,  # names a missing evaluation
                         params.report.targets)
    with common.stage_run(params, args, "report") as run:
        for name in ("summary.md", "verdicts.png", "fid_vs_nfe.png", "headline.json"):
            run.log_artifact(Path(args.out) / name)
    print(f"report: {len(table)} points -> {args.out}")


if __name__ == "__main__":
    common.run(main, common.parse("report", __doc__, [
        ("--evals", {"required": True, "type": common.path}), ("--features", {"required": True, "type": common.path}),
        ("--out", {"required": True, "type": common.path})]))
