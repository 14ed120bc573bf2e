"""Which error each list of verdicts controls (docs/evaluation.md, "Many comparisons").

A run states about a hundred paired verdicts; at 95 % each, about five would be spurious
even where nothing differs. Each list therefore controls the error of its family:

- **The summary** (every model point against its teacher's best, which the answer and the
  verdict picture rest on, and the targets' comparisons): simultaneous intervals, so that
  every "better" or "worse" it states holds jointly at 95 % (the max-|t| critical value,
  Hothorn, Bretz & Westfall 2008, with the comparisons' correlation from their jackknife
  replicates; pipeline.evaluation.multiplicity).
- **The long list** (comparisons.md and .csv): a false discovery rate of 5 % (Benjamini &
  Hochberg 1995), with the false-coverage-rate intervals of Benjamini & Yekutieli (2005), so
  an interval excludes zero exactly where the procedure finds a difference.

Either way "not worse" is the absence of a "worse" verdict: widening the intervals protects
the verdicts stated, and makes "not worse" easier to reach; docs/evaluation.md says how to
read it.
"""
import numpy as np
from scipy import stats

from pipeline.evaluation.multiplicity import fdr_level, p_value, simultaneous_critical
from pipeline.evaluation.results import LOWER_IS_BETTER
from pipeline.evaluation.uncertainty import LEVEL, verdict_of
from pipeline.report import targets as stated


def summary_family(results, targets=()):
    """The raw comparisons (per-comparison level) the summary states: every distinct model
    point against its teacher's best, and every target's comparisons."""
    family = [results.compare_best(p) for _, p in results.distinct(results.models).iterrows()]
    for target in targets:
        point = stated.point_of(results, target)
        if point is not None and target.claim != "faster":
            family += [c for _, c in stated.comparisons(results, target, point)]
    return family


def summary_critical(family, level=LEVEL):
    """The critical value t* of simultaneous `level` intervals d +- t* se for the family."""
    return simultaneous_critical(np.array([c.replicates for c in family]), level) if family else None


def false_discovery(table, df, q=1 - LEVEL):
    """The long list (`verdicts.comparisons`) at a false discovery rate `q`: adds `p` (two-sided,
    per comparison) and `q` (Benjamini-Hochberg adjusted), and states `lo`, `hi` and `verdict`
    at the false-coverage-rate level of the list, which it returns with the table."""
    out = table.copy()
    if out.empty:
        return out.assign(p=[], q=[]), LEVEL
    out["p"] = [p_value(d, se, df) for d, se in zip(out["difference"], out["se"])]
    level, out["q"] = fdr_level(out["p"].to_numpy(), q)
    half = stats.t.ppf(0.5 + level / 2, df) * out["se"]
    out["lo"], out["hi"] = out["difference"] - half, out["difference"] + half
    out["verdict"] = [verdict_of(lo, hi, LOWER_IS_BETTER[m]) for lo, hi, m in zip(out["lo"], out["hi"], out["metric"])]
    return out, level
