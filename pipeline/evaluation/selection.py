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

The delete-a-group jackknife repeats the whole procedure, the choice included, with each
group left out, so the interval carries the choice's own variability too.
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
    candidate with the lowest m_h. Leaving out group g of half h changes m_h of every point and
    so best_h, which the other half's term compares with.
    """
    est = [np.array([c[h].estimate for c in candidates]) for h in range(HALVES)]
    reps = [np.array([c[h].replicates for c in candidates]) for h in range(HALVES)]  # (K, G_h)
    best = chosen(candidates)
    terms = [point[h].estimate - est[h][best[1 - h]] for h in range(HALVES)]
    sizes = [reps[h].shape[1] for h in range(HALVES)]
    replicates = []
    for g in range(sum(sizes)):
        h, j = g % HALVES, g // HALVES
        left = point[h].replicates[j] - reps[h][best[1 - h], j]  # half h without group g, same choice
        other = point[1 - h].estimate - est[1 - h][int(np.argmin(reps[h][:, j]))]  # half h's choice redone
        replicates.append((left + other) / 2)
    return (terms[0] + terms[1]) / 2, tuple(replicates), best


def pair(halves):
    """(Point, Point) from the replicates.json form [{estimate, replicates}, {...}]."""
    return tuple(Point(float(h["estimate"]), tuple(h["replicates"])) for h in halves)
