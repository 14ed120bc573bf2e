"""DVC stage `report`: the answer (summary.md), every comparison, the pictures and the headline
metrics of every evaluated model (pipeline.report)."""
import json
from pathlib import Path

import common


def main(args):
    params = common.load(args, "report")
    # Heavy imports only after the params validated (see common.py).
    from pipeline.evaluation.results import FeatureSpace
    from pipeline.report import write_report
    from pipeline.report.protocol import code_commit

    FeatureSpace.load(args.features)  # fails fast, naming info.json and the features stage
    info = json.loads((Path(args.features) / "info.json").read_text())
    folders = [Path(args.evals) / m for m in (*params.evaluate.models, "floor")]
    style = params.teacher.bridge.style if "bridge" in params.evaluate.models else None
    table = write_report(folders, args.out, info, style, params.report.targets,  # names a missing evaluation
                         params.evaluate.grid, [params.seed], code_commit())
    with common.stage_run(params, args, "report") as run:
        for name in ("summary.md", "verdicts.png", "fid_vs_nfe.png", "headline.json", "protocol.json"):
            run.log_artifact(Path(args.out) / name)
    print(f"report: {len(table)} points -> {args.out}")


if __name__ == "__main__":
    common.run(main, common.parse("report", __doc__, [
        ("--evals", {"required": True, "type": common.path}), ("--features", {"required": True, "type": common.path}),
        ("--out", {"required": True, "type": common.path})]))
