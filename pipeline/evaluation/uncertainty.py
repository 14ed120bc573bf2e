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
- `Manifold.of`, `precision_recall`: improved precision and recall (Kynkaanniemi et al.
  2019), each replicate an exact recomputation without its group (one pass over the
  generated-reference distances).
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
    """a - b with its interval and the verdict for a metric where `lower` is better or not.
    `replicates` are the difference's own leave-a-group-out replicates and `se` their jackknife
    standard error, so a family of comparisons can widen every interval together (`at`,
    pipeline.evaluation.multiplicity)."""
    difference: float
    lo: float
    hi: float
    verdict: str  # "better" / "worse" (a against b) / "indistinguishable"
    se: float = float("nan")
    replicates: tuple = ()
    lower_is_better: bool = True

    @property
    def df(self):
        return len(self.replicates) - 1

    def at(self, critical):
        """The same comparison with the interval difference +- critical * se."""
        lo, hi = self.difference - critical * self.se, self.difference + critical * self.se
        return Comparison(self.difference, lo, hi, verdict_of(lo, hi, self.lower_is_better), self.se,
                          self.replicates, self.lower_is_better)


def verdict_of(lo, hi, lower_is_better=True):
    """"better" / "worse" when [lo, hi] (of a - b) excludes 0, else "indistinguishable"."""
    if hi < 0 or lo > 0:
        return "better" if (hi < 0) == lower_is_better else "worse"
    return "indistinguishable"


def compare_replicates(difference, replicates, lower_is_better=True, level=LEVEL) -> Comparison:
    """A comparison from a difference and its leave-a-group-out replicates."""
    lo, hi, se = interval(difference, replicates, level)
    return Comparison(difference, lo, hi, verdict_of(lo, hi, lower_is_better), se, tuple(replicates),
                      lower_is_better)


def compare(a: Point, b: Point, lower_is_better=True, level=LEVEL) -> Comparison:
    if len(a.replicates) != len(b.replicates):
        raise ValueError("points compared pairwise need the same groups of the same inputs")
    return compare_replicates(a.estimate - b.estimate, np.subtract(a.replicates, b.replicates), lower_is_better,
                              level)


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


# --- precision and recall ----------------------------------------------------------------------

@dataclass(frozen=True)
class Manifold:
    """The reference features and each one's radius: the distance to its k-th nearest other
    reference feature, NND_k (Kynkaanniemi et al. 2019, Eq. 1)."""
    features: np.ndarray  # (m, d) float64
    radii: np.ndarray  # (m,)
    k: int

    @classmethod
    def of(cls, ref_features, k=3, chunk=2048) -> "Manifold":
        y = np.asarray(ref_features, dtype=np.float64)
        distances, _ = _nearest(y, k, chunk)
        return cls(y, distances[:, k - 1], k)


def _distances(a, b, b_sq):
    """(len(a), len(b)) Euclidean distances from ||a||^2 + ||b||^2 - 2 a.b, built in place so
    that a chunk allocates one float matrix."""
    d = a @ b.T
    d *= -2
    d += np.einsum("ij,ij->i", a, a)[:, None]
    d += b_sq
    np.maximum(d, 0, out=d)  # rounding can take a tiny distance below 0
    return np.sqrt(d, out=d)


def _nearest(x, count, chunk):
    """(distances, indices), both (n, count): each point's `count` nearest other points, nearest first."""
    sq = np.einsum("ij,ij->i", x, x)
    distances, indices = [], []
    for start in range(0, len(x), chunk):
        d = _distances(x[start:start + chunk], x, sq)
        rows = np.arange(len(d))
        d[rows, start + rows] = np.inf  # a point is not its own neighbour
        near = np.argpartition(d, count - 1, axis=1)[:, :count]
        near_d = np.take_along_axis(d, near, 1)
        order = np.argsort(near_d, axis=1)
        distances.append(np.take_along_axis(near_d, order, 1))
        indices.append(np.take_along_axis(near, order, 1))
    return np.concatenate(distances), np.concatenate(indices)


def _radii_without(distances, neighbour_group, own_group, k):
    """(groups, radii), both (n, k): for each generated sample, the groups among its k nearest
    neighbours and its radius once that group is left out, the k-th nearest neighbour outside it.
    Only these groups change a radius; removing any other leaves the k nearest in place. A slot
    with a repeated group, or the sample's own (it leaves with it), gets radius -inf: it covers
    nothing."""
    near = np.sort(neighbour_group[:, :k], axis=1)
    repeated = np.zeros(near.shape, bool)
    repeated[:, 1:] = near[:, 1:] == near[:, :-1]
    radii = np.empty(near.shape)
    for slot in range(k):
        outside = np.cumsum(neighbour_group != near[:, slot, None], axis=1)
        kth = np.argmax(outside >= k, axis=1)
        radii[:, slot] = np.take_along_axis(distances, kth[:, None], 1)[:, 0]
    radii[repeated | (near == own_group[:, None])] = -np.inf
    return near, radii


def _count_by_group(hits, labels, groups):
    """(groups, m) int: per group, how many of the rows of `hits` (c, m) labelled with it are True."""
    order = np.argsort(labels)
    present, first = np.unique(labels[order], return_index=True)
    counts = np.zeros((groups, hits.shape[1]), np.int64)
    counts[present] = np.add.reduceat(hits[order], first, axis=0, dtype=np.int64)
    return counts


def precision_recall(features, ref: Manifold, group, chunk=2048):
    """((precision, replicates), (recall, replicates)) of generated features (n, d) against `ref`
    (Kynkaanniemi et al. 2019, Eq. 2): precision, the share of generated samples inside some
    reference ball; recall, the share of reference features inside some generated ball, the
    generated radii taken among the generated samples (Eq. 1).

    The replicates are exact recomputations with group g's samples left out. For precision that
    is a leave-a-group-out mean. For recall, g's balls leave and the samples whose k nearest
    neighbours were in g grow theirs: each sample keeps its k + (largest group) nearest
    neighbours, which hold its k nearest outside any one group, and one pass over the
    generated-reference distances counts each reference feature's covering balls per group and
    marks what the grown balls add."""
    x = np.asarray(features, dtype=np.float64)
    sizes = np.bincount(group)
    if len(x) - sizes.max() <= ref.k:
        raise ValueError(f"need more than k={ref.k} generated samples outside every group")
    distances, neighbours = _nearest(x, min(ref.k + sizes.max(), len(x) - 1), chunk)
    radii = distances[:, ref.k - 1]
    grown_group, grown_radii = _radii_without(distances, group[neighbours], group, ref.k)
    m, groups = len(ref.features), len(sizes)
    inside = np.empty(len(x), bool)
    covering = np.zeros((groups, m), np.int64)  # [g, j]: balls of group g holding reference j
    grown = np.zeros((groups, m), bool)  # [g, j]: j inside a ball grown by leaving g out
    ref_sq = np.einsum("ij,ij->i", ref.features, ref.features)
    for start in range(0, len(x), chunk):
        rows = slice(start, start + chunk)
        d = _distances(x[rows], ref.features, ref_sq)
        inside[rows] = (d <= ref.radii).any(1)
        covering += _count_by_group(d <= radii[rows, None], group[rows], groups)
        for slot in range(ref.k):
            grown |= _count_by_group(d <= grown_radii[rows, slot, None], grown_group[rows, slot], groups) > 0
    total = covering.sum(0)
    recall = ((total - covering > 0) | grown).mean(1)
    return mean_with_replicates(inside, group), (float((total > 0).mean()), tuple(recall.tolist()))
