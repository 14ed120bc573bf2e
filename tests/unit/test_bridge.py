"""Bridge coefficients (DDBM Thm. 1; I2SB): endpoints, I2SB equivalence, posterior, precond."""
import math

import pytest
import torch
from pydantic import ValidationError

from pipeline.models.bridge import BridgeSchedule, bridge_loss_weight, bridge_precond, sample_training_t

KINDS = ["i2sb", "vp"]
F64 = torch.float64


def schedule(kind):
    return BridgeSchedule(kind=kind)


def test_params_defaults_and_validation():
    s = BridgeSchedule()
    assert (s.kind, s.beta_min, s.beta_max, s.beta_d, s.t_min, s.T) == ("i2sb", 0.1, 0.3, 2.0, 1e-4, 1.0)
    for bad in ({"kind": "ve"}, {"beta_min": 0.0}, {"t_min": 0.0}, {"sigma_max": 1.0}):
        with pytest.raises(ValidationError):
            BridgeSchedule(**bad)
    with pytest.raises(ValidationError):
        s.kind = "vp"


@pytest.mark.parametrize("kind", KINDS)
def test_marginal_endpoints(kind):
    s = schedule(kind)
    a, b, c = s.marginal(torch.tensor([0.0, s.t_min, s.T], dtype=F64))
    assert torch.allclose(a, torch.tensor([0.0, 0.0, 1.0], dtype=F64), atol=1e-3)
    assert torch.allclose(b, torch.tensor([1.0, 1.0, 0.0], dtype=F64), atol=1e-3)
    assert torch.allclose(c, torch.tensor([0.0, 0.0, 0.0], dtype=F64), atol=1e-2)
    assert (a[0], b[0], c[0]) == (0.0, 1.0, 0.0) and (a[2], b[2], c[2]) == (1.0, 0.0, 0.0)


@pytest.mark.parametrize("kind", KINDS)
def test_dtypes_follow_time(kind):
    s = schedule(kind)
    a, b, c = s.marginal(torch.full((3,), 0.4))
    assert a.dtype == b.dtype == c.dtype == torch.float32 and a.shape == (3,)
    a, _, _ = s.marginal(0.4)                       # Python float: 0-dim float64, no promotion
    assert a.dtype == F64 and a.ndim == 0
    assert (a * torch.ones(2, dtype=torch.float32)).dtype == torch.float32
    k, _, _ = s.posterior(0.2, torch.full((3,), 0.4))          # tensor t, float s: float32 too
    assert k.dtype == torch.float32 and k.shape == (3,)


def test_i2sb_marginal_is_i2sb_formula():
    s = schedule("i2sb")
    t = torch.linspace(0.01, 0.99, 99, dtype=F64)
    sig2, sig2_1 = s.sigma(t) ** 2, s.sigma(1.0) ** 2
    sigbar2 = sig2_1 - sig2                               # backward cumulative
    a, b, c = s.marginal(t)
    assert torch.allclose(a + b, torch.ones_like(t))
    assert torch.allclose(a, sig2 / (sig2 + sigbar2)) and torch.allclose(b, sigbar2 / (sig2 + sigbar2))
    assert torch.allclose(c ** 2, sig2 * sigbar2 / (sig2 + sigbar2))
    assert torch.equal(s.alpha(t), torch.ones_like(t))


def test_i2sb_schedule_matches_i2sb_discrete_betas():
    # I2SB: betas = linspace(sqrt(1e-4), sqrt(beta_max/1000), 1000)^2, first half mirrored.
    n = 1000
    for beta_max in (0.3, 1.0):
        betas = torch.linspace(1e-4 ** 0.5, (beta_max / n) ** 0.5, n, dtype=F64) ** 2
        betas = torch.cat([betas[: n // 2], betas[: n // 2].flip(0)])
        std_fwd = betas.cumsum(0).sqrt()
        s = BridgeSchedule(kind="i2sb", beta_max=beta_max)
        k = torch.tensor([99, 249, 499, 749, 999])
        t = (k + 1).to(F64) / n
        assert torch.allclose(s.sigma(t), std_fwd[k], rtol=5e-3)
    assert float(schedule("i2sb").sigma(1.0)) ** 2 == pytest.approx(0.141, abs=2e-3)   # "order 0.1"


def test_i2sb_beta_is_symmetric():
    s = schedule("i2sb")
    t = torch.linspace(0, 0.5, 11, dtype=F64)
    total = s.sigma(1.0) ** 2
    assert torch.allclose(s.sigma(t) ** 2 + s.sigma(1 - t) ** 2, total.expand(11))


def test_vp_is_ddbm_prior():
    s = schedule("vp")
    t = torch.linspace(0, 1, 11, dtype=F64)
    alpha = torch.exp(-0.5 * (0.1 * t + 0.5 * 2.0 * t ** 2))
    assert torch.allclose(s.alpha(t), alpha) and torch.allclose(s.sigma(t) ** 2, 1 - alpha ** 2)
    # General formula from DDBM (a_t, b_t, c_t) written with SNR explicitly.
    tt = t[1:-1]
    snr = lambda u: s.alpha(u) ** 2 / s.sigma(u) ** 2
    r = snr(torch.tensor(1.0, dtype=F64)) / snr(tt)
    a, b, c = s.marginal(tt)
    assert torch.allclose(a, s.alpha(tt) / s.alpha(1.0) * r)
    assert torch.allclose(b, s.alpha(tt) * (1 - r)) and torch.allclose(c ** 2, s.sigma(tt) ** 2 * (1 - r))


def test_i2sb_posterior_is_i2sb_formula():
    s = schedule("i2sb")
    for si, ti in [(0.1, 0.2), (0.3, 0.9), (0.001, 0.5), (0.7, 1.0)]:
        k_xt, k_x0, std = s.posterior(si, ti)
        r = float(s.sigma(si)) ** 2 / float(s.sigma(ti)) ** 2
        assert float(k_xt) == pytest.approx(r) and float(k_x0) == pytest.approx(1 - r)
        assert float(std) ** 2 == pytest.approx(float(s.sigma(si)) ** 2 * (1 - r))


@pytest.mark.parametrize("kind", KINDS)
def test_posterior_consistent_with_marginals_closed_form(kind):
    # x_t = a_t y + b_t x0 + c_t e, x_s = k x_t + k0 x0 + std e'  =>  must equal the marginal at s.
    s = schedule(kind)
    for si, ti in [(0.05, 0.1), (0.2, 0.7), (0.5, 0.99), (0.3, 1.0)]:
        a_t, b_t, c_t = s.marginal(ti)
        a_s, b_s, c_s = s.marginal(si)
        k, k0, std = s.posterior(si, ti)
        assert float(k * a_t) == pytest.approx(float(a_s), abs=1e-12)
        assert float(k * b_t + k0) == pytest.approx(float(b_s), abs=1e-12)
        assert float(k ** 2 * c_t ** 2 + std ** 2) == pytest.approx(float(c_s ** 2), abs=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_posterior_consistent_with_marginals_monte_carlo(kind):
    s, n = schedule(kind), 200_000
    g = torch.Generator().manual_seed(0)
    x0, y = 0.3, -0.7
    for si, ti in [(0.1, 0.4), (0.6, 0.9)]:
        a_t, b_t, c_t = s.marginal(ti)
        x_t = a_t * y + b_t * x0 + c_t * torch.randn(n, generator=g, dtype=F64)
        k, k0, std = s.posterior(si, ti)
        x_s = k * x_t + k0 * x0 + std * torch.randn(n, generator=g, dtype=F64)
        a_s, b_s, c_s = s.marginal(si)
        assert x_s.mean().item() == pytest.approx(float(a_s * y + b_s * x0), abs=3 * float(c_s) / n ** 0.5 + 1e-9)
        assert x_s.std().item() == pytest.approx(float(c_s), rel=0.01)


@pytest.mark.parametrize("kind", KINDS)
def test_bridge_precond_unit_variance_under_gaussian_data(kind):
    s, n = schedule(kind), 400_000
    g = torch.Generator().manual_seed(1)
    sd, sy, cov = 0.5, 0.6, 0.2                       # Cov(x0, y) = 0.2 (|cov| < sd sy)
    x0 = sd * torch.randn(n, generator=g, dtype=F64)
    y = cov / sd ** 2 * x0 + math.sqrt(sy ** 2 - cov ** 2 / sd ** 2) * torch.randn(n, generator=g, dtype=F64)
    for t in (0.05, 0.5, 0.95):
        a, b, c = s.marginal(t)
        x_t = a * y + b * x0 + c * torch.randn(n, generator=g, dtype=F64)
        c_skip, c_out, c_in = bridge_precond(a, b, c, sd, sy, cov)
        target = (x0 - c_skip * x_t) / c_out
        assert (c_in * x_t).var().item() == pytest.approx(1.0, rel=0.02)
        assert target.var().item() == pytest.approx(1.0, rel=0.02)
        assert abs(torch.corrcoef(torch.stack([target, x_t]))[0, 1].item()) < 0.01   # c_skip is optimal
        assert float(bridge_loss_weight(a, b, c, sd, sy, cov) * c_out ** 2) == pytest.approx(1.0)


def test_bridge_precond_tensors_and_endpoints():
    s = schedule("vp")
    a, b, c = s.marginal(torch.tensor([s.t_min, 0.5], dtype=F64))
    c_skip, c_out, c_in = bridge_precond(a, b, c, 0.5, 0.5)
    assert c_skip.shape == (2,) and torch.isfinite(torch.stack([c_skip, c_out, c_in])).all()
    assert c_skip[0].item() == pytest.approx(1.0, abs=1e-3)          # t -> 0: x_t is x0
    assert c_out[0].item() == pytest.approx(0.0, abs=1e-2)


def test_sample_training_t_range():
    s = schedule("i2sb")
    t = sample_training_t(10_000, s, torch.Generator().manual_seed(0))
    assert t.shape == (10_000,) and t.min() >= s.t_min and t.max() <= s.T - s.t_min
    assert t.mean().item() == pytest.approx(0.5, abs=0.02)
