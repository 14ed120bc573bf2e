"""Choosing the teacher's best point fairly (pipeline.evaluation.selection).

Simulated evaluations like the pipeline's: 400 inputs in 20 jackknife groups, each scored
point a mean of per-input scores that share an input effect (every point is scored on the
same inputs) plus the point's own sampling noise. Twenty teacher points and one student are
all equal in truth. Choosing the lowest of the teacher points and comparing the student with
it on the same samples makes the student look worse (the winner's curse: the naive rule,
written here as the broken variant); choosing on one half of the inputs and comparing on the
other does not, and its interval covers the true difference, 0, at about its level. The
replicates are checked against a recomputation without each group, the choices held.
"""
import numpy as np
import pytest

from pipeline.evaluation.selection import crossfit_difference, half_groups
from pipeline.evaluation.uncertainty import Point, compare_replicates, groups_of, interval, mean_with_replicates

N, GROUPS, TEACHER_POINTS, SIMULATIONS = 400, 20, 20, 300


def evaluation(rng, means):
    """(full Point, (half-0 Point, half-1 Point)) per point: per-input scores = a shared input
    effect + the point's noise + its true mean."""
    group = groups_of(N, GROUPS)
    shared = rng.normal(0, 1.0, N)
    out = []
    for mean in means:
        scores = mean + shared + rng.normal(0, 1.0, N)
        halves = tuple(Point(*mean_with_replicates(scores[mask], g)) for mask, g in half_groups(group))
        out.append((Point(*mean_with_replicates(scores, group)), halves))
    return out


def naive(student, teachers):
    """The biased rule: the lowest full-set point, compared on the same samples."""
    best = min(teachers, key=lambda t: t.estimate)
    return student.estimate - best.estimate, np.subtract(student.replicates, best.replicates)


def test_the_cross_fitted_best_is_not_optimistically_biased_and_its_interval_covers():
    rng = np.random.default_rng(0)
    crossfit, naive_d, covered = [], [], 0
    for _ in range(SIMULATIONS):
        *teachers, student = evaluation(rng, [0.0] * (TEACHER_POINTS + 1))
        d, reps, _ = crossfit_difference(student[1], [t[1] for t in teachers])
        lo, hi, _ = interval(d, reps)
        crossfit.append(d)
        covered += lo <= 0 <= hi
        naive_d.append(naive(student[0], [t[0] for t in teachers])[0])
    crossfit, naive_d = np.array(crossfit), np.array(naive_d)
    se_c, se_n = crossfit.std() / SIMULATIONS ** 0.5, naive_d.std() / SIMULATIONS ** 0.5
    assert abs(crossfit.mean()) < 3 * se_c  # no bias beyond Monte Carlo error
    assert naive_d.mean() > 10 * se_n  # the naive rule's bias is large and certain: the student looks worse
    assert 0.90 <= covered / SIMULATIONS <= 0.985  # about its 95 %: neither too narrow nor the argmin's 99 %


def test_a_truly_better_teacher_point_is_chosen_on_both_halves():
    rng = np.random.default_rng(1)
    points = evaluation(rng, [0.0] * 10 + [-2.0] + [0.0] * 9)
    _, _, chosen = crossfit_difference(points[0][1], [p[1] for p in points])
    assert chosen == (10, 10)


def test_the_replicates_recompute_each_half_without_each_group_the_choices_held():
    rng = np.random.default_rng(2)
    *teachers, student = evaluation(rng, [0.0, 0.05, 0.1, 0.0, 0.02, 0.0])
    cands = [t[1] for t in teachers]
    _, reps, _ = crossfit_difference(student[1], cands)

    def without(pair, h, j):  # the half-h Point with its group j's replicate as the estimate
        out = list(pair)
        out[h] = Point(pair[h].replicates[j], ())
        return out

    best = [int(np.argmin([c[k].estimate for c in cands])) for k in range(2)]  # on the full halves
    for g in range(GROUPS):
        h, j = g % 2, g // 2
        others = [without(c, h, j) for c in cands]
        me = without(student[1], h, j)
        expected = ((me[1].estimate - others[best[0]][1].estimate) + (me[0].estimate - others[best[1]][0].estimate)) / 2
        assert reps[g] == pytest.approx(expected, abs=1e-12)
    assert compare_replicates(0.0, reps).se > 0
