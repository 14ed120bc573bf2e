"""DVC stage `report`: FID-vs-NFE table, plot and summary of every evaluated model."""
import json
from pathlib import Path

import common


def main():
    args = common.parse("report", __doc__, [
        ("--evals", {"required": True, "type": common.path}), ("--features", {"required": True, "type": common.path}),
        ("--out", {"required": True, "type": common.path})])
    params = common.load(args, section="evaluate")
    # Heavy imports only after the params validated (see common.py).
    from pipeline.report import collect, plot_fid_vs_nfe, plot_rows, summary_markdown

    fid_name = json.loads((Path(args.features) / "info.json").read_text())["fid_name"]
    paths = [Path(args.evals) / m / "metrics.csv" for m in params.evaluate.models]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"report: missing evaluation output(s) {missing}; run their evaluate stages")
    table = collect(paths)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "fid_vs_nfe.csv", index=False)
    plot_rows(table).to_csv(out / "fid_vs_nfe_curves.csv", index=False)
    plot_fid_vs_nfe(table, out / "fid_vs_nfe.png", fid_name)
    (out / "summary.md").write_text(summary_markdown(table, fid_name))
    with common.stage_run(params, "report", "evaluate") as run:
        run.log_artifact(out / "fid_vs_nfe.png")
        run.log_artifact(out / "summary.md")
    print(f"report: {len(table)} points -> {out}")


if __name__ == "__main__":
    main()
