"""Verdicts on a family of paired comparisons: error control for the family as a whole.

A report states many comparisons ("FID of a minus FID of b"), each with an estimate d_i and
leave-a-group-out replicates r_i1..r_iG on the same G groups of inputs
(`pipeline.evaluation.uncertainty`), so the comparisons are correlated. Two ways to keep the
verdicts honest as a family:

- `simultaneous_critical(replicates)`: the critical value c of simultaneous intervals
  d_i +- c se_i, which all hold at once with probability `level` (family-wise error control,
  single-step max-|t|: Hothorn, Bretz & Westfall 2008, Biometrical Journal 50:346-363), the
  correlation of the comparisons estimated from the same jackknife replicates.
- `fdr_level(p_values, q)`: the Benjamini-Hochberg (1995) step-up at false discovery rate q and
  the marginal level of the matching false-coverage-rate-adjusted intervals (Benjamini &
  Yekutieli 2005, JASA 100:71-81), with `p_value` the two-sided t test of one comparison.
"""
import math

import numpy as np
from scipy import stats

from pipeline.evaluation.uncertainty import LEVEL


def p_value(difference, se, df) -> float:
    """Two-sided p-value of the t test of difference = 0 with `df` degrees of freedom (G - 1 for
    the jackknife on G groups). se = 0 (a point compared with itself) gives 1 when the difference
    is 0 as well, else 0."""
    if se == 0:
        return 1.0 if difference == 0 else 0.0
    return float(2 * stats.t.sf(abs(difference) / se, df))


def _centred_and_se(replicates):
    r = np.atleast_2d(np.asarray(replicates, dtype=np.float64))
    centred = r - r.mean(1, keepdims=True)
    g = r.shape[1]
    return centred, np.sqrt((g - 1) / g * (centred ** 2).sum(1))


def max_abs_z_quantile(replicates, level=LEVEL, draws=20_000, seed=0) -> float:
    """The `level` quantile of max_i |Z_i| / se_i, Z Gaussian with the jackknife covariance of the
    rows of `replicates` (m, G): the normal-theory critical value of HBW 2008, Eq. (5) with
    nu = infinity and R_n the jackknife correlation, by Monte Carlo with a fixed seed.

    Multiplier draws: for z ~ N(0, I_G), sqrt((G-1)/G) sum_g z_g (r_ig - mean_g r_ig) has exactly
    the jackknife covariance. Rows with se = 0 are ignored."""
    centred, se = _centred_and_se(replicates)
    keep = se > 0
    g = centred.shape[1]
    weights = math.sqrt((g - 1) / g) * centred[keep].T / se[keep]  # (G, kept): draws of t-ratios
    z = np.random.default_rng(seed).standard_normal((draws, g))
    # Blocks of draws keep the (draws, m) matrix of a large family out of memory at once.
    maxima = np.concatenate([np.abs(block @ weights).max(1)
                             for block in np.array_split(z, max(1, draws * keep.sum() // 2 ** 22))])
    return float(np.quantile(maxima, level))


def simultaneous_critical(replicates, level=LEVEL, draws=20_000, seed=0) -> float:
    """c such that the intervals d_i +- c se_i of the m comparisons (rows of `replicates`, (m, G))
    hold jointly with probability `level`: the single-step max-|t| intervals of HBW 2008
    (Sec. 3.2, theta_hat +- q_alpha D_n^1/2, q_alpha from Eq. (5)).

    The normal quantile `max_abs_z_quantile` is put on the t_{G-1} scale by matching tail
    probabilities, c = t_{G-1}^-1(Phi(c_normal)): exact for one comparison (the ordinary t
    interval) and for independent ones (Sidak on the t scale). The result is clipped to
    [single-comparison t value, Bonferroni t value], the bounds every family obeys, which Monte
    Carlo error could otherwise cross by a little.
    Comparisons with se = 0 (a point compared with itself) are ignored; with none left the
    single-comparison value is returned."""
    centred, se = _centred_and_se(replicates)
    df = centred.shape[1] - 1
    m = int((se > 0).sum())
    single = stats.t.ppf(0.5 + level / 2, df)
    if m == 0:
        return float(single)
    bonferroni = stats.t.ppf(1 - (1 - level) / (2 * m), df)
    c_normal = max_abs_z_quantile(replicates, level, draws, seed)
    return float(np.clip(stats.t.ppf(stats.norm.cdf(c_normal), df), single, bonferroni))


def fdr_level(p_values, q=0.05) -> tuple[float, np.ndarray]:
    """(level, q-values) of the Benjamini-Hochberg step-up at false discovery rate q.

    BH 1995, Eq. (1): with p_(1) <= ... <= p_(m), R = max{k : p_(k) <= k q / m} (0 if none), and
    the R smallest are rejected. `level` = 1 - R q / m is the marginal level of the FCR-adjusted
    BH-selected intervals of Benjamini & Yekutieli 2005 (1 - q / m when R = 0): an interval at that
    level excludes 0 exactly for the rejected hypotheses. The q-values are the BH-adjusted
    p-values min_{j >= k} min(1, m p_(j) / j), in the input order: hypothesis i is rejected at
    rate q iff its q-value <= q."""
    p = np.asarray(p_values, dtype=np.float64)
    m = len(p)
    order = np.argsort(p)
    ranks = np.arange(1, m + 1)
    below = np.flatnonzero(p[order] <= ranks * q / m)
    rejected = int(below[-1]) + 1 if len(below) else 0
    adjusted = np.minimum.accumulate((m * p[order] / ranks)[::-1])[::-1]
    qvalues = np.empty(m)
    qvalues[order] = np.minimum(adjusted, 1.0)
    return 1 - max(rejected, 1) * q / m, qvalues
