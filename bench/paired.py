"""Paired comparison of two evaluation folders of the same model kind, e.g. one model trained
two ways (two projects or experiments), evaluated on the same inputs, groups and seeds.

    python bench/paired.py results/eval/bridge /tmp/other/results/eval/bridge [--metric fid]

Prints, for every (sampler, NFE) both folders hold, a's metric, b's and the paired verdict
of a against b (pipeline.evaluation.uncertainty.compare), then each folder's best point against the
other's best.
"""
import argparse
from pathlib import Path

import pandas as pd

from pipeline.evaluation.results import point_key, read_replicates
from pipeline.evaluation.uncertainty import Point, compare


def load(folder, metric):
    protocol, replicates = read_replicates(folder)
    table = pd.read_csv(Path(folder) / "metrics.csv")
    points = {(r.sampler, r.nfe): Point(getattr(r, metric), replicates[point_key(r.sampler, r.nfe)][metric])
              for r in table.itertuples()}
    return protocol, points


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--metric", default="fid")
    args = ap.parse_args()
    (pa, a), (pb, b) = load(args.a, args.metric), load(args.b, args.metric)
    if (pa["n"], pa["groups"], pa["seeds"]) != (pb["n"], pb["groups"], pb["seeds"]):
        raise SystemExit(f"the folders were evaluated differently: {pa} vs {pb}")
    lower = args.metric in ("fid", "kid")
    print(f"| sampler | NFE | {args.metric} a | {args.metric} b | a - b [95 %] | verdict (a vs b) |\n|---|---|---|---|---|---|")
    for key in sorted(set(a) & set(b)):
        c = compare(a[key], b[key], lower_is_better=lower)
        print(f"| {key[0]} | {key[1]} | {a[key].estimate:.3f} | {b[key].estimate:.3f} | "
              f"{c.difference:+.3f} [{c.lo:+.3f}, {c.hi:+.3f}] | {c.verdict} |")
    pick = min if lower else max
    best_a = pick(a, key=lambda k: a[k].estimate)
    best_b = pick(b, key=lambda k: b[k].estimate)
    c = compare(a[best_a], b[best_b], lower_is_better=lower)
    print(f"\nbest of a {best_a} {a[best_a].estimate:.3f} vs best of b {best_b} {b[best_b].estimate:.3f}: "
          f"{c.difference:+.3f} [{c.lo:+.3f}, {c.hi:+.3f}] {c.verdict}")


if __name__ == "__main__":
    main()
