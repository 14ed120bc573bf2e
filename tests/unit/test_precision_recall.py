"""Improved precision and recall (pipeline.evaluation.uncertainty.precision_recall;
Kynkaanniemi et al. 2019) on cases with a known answer.

The estimates are checked against torch-fidelity on the same features and against the
paper's definition (Eq. 1-2) written as plain loops; every leave-a-group-out replicate
against those loops run on the features without the group, in a case built so that leaving
a group out grows a remaining sample's radius (keeping the full-set radii instead gives a
different recall there); the behaviour on a mode-collapsed and on a noisy generator against
one drawn from the reference law; and chunked distances against a single chunk."""
import math

import numpy as np
import pytest
import torch

from pipeline.evaluation.uncertainty import Manifold, groups_of, interval, precision_recall

K = 3


def nnd(points, k=K):
    """NND_k of every point: the distance to its k-th nearest other point (Eq. 1), by plain loops."""
    return [sorted(math.dist(p, q) for j, q in enumerate(points) if j != i)[k - 1] for i, p in enumerate(points)]


def share_inside(points, centres, radii):
    """The mean over `points` of f (Eq. 1): inside the ball of some centre (Eq. 2)."""
    return sum(any(math.dist(p, c) <= r for c, r in zip(centres, radii)) for p in points) / len(points)


def brute_precision_recall(x, y):
    return share_inside(x, y, nnd(y)), share_inside(y, x, nnd(x))


def test_estimates_equal_torch_fidelity_and_the_definition():
    from torch_fidelity.metric_prc import prc_features_to_metric
    rng = np.random.default_rng(0)
    x, y = rng.normal(0.2, 1.2, size=(150, 6)), rng.normal(size=(200, 6))
    ref = Manifold.of(y, k=K)
    (precision, _), (recall, _) = precision_recall(x, ref, groups_of(150, 10))
    assert ref.radii == pytest.approx(nnd(y), rel=1e-12)
    assert (precision, recall) == brute_precision_recall(x, y)
    theirs = prc_features_to_metric(torch.tensor(x), torch.tensor(y), prc_neighborhood=K, prc_batch_size=10000,
                                    save_cpu_ram=False, verbose=False)
    # torch-fidelity averages the indicators in float32: compare the counts of samples inside.
    assert round(theirs["precision"] * 150) == round(precision * 150)
    assert round(theirs["recall"] * 200) == round(recall * 200)


def test_every_replicate_equals_a_recomputation_without_its_group():
    """Samples 0-2 (group 0) and 5 (group 1) sit together far from the rest, a few reference
    features around them: without group 0, sample 5's 3 nearest neighbours are in the main
    cloud, and its grown ball takes in reference features that no ball held before."""
    rng = np.random.default_rng(1)
    far = np.array([8.0, 0.0, 0.0])
    x = rng.normal(size=(40, 3))
    x[[0, 1, 2, 5]] = far + 0.01 * rng.normal(size=(4, 3))
    y = rng.normal(size=(50, 3))
    y[:3] = far + np.eye(3)
    group = groups_of(40, 8)
    (_, precision_reps), (_, recall_reps) = precision_recall(x, Manifold.of(y, k=K), group, chunk=16)
    full_radii = np.array(nnd(x))
    naive = []
    for g in range(8):
        kept = group != g
        assert (precision_reps[g], recall_reps[g]) == brute_precision_recall(x[kept], y)
        naive.append(share_inside(y, x[kept], full_radii[kept]))
    assert naive[0] < recall_reps[0]  # keeping the full-set radii misses what sample 5's grown ball holds


def scores(x, ref, group):
    (precision, p_reps), (recall, r_reps) = precision_recall(x, ref, group)
    return precision, interval(precision, p_reps)[2], recall, interval(recall, r_reps)[2]


def test_collapse_loses_recall_and_noise_loses_precision():
    """Against N(0, I) in 16 dimensions (1000 reference features): a fresh draw of the
    reference law scores precision and recall alike (the two sets play symmetric roles), three
    modes keep precision and lose recall, the law plus N(0, I) noise loses precision."""
    rng = np.random.default_rng(2)
    n, d = 1000, 16
    y = rng.normal(size=(n, d))
    ref, group = Manifold.of(y, k=K), groups_of(n, 20)
    precision, p_se, recall, r_se = scores(rng.normal(size=(n, d)), ref, group)
    assert 0.7 < precision < 0.9 and abs(precision - recall) < 2 * math.hypot(p_se, r_se)
    modes = y[rng.integers(3, size=n)] + 0.05 * rng.normal(size=(n, d))
    collapsed, _, collapsed_recall, _ = scores(modes, ref, group)
    assert collapsed >= precision and collapsed_recall < 0.01
    noisy, noisy_se, _, _ = scores(rng.normal(size=(n, d)) + rng.normal(size=(n, d)), ref, group)
    assert noisy + 10 * math.hypot(p_se, noisy_se) < precision


def test_chunks_give_the_result_of_one_chunk():
    """BLAS may round a product's last bit differently for another number of rows, so the radii
    agree to rounding; the indicators, and so the scores, are identical."""
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(230, 8)), rng.normal(size=(170, 8))
    group = groups_of(230, 23)
    whole = Manifold.of(y, chunk=10_000)
    chunked = Manifold.of(y, chunk=37)
    assert chunked.radii == pytest.approx(whole.radii, rel=1e-14)
    assert precision_recall(x, chunked, group, chunk=37) == precision_recall(x, whole, group, chunk=10_000)
