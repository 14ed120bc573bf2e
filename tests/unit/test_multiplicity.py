"""Error control for a family of paired verdicts (pipeline.evaluation.multiplicity).

Evaluations are simulated like the pipeline's: N inputs in G groups, K points all scored on
the same inputs (a shared per-input effect, so the points are correlated, plus each point's own
noise), a comparison = the difference of two points' mean scores with its leave-a-group-out
replicates (`uncertainty.mean_with_replicates`). Seeds are fixed, so every share below is one
deterministic number; the slack allowed is three binomial standard errors.

- Null families (20 points against one reference; all pairs of 8 points): the share of
  evaluations with any better/worse verdict is at most 5 % (+ slack) with the simultaneous
  intervals, and clearly larger with unadjusted 95 % intervals.
- Alternative: comparisons 5 standard errors apart are still found by the simultaneous
  intervals, with the right sign, and the nulls beside them keep their family-wise error.
- Benjamini-Hochberg: under the null any discovery at most q (+ slack); on a mix of nulls and
  real differences the mean false discovery proportion is at most q (+ slack) and the real
  differences are found; on every simulated family the intervals at `fdr_level`'s level
  exclude 0 exactly for the hypotheses BH rejects. Also BH 1995's worked example and scipy's
  adjusted p-values.
- `simultaneous_critical` against closed forms: one comparison gives the t interval, orthogonal
  (independent) comparisons Sidak's value, perfectly correlated ones the single-comparison
  value; it stays between that and Bonferroni's on arbitrary families, and ignores rows with
  se = 0. `p_value` agrees with `uncertainty.compare`'s verdicts.
"""
from itertools import combinations

import numpy as np
import pytest
from scipy import stats

from pipeline.evaluation.multiplicity import fdr_level, max_abs_z_quantile, p_value, simultaneous_critical
from pipeline.evaluation.uncertainty import Point, compare, groups_of, jackknife_se, mean_with_replicates

N, G = 500, 50
DF = G - 1
GROUP = groups_of(N, G)
SE = (2 / N) ** 0.5  # true se of a difference: unit noise per point, the input effect cancels
SIMS = 300
DRAWS = 5_000  # Monte Carlo draws per family in the simulations: c to about +-0.03
SLACK = 3 * (0.05 * 0.95 / SIMS) ** 0.5
T95 = stats.t.ppf(0.975, DF)

AGAINST_REFERENCE = [(k, 0) for k in range(1, 21)]
ALL_PAIRS = list(combinations(range(8), 2))


def evaluate(rng, shifts, pairs):
    """(d, se, replicates) of the comparisons `pairs` (a, b) of points whose true means are
    `shifts`: per-input score = input effect + shift + own noise, all N(0, 1)."""
    shifts = np.asarray(shifts, dtype=np.float64)
    scores = rng.normal(size=N) + shifts[:, None] + rng.normal(size=(len(shifts), N))
    estimates, replicates = map(np.array, zip(*(mean_with_replicates(s, GROUP) for s in scores)))
    a, b = np.array(pairs).T
    r = replicates[a] - replicates[b]
    return estimates[a] - estimates[b], np.array([jackknife_se(row) for row in r]), r


def family_runs(shifts, pairs, seed):
    rng = np.random.default_rng(seed)
    return [evaluate(rng, shifts, pairs) for _ in range(SIMS)]


def verdicts(d, se, critical):
    """+1 / -1 where d +- critical se lies above / below 0, else 0."""
    return np.sign(d) * (np.abs(d) > critical * se)


@pytest.mark.parametrize("k, pairs", [(21, AGAINST_REFERENCE), (8, ALL_PAIRS)], ids=["against-reference", "all-pairs"])
def test_simultaneous_intervals_control_the_familywise_error_under_the_null(k, pairs):
    runs = family_runs(np.zeros(k), pairs, seed=1)
    adjusted = np.mean([verdicts(d, se, simultaneous_critical(r, draws=DRAWS)).any() for d, se, r in runs])
    unadjusted = np.mean([verdicts(d, se, T95).any() for d, se, _ in runs])
    assert adjusted <= 0.05 + SLACK
    assert unadjusted >= 0.25  # what the family's verdicts suffer without the adjustment


def test_simultaneous_intervals_find_real_differences():
    real = np.arange(1, 6)  # points 1..5 lie 5 se above the reference, 6..20 equal it
    shifts = np.zeros(21)
    shifts[real] = 5 * SE
    found, spurious = [], []
    for d, se, r in family_runs(shifts, AGAINST_REFERENCE, seed=2):
        v = verdicts(d, se, simultaneous_critical(r, draws=DRAWS))
        found.append(np.mean(v[real - 1] == 1))
        assert not (v[real - 1] == -1).any()
        spurious.append(v[5:].any())
    assert np.mean(found) >= 0.85
    assert np.mean(spurious) <= 0.05 + SLACK


def bh_rejections(d, se, q):
    p = np.array([p_value(x, s, DF) for x, s in zip(d, se)])
    level, qvalues = fdr_level(p, q)
    rejected = qvalues <= q
    excludes = np.abs(d) > stats.t.ppf(0.5 + level / 2, DF) * se
    assert np.array_equal(excludes, rejected)  # the FCR-adjusted intervals and BH agree
    assert level == pytest.approx(1 - max(rejected.sum(), 1) * q / len(p))
    return rejected


def test_benjamini_hochberg_under_the_null():
    q = 0.05
    any_discovery = [bh_rejections(d, se, q).any() for d, se, _ in family_runs(np.zeros(21), AGAINST_REFERENCE, 3)]
    assert np.mean(any_discovery) <= q + SLACK


def test_benjamini_hochberg_controls_the_false_discovery_rate_and_finds_real_differences():
    q = 0.05
    real = np.arange(10)  # comparisons 0..9 (points 1..10) differ from the reference by 4 se
    shifts = np.zeros(21)
    shifts[real + 1] = 4 * SE
    fdp, power = [], []
    for d, se, _ in family_runs(shifts, AGAINST_REFERENCE, seed=4):
        rejected = bh_rejections(d, se, q)
        fdp.append(rejected[10:].sum() / max(rejected.sum(), 1))
        power.append(rejected[real].mean())
    assert np.mean(fdp) <= q + 0.02
    assert np.mean(power) >= 0.85


def test_fdr_level_on_the_worked_example_of_benjamini_hochberg_1995():
    p = [0.0201, 0.0001, 0.0004, 0.0019, 0.0095, 0.0278, 0.0298, 0.0344, 0.0459, 0.3240,
         0.4262, 0.5719, 0.6528, 0.7590, 1.0000]
    level, qvalues = fdr_level(p, 0.05)
    assert level == pytest.approx(1 - 4 * 0.05 / 15)  # the four smallest are rejected
    assert np.flatnonzero(qvalues <= 0.05).tolist() == [1, 2, 3, 4]
    np.testing.assert_allclose(qvalues, stats.false_discovery_control(p), rtol=1e-12)
    assert fdr_level([0.2, 0.9], 0.05)[0] == pytest.approx(1 - 0.05 / 2)  # no rejection


def test_one_comparison_gives_the_t_interval():
    r = np.random.default_rng(5).normal(size=(1, G))
    assert simultaneous_critical(r) == pytest.approx(T95, abs=1e-12)  # both bounds coincide
    # The unclipped Monte Carlo value: within 3 sd (about 0.013 at 20 000 draws) of the exact one.
    assert max_abs_z_quantile(r) == pytest.approx(stats.norm.ppf(0.975), abs=0.04)
    assert stats.t.ppf(stats.norm.cdf(max_abs_z_quantile(r)), DF) == pytest.approx(T95, abs=0.045)


def centred_orthonormal_rows(m):
    """m rows of replicates whose jackknife covariance is diagonal: independent comparisons."""
    basis = np.linalg.svd(np.eye(G) - 1 / G)[0][:, :G - 1].T
    return basis[:m] * np.arange(1, m + 1)[:, None]  # unequal se's


@pytest.mark.parametrize("level", [0.95, 0.5])
def test_independent_comparisons_give_sidak(level):
    m = 10
    per_comparison = 1 - level ** (1 / m)  # Sidak: 1 - (1 - a)^m = 1 - level
    r = centred_orthonormal_rows(m)
    assert max_abs_z_quantile(r, level) == pytest.approx(stats.norm.ppf(1 - per_comparison / 2), abs=0.06)
    assert simultaneous_critical(r, level) == pytest.approx(stats.t.ppf(1 - per_comparison / 2, DF), abs=0.06)


def test_perfectly_correlated_comparisons_give_the_single_comparison_value():
    row = np.random.default_rng(6).normal(size=G)
    r = np.outer([1.0, -2.0, 0.5, 3.0, -1.0], row) + 7.0  # a shift of a row leaves its deviations
    assert max_abs_z_quantile(r) == pytest.approx(stats.norm.ppf(0.975), abs=0.04)
    assert simultaneous_critical(r) == pytest.approx(T95, abs=0.045)


def test_critical_value_lies_between_single_and_bonferroni():
    rng = np.random.default_rng(7)
    for m in (2, 5, 20, 120):  # 120 > G: a singular jackknife covariance
        for shared in (0.0, 0.5, 0.95):
            r = shared * rng.normal(size=G) + (1 - shared) * rng.normal(size=(m, G)) * rng.uniform(0.1, 3, (m, 1))
            c = simultaneous_critical(r)
            assert T95 <= c <= stats.t.ppf(1 - 0.025 / m, DF)
            assert simultaneous_critical(r) == c  # fixed seed: deterministic


def test_comparisons_with_zero_se_are_ignored():
    r = np.random.default_rng(8).normal(size=(6, G))
    with_self = np.vstack([r, np.zeros(G), np.full(G, 3.0)])
    assert simultaneous_critical(with_self) == simultaneous_critical(r)
    assert max_abs_z_quantile(with_self) == max_abs_z_quantile(r)
    assert simultaneous_critical(np.zeros((2, G))) == pytest.approx(T95)


def test_p_value_agrees_with_the_verdicts_of_compare():
    rng = np.random.default_rng(9)
    for _ in range(50):
        reps = rng.normal(size=(2, G)) * 0.03
        a, b = Point(rng.normal(), tuple(reps[0])), Point(rng.normal(0, 0.3), tuple(reps[1]))
        p = p_value(a.estimate - b.estimate, jackknife_se(reps[0] - reps[1]), DF)
        assert (p < 0.05) == (compare(a, b).verdict != "indistinguishable")
    assert p_value(0.0, 0.0, DF) == 1.0
