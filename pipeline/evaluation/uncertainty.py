"""Intervals and paired comparisons of evaluation metrics (docs/evaluation.md).

Unit of resampling: one evaluated input together with every sample drawn for it (one per
sampling seed). Inputs are split into `groups` contiguous blocks (the test split is
shuffled once, so blocks are random subsets); a metric is recomputed with each block left
out: the delete-a-group jackknife (Quenouille 1956; Tukey 1958; Efron & Stein 1981). Its
variance estimate covers both sources of noise, the draw of the inputs and the sampling
seeds, for any smooth statistic of the samples (a mean of per-image scores, FID, KID).

- `interval(estimate, replicates)`: estimate +- t_{G-1, 0.975} se_jack. It is an interval
  for the expected metric at this number of inputs and seeds (FID and KID are biased at
  finite n: compare points only at equal n, as the pipeline does).
- `compare(a, b)`: two points evaluated on the same inputs with the same seeds, compared
  pairwise: the replicate of the difference is the difference of the replicates (common
  random numbers), so their shared noise cancels. A verdict is "better" / "worse" only when
  the interval of the difference excludes 0, else "indistinguishable".
- `frechet_distance`, `kid`: the statistics from features, with leave-a-group-out
  replicates computed from group sums (one pass over the features).
"""
import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95


def groups_of(n, groups):
    """(n,) int group index of each input: `groups` contiguous, balanced blocks."""
    if not 2 <= groups <= n:
        raise ValueError(f"need 2 <= groups <= n, got groups={groups} for n={n}")
    return np.arange(n) * groups // n


def jackknife_se(replicates):
    """sqrt((G-1)/G sum (r_g - mean r)^2): the jackknife standard error (Efron & Stein 1981)."""
    r = np.asarray(replicates, dtype=np.float64)
    g = len(r)
    return float(math.sqrt((g - 1) / g * np.sum((r - r.mean()) ** 2)))


def interval(estimate, replicates, level=LEVEL):
    """(lo, hi, se): estimate +- t_{G-1} se_jack."""
    se = jackknife_se(replicates)
    half = stats.t.ppf(0.5 + level / 2, len(replicates) - 1) * se
    return estimate - half, estimate + half, se


@dataclass(frozen=True)
class Point:
    """One metric of one evaluated point: the estimate and its leave-a-group-out replicates."""
    estimate: float
    replicates: tuple

    def interval(self, level=LEVEL):
        return interval(self.estimate, self.replicates, level)


@dataclass(frozen=True)
class Comparison:
    """a - b with its interval and the verdict for a metric where `lower` is better or not."""
    difference: float
    lo: float
    hi: float
    verdict: str  # "better" / "worse" (a against b) / "indistinguishable"


def compare(a: Point, b: Point, lower_is_better=True, level=LEVEL) -> Comparison:
    if len(a.replicates) != len(b.replicates):
        raise ValueError("points compared pairwise need the same groups of the same inputs")
    diff = a.estimate - b.estimate
    lo, hi, _ = interval(diff, np.subtract(a.replicates, b.replicates), level)
    if hi < 0 or lo > 0:
        a_lower = hi < 0
        verdict = "better" if a_lower == lower_is_better else "worse"
    else:
        verdict = "indistinguishable"
    return Comparison(diff, lo, hi, verdict)


# --- per-image means ---------------------------------------------------------------------------

def mean_with_replicates(values, group):
    """(mean, leave-a-group-out means) of per-input values (n,) or (seeds, n), averaged over
    seeds first."""
    v = np.asarray(values, dtype=np.float64)
    per_input = v.mean(0) if v.ndim == 2 else v
    total, count = per_input.sum(), len(per_input)
    sums = np.bincount(group, weights=per_input)
    sizes = np.bincount(group)
    return float(total / count), tuple((total - sums) / (count - sizes))


# --- Frechet distance --------------------------------------------------------------------------

@dataclass(frozen=True)
class Reference:
    """Statistics of the reference features: mean, covariance, its square root and trace."""
    mu: np.ndarray
    cov: np.ndarray
    sqrt_cov: np.ndarray
    trace: float

    @classmethod
    def of(cls, features):
        mu, cov = _mean_cov(np.asarray(features, dtype=np.float64))
        w, v = np.linalg.eigh(cov)
        sqrt_cov = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        return cls(mu, cov, sqrt_cov, float(np.trace(cov)))


def _mean_cov(x):
    mu = x.mean(0)
    centred = x - mu
    return mu, centred.T @ centred / (len(x) - 1)


def _frechet(mu, cov, ref: Reference):
    """||mu - mu_r||^2 + tr C + tr C_r - 2 tr (C_r^1/2 C C_r^1/2)^1/2 (Dowson & Landau 1982):
    the eigenvalues of C_r^1/2 C C_r^1/2 are those of C C_r, and it is symmetric PSD."""
    inner = ref.sqrt_cov @ cov @ ref.sqrt_cov
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    diff = mu - ref.mu
    return float(diff @ diff + np.trace(cov) + ref.trace - 2 * np.sqrt(np.clip(eig, 0, None)).sum())


def frechet_distance(features, ref: Reference, group):
    """(FID, leave-a-group-out FIDs) of features (n, d) against the reference statistics."""
    x = np.asarray(features, dtype=np.float64)
    n = len(x)
    total, outer = x.sum(0), x.T @ x
    estimate = _frechet(*_mean_cov(x), ref)
    replicates = []
    for g in range(group.max() + 1):
        xg = x[group == g]
        m = n - len(xg)
        mu = (total - xg.sum(0)) / m
        cov = (outer - xg.T @ xg - m * np.outer(mu, mu)) / (m - 1)
        replicates.append(_frechet(mu, cov, ref))
    return estimate, tuple(replicates)


# --- KID ---------------------------------------------------------------------------------------

def _poly_kernel(a, b):
    """(a . b / d + 1)^3, the KID kernel (Binkowski et al. 2018)."""
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def reference_kernel_mean(ref_features, chunk=2048):
    """The reference's own term of KID, mean k(y_i, y_j) over i != j: it depends on the
    reference alone, so a stage computes it once (`kid(..., k_yy=...)`)."""
    y = np.asarray(ref_features, dtype=np.float64)
    return _offdiag_sum(y, chunk) / (len(y) * (len(y) - 1))


def kid(features, ref_features, group, chunk=2048, k_yy=None):
    """(KID, leave-a-group-out KIDs): the unbiased MMD^2 of the full sets with the polynomial
    kernel (Binkowski et al. 2018, Eq. 3), no subsets. `k_yy`: the reference's
    `reference_kernel_mean`, when already computed."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(ref_features, dtype=np.float64)
    n, m = len(x), len(y)
    k_yy = reference_kernel_mean(y, chunk) if k_yy is None else k_yy
    row_xx = np.concatenate([_poly_kernel(x[i:i + chunk], x).sum(1) for i in range(0, n, chunk)])
    diag_xx = (np.einsum("ij,ij->i", x, x) / x.shape[1] + 1.0) ** 3
    row_xy = np.concatenate([_poly_kernel(x[i:i + chunk], y).sum(1) for i in range(0, n, chunk)])
    offdiag_xx = row_xx.sum() - diag_xx.sum()
    estimate = offdiag_xx / (n * (n - 1)) + k_yy - 2 * row_xy.sum() / (n * m)
    replicates = []
    for g in range(group.max() + 1):
        inside = group == g
        xg = x[inside]
        k = n - len(xg)
        block = _poly_kernel(xg, xg).sum()
        # Pairs leaving the sum: rows and columns of the group, the group block counted once.
        xx = offdiag_xx - 2 * (row_xx[inside].sum() - diag_xx[inside].sum()) + (block - diag_xx[inside].sum())
        replicates.append(xx / (k * (k - 1)) + k_yy - 2 * (row_xy.sum() - row_xy[inside].sum()) / (k * m))
    return float(estimate), tuple(float(r) for r in replicates)


def _offdiag_sum(y, chunk):
    total = sum(_poly_kernel(y[i:i + chunk], y).sum() for i in range(0, len(y), chunk))
    return total - ((np.einsum("ij,ij->i", y, y) / y.shape[1] + 1.0) ** 3).sum()
