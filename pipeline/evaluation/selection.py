"""The teacher's best point, chosen on inputs it is not then compared on (docs/evaluation.md,
"The teacher's best").

Taking the lowest FID of ~30 teacher points and comparing every student with that point on
the same samples favours the teacher: among points that are equal in truth, the one chosen is
the one whose sampling noise happened to be lowest (the winner's curse), so students look
worse than they are. Here the evaluated inputs are split in two halves by the parity of
their jackknife group; each half's FID chooses a best point, and that point is compared on
the other half (cross-fitting: sample splitting used both ways, as in Chernozhukov et al.
2018, "Double/debiased machine learning", Sec. 3, Def. 3.1). The difference is the mean of
the two halves' differences, so every input is used once for choosing and once for
comparing. Each half's FID is the statistic of 250 inputs, not 500: compare such
differences with each other, not with full-set FIDs.

The delete-a-group jackknife holds the two choices fixed: each half's term is then an
ordinary paired difference on that half. Redoing the choice in every replicate would be the
jackknife of an argmin, a non-smooth statistic, whose variance estimate the jackknife
overstates (Efron 1982, "The jackknife, the bootstrap and other resampling plans", Ch. 3):
on the simulated case of tests/unit/test_selection.py that doubled the interval's width for
99 % coverage, while holding the choice gives about the nominal 95 %.
"""
import numpy as np

from pipeline.evaluation.uncertainty import Point

HALVES = 2


def half_groups(group):
    """[(mask, group index within the half)] for half 0 (even groups) and half 1 (odd groups)."""
    return [(group % HALVES == h, group[group % HALVES == h] // HALVES) for h in range(HALVES)]


def chosen(candidates):
    """(index chosen on half 0, index chosen on half 1): each half's lowest estimate."""
    return tuple(int(np.argmin([c[h].estimate for c in candidates])) for h in range(HALVES))


def crossfit_difference(point, candidates):
    """(difference, leave-a-group-out replicates in global group order, (i0, i1)) of `point`
    against the best of `candidates`, each a pair of Points (half 0, half 1).

    difference = 1/2 [(m_1(point) - m_1(best_0)) + (m_0(point) - m_0(best_1))], best_h the
    candidate with the lowest m_h. Leaving out group g of half h changes that half's term; the
    choices stay as made (module docstring).
    """
    best = chosen(candidates)
    against = [candidates[best[1 - h]][h] for h in range(HALVES)]  # half h compares with the other's choice
    terms = [point[h].estimate - against[h].estimate for h in range(HALVES)]
    replicates = []
    for g in range(len(point[0].replicates) + len(point[1].replicates)):
        h, j = g % HALVES, g // HALVES
        replicates.append((point[h].replicates[j] - against[h].replicates[j] + terms[1 - h]) / 2)
    return (terms[0] + terms[1]) / 2, tuple(replicates), best


def pair(halves):
    """(Point, Point) from the replicates.json form [{estimate, replicates}, {...}]."""
    return tuple(Point(float(h["estimate"]), tuple(h["replicates"])) for h in halves)
