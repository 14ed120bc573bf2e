"""The distillation targets of the default run, each as met / missed / indistinguishable with
the paired interval it rests on (read from the report: results/comparisons.csv and
results/fid_vs_nfe.csv; run `dvc repro` first).

    python bench/targets.py [--results results]

A "not worse" target is met when no verdict is "worse" (better or indistinguishable at
95 %); a "better" target is met when every verdict is "better", missed when one is
"worse", and indistinguishable otherwise. The speed-up target reads "the cheapest teacher
point not worse than the student" (a teacher point that reaches the student's quality).
"""
import argparse
from pathlib import Path

import pandas as pd


def rows(comparisons, kind, a, b_prefix=""):
    found = comparisons[(comparisons["comparison"] == kind) & (comparisons["a"] == a)
                        & comparisons["b"].str.startswith(b_prefix)]
    if found.empty:
        raise SystemExit(f"no '{kind}' comparison of {a} in the report")
    return found


def describe(found):
    return "; ".join(f"vs {r.b}: {r.difference:+.3f} [{r.lo:+.3f}, {r.hi:+.3f}] {r.verdict}" for r in found.itertuples())


def not_worse(found):
    return "missed" if (found["verdict"] == "worse").any() else "met"


def better(found):
    if (found["verdict"] == "worse").any():
        return "missed"
    return "met" if (found["verdict"] == "better").all() else "indistinguishable"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=Path("results"))
    args = ap.parse_args()
    comparisons = pd.read_csv(args.results / "comparisons.csv")
    targets = [
        ("IBMD @ 1 NFE not worse than the bridge teacher's best", not_worse,
         rows(comparisons, "vs teacher's best", "ibmd/student@1")),
        ("MM @ 8 NFE not worse than any teacher sampler @ 8 NFE", not_worse,
         rows(comparisons, "vs teacher at the same NFE", "mm/student@8")),
        ("TDD @ 8 NFE not worse than any teacher sampler @ 8 NFE", not_worse,
         rows(comparisons, "vs teacher at the same NFE", "tdd/student@8")),
        ("MM @ 4 NFE better than every teacher sampler @ 4 NFE", better,
         rows(comparisons, "vs teacher at the same NFE", "mm/student@4")),
        ("TDD @ 4 NFE better than every teacher sampler @ 4 NFE", better,
         rows(comparisons, "vs teacher at the same NFE", "tdd/student@4")),
        ("TDD @ 4 NFE not worse than CD @ 4 NFE", not_worse,
         rows(comparisons, "method vs method at the same NFE", "cd/student@4", "tdd/student@4")
         .assign(verdict=lambda f: f["verdict"].map({"better": "worse", "worse": "better"}).fillna(f["verdict"]),
                 difference=lambda f: -f["difference"], lo=lambda f: -f["hi"], hi=lambda f: -f["lo"],
                 b="cd/student@4")),
    ]
    for name, rule, found in targets:
        print(f"- {name}: **{rule(found)}** ({describe(found)})")
    from pipeline.report import Results, speedups
    results = Results(sorted(p for p in (args.results / "eval").iterdir() if (p / "metrics.csv").is_file()))
    ibmd = speedups(results).set_index("student").loc["ibmd@1"]
    ratio = ibmd["speed-up (measured)"]
    print(f"- IBMD @ 1 NFE measured speed-up over the cheapest bridge point not worse than it (target 10x): "
          f"**{'met' if ratio >= 10 else 'missed'}**: {ratio:.1f}x against {ibmd['teacher point as good']}")


if __name__ == "__main__":
    main()
