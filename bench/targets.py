"""The stated targets of a run (params.yaml `report.targets`), each met / missed /
indistinguishable with the paired intervals it rests on, as the report's summary.md states
them; run `dvc repro` first.

    python bench/targets.py [--results results] [--params params.yaml]

The rules are pipeline.report.targets' (docs/evaluation.md, "Targets").
"""
import argparse
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=Path("results"))
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args()
    from pipeline.config.schema import load_params
    from pipeline.report.points import Results
    from pipeline.report.targets import check

    params = load_params(args.params)
    results = Results([args.results / "eval" / m for m in (*params.evaluate.models, "floor")])
    for target in params.report.targets:
        statement, verdict, evidence = check(results, target)
        print(f"- {statement}: **{verdict}** ({evidence})")


if __name__ == "__main__":
    main()
