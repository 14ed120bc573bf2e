"""Intervals and paired verdicts (pipeline.evaluation.uncertainty) on cases with a known answer.

The Frechet distance is checked against its closed form for Gaussians and against
torch-fidelity on the same features; the jackknife intervals are checked for coverage of
the expected metric, computed by an independent Monte Carlo (scipy's sqrtm, plain loops),
on synthetic "features" drawn like an evaluation: each input has its own mean and each of
its seeds adds noise on top."""
import numpy as np
import pytest
import torch
from scipy import linalg

from pipeline.evaluation.uncertainty import (Point, Reference, _frechet, compare, frechet_distance, groups_of, interval,
                                  kid, mean_with_replicates, reference_kernel_mean)

D, N, SEEDS, GROUPS = 5, 150, 3, 15


def independent_fid(x, y):
    """FID from its definition with scipy's matrix square root (Heusel et al. 2017, Eq. 6)."""
    mu1, mu2 = x.mean(0), y.mean(0)
    c1, c2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * linalg.sqrtm(c1 @ c2).real))


def draw(rng, shift=0.0, scale=1.0, units=None):
    """(seeds, n, d) features: unit i has mean a_i ~ N(shift, 0.5 I); each seed adds N(0, 0.3 scale^2 I)."""
    a = units if units is not None else rng.normal(shift, 0.5 ** 0.5, size=(N, D))
    return a[None] + rng.normal(0, (0.3 * scale ** 2) ** 0.5, size=(SEEDS, N, D)), a


def seed_mean_fid(features, ref, group):
    per_seed = [frechet_distance(f, ref, group) for f in features]
    return np.mean([e for e, _ in per_seed]), np.mean([r for _, r in per_seed], axis=0)


@pytest.fixture(scope="module")
def reference():
    y = np.random.default_rng(123).normal(0.0, 1.0, size=(600, D))
    return y, Reference.of(y)


def test_frechet_distance_matches_the_gaussian_closed_form():
    # N(m1, diag s1) vs N(m2, diag s2): |m1 - m2|^2 + sum (sqrt s1 - sqrt s2)^2 (Dowson & Landau 1982).
    m1, m2 = np.array([0.0, 1.0, -2.0]), np.array([0.5, 0.5, 0.0])
    s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([4.0, 0.25, 0.5])
    ref = Reference(m2, np.diag(s2), np.diag(np.sqrt(s2)), float(s2.sum()))
    exact = ((m1 - m2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    assert _frechet(m1, np.diag(s1), ref) == pytest.approx(exact, abs=1e-12)


def test_fid_and_kid_equal_torch_fidelity_and_the_replicates_equal_a_recomputation(reference):
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    y, ref = reference
    x = np.random.default_rng(0).normal(0.2, 1.2, size=(600, D))
    group = groups_of(600, 20)
    fid, fid_reps = frechet_distance(x, ref, group)
    theirs = fid_statistics_to_metric(fid_features_to_statistics(torch.tensor(x)),
                                      fid_features_to_statistics(torch.tensor(y)), False)
    assert fid == pytest.approx(theirs["frechet_inception_distance"], rel=1e-9)
    assert fid == pytest.approx(independent_fid(x, y), rel=1e-9)
    k, kid_reps = kid(x, y, group)
    their_kid = kid_features_to_metric(torch.tensor(x), torch.tensor(y), kid_subsets=1, kid_subset_size=600,
                                       verbose=False)  # equal sizes: the one subset is the full sets
    assert k == pytest.approx(their_kid["kernel_inception_distance_mean"], rel=1e-9)
    assert kid(x, y, group, k_yy=reference_kernel_mean(y)) == (k, kid_reps)  # the precomputed reference term
    kept = group != 7
    assert fid_reps[7] == pytest.approx(independent_fid(x[kept], y), rel=1e-9)
    assert kid_reps[7] == pytest.approx(kid(x[kept], y, groups_of(kept.sum(), 2))[0], rel=1e-9)


def coverage(statistic, truth, rng, trials=300):
    hits = 0
    for _ in range(trials):
        estimate, replicates = statistic(rng)
        lo, hi, _ = interval(estimate, replicates)
        hits += lo <= truth <= hi
    return hits / trials


@pytest.mark.parametrize("metric", ["fid", "kid", "mean"])
def test_intervals_cover_the_expected_metric_at_their_nominal_rate(metric, reference):
    y, ref = reference
    group = groups_of(N, GROUPS)
    k_yy = reference_kernel_mean(y)

    def statistic(rng):
        f, _ = draw(rng, shift=0.3)
        if metric == "fid":
            return seed_mean_fid(f, ref, group)
        if metric == "kid":
            per_seed = [kid(s, y, group, k_yy=k_yy) for s in f]
            return np.mean([e for e, _ in per_seed]), np.mean([r for _, r in per_seed], axis=0)
        return mean_with_replicates(f[..., 0], group)

    def independent(f):  # the same statistic, from its definition
        if metric == "fid":
            return np.mean([independent_fid(s, y) for s in f])
        if metric == "kid":
            return np.mean([kid(s, y, groups_of(N, 2), k_yy=k_yy)[0] for s in f])
        return f[..., 0].mean()

    mc = np.random.default_rng(1)
    truth = np.mean([independent(draw(mc, shift=0.3)[0]) for _ in range(1500)])
    rate = coverage(statistic, truth, np.random.default_rng(2))
    print(f"{metric}: 95 % interval coverage {rate:.3f} over 300 trials")
    assert 0.90 <= rate <= 0.99


def test_paired_differences_cover_the_true_difference_and_are_tighter(reference):
    """Model b is model a with a wider seed noise, on the same inputs (which brings its spread
    nearer the reference's): the paired interval of FID(a) - FID(b) covers the expected
    difference, and is narrower than the two separate intervals' combined half-widths."""
    y, ref = reference
    group = groups_of(N, GROUPS)

    def pair(rng):
        a, units = draw(rng, shift=0.3)
        b, _ = draw(rng, shift=0.3, scale=1.3, units=units)
        return Point(*seed_mean_fid(a, ref, group)), Point(*seed_mean_fid(b, ref, group))

    mc = np.random.default_rng(3)
    diffs = []
    for _ in range(600):
        a, units = draw(mc, shift=0.3)
        b, _ = draw(mc, shift=0.3, scale=1.3, units=units)
        diffs.append(np.mean([independent_fid(s, y) for s in a]) - np.mean([independent_fid(s, y) for s in b]))
    truth = float(np.mean(diffs))
    rng, hits, narrower, verdicts = np.random.default_rng(4), 0, 0, []
    for _ in range(300):
        a, b = pair(rng)
        c = compare(a, b)
        hits += c.lo <= truth <= c.hi
        _, hi_a, se_a = a.interval()
        _, hi_b, se_b = b.interval()
        narrower += (c.hi - c.lo) < (hi_a - a.estimate) + (hi_b - b.estimate)
        verdicts.append(c.verdict)
    assert truth > 0 and 0.90 <= hits / 300 <= 0.99
    assert narrower / 300 > 0.9
    assert verdicts.count("worse") > verdicts.count("better")


def test_verdicts_follow_the_interval_of_the_difference():
    base = np.linspace(-1, 1, 20)
    same = compare(Point(1.0, tuple(1.0 + 0.01 * base)), Point(1.0, tuple(1.0 - 0.01 * base)))
    assert same.verdict == "indistinguishable" and same.lo < 0 < same.hi
    lower = compare(Point(0.5, tuple(0.5 + 0.01 * base)), Point(1.0, tuple(1.0 + 0.01 * base)))
    assert lower.verdict == "better" and lower.hi < 0
    assert compare(Point(1.0, tuple(1.0 + 0.01 * base)), Point(0.5, tuple(0.5 + 0.01 * base))).verdict == "worse"
    assert compare(Point(0.9, tuple(0.9 + 0.01 * base)), Point(0.5, tuple(0.5 + 0.01 * base)),
                   lower_is_better=False).verdict == "better"  # accuracy: higher is better
