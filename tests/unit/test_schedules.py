"""EDM schedules and preconditioning (Karras et al. 2022): grids and identities."""
import math

import pytest
import torch
from pydantic import ValidationError

from pipeline.models.schedules import (EDMSchedule, edm_loss_weight, edm_precond, karras_sigmas,
                                sample_training_sigma, vp_sigma, vp_sigma_inv, vp_sigmas)

SIGMAS = torch.logspace(-3, 2, 41, dtype=torch.float64)


def test_edm_schedule_defaults_and_validation():
    s = EDMSchedule()
    assert (s.sigma_min, s.sigma_max, s.sigma_data, s.rho, s.P_mean, s.P_std) == (
        0.002, 80.0, 0.5, 7.0, -1.2, 1.2)
    with pytest.raises(ValidationError):
        EDMSchedule(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValidationError):
        EDMSchedule(sigma_data=0.0)
    with pytest.raises(ValidationError):
        EDMSchedule(sigma_mn=0.1)                       # extra keys are an error
    with pytest.raises(ValidationError):
        s.rho = 3.0                                      # frozen


@pytest.mark.parametrize("grid", ["karras", "vp"])
@pytest.mark.parametrize("steps", [1, 2, 3, 18, 64])
def test_sigma_grids_monotone_with_exact_endpoints(grid, steps):
    smin, smax = 0.002, 80.0
    sigmas = karras_sigmas(steps, smin, smax, 7.0) if grid == "karras" else vp_sigmas(steps, smin, smax)
    assert sigmas.shape == (steps + 1,) and sigmas.dtype == torch.float64
    assert sigmas[0] == smax and sigmas[-1] == 0
    if steps > 1:
        assert sigmas[-2] == pytest.approx(smin, rel=1e-12)
    assert (sigmas[1:] < sigmas[:-1]).all()


def test_karras_grid_is_uniform_in_sigma_to_the_one_over_rho():
    rho = 7.0
    inv = karras_sigmas(10, 0.002, 80.0, rho)[:-1] ** (1 / rho)
    assert torch.allclose(inv.diff(), inv.diff()[0].expand(9), rtol=1e-9)


def test_vp_grid_is_uniform_in_vp_time():
    sigmas = vp_sigmas(10, 0.002, 80.0)[:-1]
    t = torch.tensor([vp_sigma_inv(float(s)) for s in sigmas], dtype=torch.float64)
    assert torch.allclose(t.diff(), t.diff()[0].expand(9), rtol=1e-6)
    assert torch.allclose(vp_sigma(t), sigmas, rtol=1e-9)       # sigma(t) and its inverse agree
    assert vp_sigma(torch.tensor(1.0, dtype=torch.float64)) == pytest.approx(
        math.sqrt(math.exp(0.5 * 19.9 + 0.1) - 1))


def test_bad_steps_rejected():
    for steps in (0, -1, 2.5):
        with pytest.raises(ValueError):
            karras_sigmas(steps, 0.002, 80.0)
        with pytest.raises(ValueError):
            vp_sigmas(steps, 0.002, 80.0)


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_edm_precond_closed_form_identities(sigma_data):
    c_skip, c_out, c_in, c_noise = edm_precond(SIGMAS, sigma_data)
    sd2, s2 = sigma_data ** 2, SIGMAS ** 2
    # Unit-variance network input: Var(c_in x_sigma) = c_in^2 (sd^2 + sigma^2).
    assert torch.allclose(c_in ** 2 * (sd2 + s2), torch.ones_like(SIGMAS))
    # Unit-variance training target F = (x0 - c_skip x)/c_out.
    target_var = ((1 - c_skip) ** 2 * sd2 + c_skip ** 2 * s2) / c_out ** 2
    assert torch.allclose(target_var, torch.ones_like(SIGMAS))
    # c_skip minimises that variance: the target is uncorrelated with the input.
    assert torch.allclose((1 - c_skip) * sd2 - c_skip * s2, torch.zeros_like(SIGMAS), atol=1e-12)
    # Loss weight undoes c_out: lambda * c_out^2 = 1.
    assert torch.allclose(edm_loss_weight(SIGMAS, sigma_data) * c_out ** 2, torch.ones_like(SIGMAS))
    assert torch.allclose(c_noise, SIGMAS.log() / 4)


def test_edm_precond_limits():
    c_skip, c_out, _, _ = edm_precond(torch.tensor([1e-6, 1e4], dtype=torch.float64), 0.5)
    assert c_skip[0] == pytest.approx(1.0, abs=1e-9) and c_out[0] == pytest.approx(0.0, abs=1e-5)
    assert c_skip[1] == pytest.approx(0.0, abs=1e-8) and c_out[1] == pytest.approx(0.5, rel=1e-6)


def test_edm_precond_monte_carlo():
    g = torch.Generator().manual_seed(0)
    sd, n = 0.5, 200_000
    x0 = sd * torch.randn(n, generator=g, dtype=torch.float64)
    for sigma in (0.01, 0.5, 5.0, 80.0):
        x = x0 + sigma * torch.randn(n, generator=g, dtype=torch.float64)
        c_skip, c_out, c_in, _ = edm_precond(torch.tensor(sigma, dtype=torch.float64), sd)
        assert (c_in * x).var().item() == pytest.approx(1.0, rel=0.02)
        assert ((x0 - c_skip * x) / c_out).var().item() == pytest.approx(1.0, rel=0.02)


def test_sample_training_sigma_is_log_normal_and_seeded():
    s = EDMSchedule()
    sig = sample_training_sigma(50_000, s, torch.Generator().manual_seed(1))
    assert sig.shape == (50_000,) and (sig > 0).all()
    assert sig.log().mean().item() == pytest.approx(s.P_mean, abs=0.03)
    assert sig.log().std().item() == pytest.approx(s.P_std, rel=0.03)
    again = sample_training_sigma(50_000, s, torch.Generator().manual_seed(1))
    assert torch.equal(sig, again)
