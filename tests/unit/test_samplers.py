"""Samplers: exact NFE, batch independence, correctness on analytic Gaussian toys."""
import pytest
import torch

from pipeline.models.bridge import BridgeSchedule
from pipeline.evaluation.noise import SeededNoise
from pipeline.samplers import BRIDGE_SAMPLERS, DIFFUSION_SAMPLERS, SAMPLERS, Sampler, sample, steps_for_nfe
from pipeline.samplers.diffusion import guided
from pipeline.samplers.nfe import CountingDenoiser
from pipeline.models.schedules import EDMSchedule
from tests.helpers import exact_bridge_denoiser as bridge_denoiser
from tests.helpers import exact_gaussian_denoiser as gaussian_denoiser

F64 = torch.float64
SHAPE = (1, 2, 2)
EDM = EDMSchedule()
ODE_DIFFUSION = ["ddim", "euler", "heun", "dpmpp_2m"]


def noise(seeds, dtype=torch.float32):
    return SeededNoise(seeds, SHAPE, dtype=dtype)


M_OF_Y = lambda y: 0.6 * y + 0.1
Y_PIXELS = torch.tensor([-0.8, -0.2, 0.3, 0.9], dtype=F64).view(1, *SHAPE)


def schedule_for(sampler, kind="i2sb"):
    return EDM if sampler.family == "diffusion" else BridgeSchedule(kind=kind)


def toy_for(sampler, kind="i2sb"):
    if sampler.family == "diffusion":
        return gaussian_denoiser(0.2, 0.5)
    return bridge_denoiser(BridgeSchedule(kind=kind), M_OF_Y, 0.05)


def test_registry_shape():
    assert set(DIFFUSION_SAMPLERS) == {"ddim", "ddpm", "euler", "heun", "dpmpp_2m"}
    assert set(BRIDGE_SAMPLERS) == {"posterior", "posterior_ode", "euler", "heun"}
    assert len(SAMPLERS) == 9 and SAMPLERS["bridge/heun"] is BRIDGE_SAMPLERS["heun"]
    for key, s in SAMPLERS.items():
        assert key == f"{s.family}/{s.name}"
        with pytest.raises(Exception):
            s.name = "other"                               # frozen


def test_cost_formulas():
    d, b = DIFFUSION_SAMPLERS, BRIDGE_SAMPLERS
    for name in ["ddim", "ddpm", "euler", "dpmpp_2m"]:
        assert d[name].nfe_of_steps(7, 0.0) == 7 and d[name].nfe_of_steps(7, 1.5) == 14
    assert d["heun"].nfe_of_steps(7, 0.0) == 13 and d["heun"].nfe_of_steps(7, 1.5) == 26
    for name in ["posterior", "posterior_ode", "euler"]:
        assert b[name].nfe_of_steps(7, 0.0) == 7
    assert b["heun"].nfe_of_steps(1, 0.0) == 1 and b["heun"].nfe_of_steps(7, 0.0) == 13
    with pytest.raises(ValueError):
        b["euler"].nfe_of_steps(3, 1.5)


def test_steps_for_nfe():
    d = DIFFUSION_SAMPLERS
    assert steps_for_nfe(d["heun"], 1) == 1 and steps_for_nfe(d["heun"], 2) == 1
    assert steps_for_nfe(d["heun"], 35) == 18                       # EDM's 35-NFE setting
    assert steps_for_nfe(d["euler"], 1, guidance=1.5) is None
    assert steps_for_nfe(d["heun"], 5, guidance=1.5) == 1           # 2 NFE; 2 steps would be 6
    assert steps_for_nfe("bridge/heun", 4) == 2
    with pytest.raises(KeyError):
        steps_for_nfe("heun", 4)                                     # ambiguous: name the family


CASES = [(s, 0.0) for s in SAMPLERS.values()] + [(s, 1.5) for s in DIFFUSION_SAMPLERS.values()]


@pytest.mark.parametrize("sampler,guidance", CASES, ids=lambda v: getattr(v, "key", str(v)))
def test_sample_uses_exactly_the_largest_affordable_nfe(sampler, guidance):
    seeds = [0, 1]
    y = torch.zeros(2, *SHAPE) if sampler.family == "diffusion" else Y_PIXELS.float().expand(2, *SHAPE)
    denoise = toy_for(sampler) if sampler.family == "diffusion" else (lambda x, t, y: 0.5 * (x + y))
    for nfe in range(1, 65):
        affordable = [c for n in range(1, nfe + 1) if (c := sampler.nfe_of_steps(n, guidance)) <= nfe]
        if not affordable:
            with pytest.raises(ValueError):
                sample(sampler, denoise, y, noise(seeds), nfe, schedule_for(sampler), guidance)
            continue
        counted = CountingDenoiser(denoise)
        x, used = sample(sampler, counted, y, noise(seeds), nfe, schedule_for(sampler), guidance)
        assert used == counted.calls == max(affordable)
        assert x.shape == (2, *SHAPE) and torch.isfinite(x).all()


def test_sample_asserts_the_counted_nfe():
    honest = DIFFUSION_SAMPLERS["euler"]
    liar = Sampler("liar", "diffusion", honest.run, lambda steps, guidance: steps + 1)
    with pytest.raises(RuntimeError):
        sample(liar, gaussian_denoiser(0.0, 0.5), None, noise([0]), 8, EDM)


@pytest.mark.parametrize("sampler", SAMPLERS.values(), ids=lambda s: s.key)
def test_samples_do_not_depend_on_the_batch(sampler):
    seeds = list(range(6))
    guidance = 1.5 if sampler.family == "diffusion" else 0.0
    if sampler.family == "diffusion":
        y = torch.linspace(-0.5, 0.5, 6).view(6, 1, 1, 1).expand(6, *SHAPE)
    else:
        y = (Y_PIXELS.float() + torch.linspace(-0.3, 0.3, 6).view(6, 1, 1, 1))
    run = lambda idx: sample(sampler, toy_for(sampler), y[idx], noise([seeds[i] for i in idx]),
                             9, schedule_for(sampler), guidance)[0]
    together = run([0, 1, 2, 3, 4, 5])
    apart = torch.cat([run([0, 1]), run([2, 3, 4, 5])])
    assert torch.equal(together, apart)
    assert not torch.equal(together[0], together[1])                    # seeds differ


def test_guidance_formula():
    cond = lambda x, sigma, y: torch.ones_like(x)
    calls = CountingDenoiser(lambda x, sigma, y: cond(x, sigma, y) if y is not None else torch.zeros_like(x))
    x = torch.zeros(3, *SHAPE)
    assert torch.equal(guided(calls, x, 1.0, torch.ones(3, *SHAPE), 0.0), torch.ones_like(x))
    assert calls.calls == 1
    assert torch.allclose(guided(calls, x, 1.0, torch.ones(3, *SHAPE), 1.5), 2.5 * torch.ones_like(x))
    assert calls.calls == 3


# ---- correctness on the analytic diffusion toy ------------------------------------------------

MU, S = 0.3, 0.5
N_TOY = 2000


def exact_ode_map(z):
    """PF-ODE of N(MU, S^2): (x_sigma - MU)/sqrt(S^2 + sigma^2) is conserved, from x = sigma_max z."""
    smax = EDM.sigma_max
    return MU + S * (smax * z - MU) / (S ** 2 + smax ** 2) ** 0.5


# At 64 NFE the first-order samplers are visibly biased (Euler's std is 0.478 analytically for
# S = 0.5 on the 64-step Karras grid), the second-order ones are not.
TOLERANCE = {"ddim": 0.08, "ddpm": 0.1, "euler": 0.08, "heun": 0.03, "dpmpp_2m": 0.03}


@pytest.mark.parametrize("name", DIFFUSION_SAMPLERS)
def test_diffusion_samplers_reproduce_the_gaussian(name):
    seeds = list(range(N_TOY))
    x, used = sample(DIFFUSION_SAMPLERS[name], gaussian_denoiser(MU, S), None, noise(seeds, F64), 64, EDM)
    assert used <= 64
    assert x.mean().item() == pytest.approx(MU, abs=0.03)
    assert x.std().item() == pytest.approx(S, rel=TOLERANCE[name])


def test_diffusion_ode_samplers_converge_to_the_exact_flow():
    seeds = list(range(200))
    exact = exact_ode_map(noise(seeds, F64).randn())
    err = {}
    for name in ODE_DIFFUSION:
        for steps in (8, 16, 32):
            x = DIFFUSION_SAMPLERS[name].run(gaussian_denoiser(MU, S), None, noise(seeds, F64), steps, EDM)
            err[name, steps] = (x - exact).abs().max().item()
    for name in ("ddim", "euler"):              # first order: doubling the steps halves the error
        assert 1.7 < err[name, 16] / err[name, 32] < 2.3, err
    for name in ("heun", "dpmpp_2m"):           # second order: it quarters it
        assert err[name, 16] / err[name, 32] > 3.5 and err[name, 32] < 0.03, err
        assert err[name, 16] < err["euler", 16] and err[name, 32] < err["euler", 32], err


# ---- correctness on the analytic bridge toy ---------------------------------------------------

def bridge_toy(kind, n, dtype=F64):
    s = BridgeSchedule(kind=kind)
    y = Y_PIXELS.to(dtype).expand(n, *SHAPE)
    return s, bridge_denoiser(s, M_OF_Y, 0.05), y


@pytest.mark.parametrize("kind", ["i2sb", "vp"])
def test_bridge_posterior_sampler_reproduces_p_x0_given_y(kind):
    s, denoise, y = bridge_toy(kind, 1000)
    stds = []
    for nfe in (8, 32, 128):
        x, _ = sample(BRIDGE_SAMPLERS["posterior"], denoise, y, noise(range(1000), F64), nfe, s)
        stds.append(x.std(0).mean().item())
        assert torch.allclose(x.mean(0), M_OF_Y(y[0]), atol=0.025)
    assert stds[0] < stds[1] < stds[2]                       # converges from below as steps grow
    assert stds[2] == pytest.approx(0.05 ** 0.5, rel=0.07)    # 128 NFE: 0.97 (i2sb), 0.96 (vp)


@pytest.mark.parametrize("kind", ["i2sb", "vp"])
def test_bridge_posterior_ode_returns_the_conditional_mean(kind):
    s, denoise, y = bridge_toy(kind, 8)
    x, _ = sample(BRIDGE_SAMPLERS["posterior_ode"], denoise, y, noise(range(8), F64), 10, s)
    assert torch.allclose(x, M_OF_Y(y), atol=1e-9)            # no noise: deterministic given y


@pytest.mark.parametrize("kind", ["i2sb", "vp"])
def test_bridge_ode_samplers_converge_to_the_exact_flow(kind):
    # The bridge ODE from u_T = eps maps eps to m(y) + sqrt(v) eps exactly for this toy.
    n = 200
    s, denoise, y = bridge_toy(kind, n)
    exact = M_OF_Y(y) + 0.05 ** 0.5 * noise(range(n), F64).randn()
    err = {}
    for name in ("euler", "heun"):
        for steps in (4, 8, 16, 32):
            x = BRIDGE_SAMPLERS[name].run(denoise, y, noise(range(n), F64), steps, s)
            err[name, steps] = (x - exact).abs().max().item()
    for name in ("euler", "heun"):
        assert err[name, 32] < err[name, 16] < err[name, 8] < err[name, 4], err
    for steps in (8, 16, 32):
        assert err["heun", steps] < err["euler", steps], err
    assert err["heun", 32] < 0.01 and err["euler", 32] < 0.05, err


@pytest.mark.parametrize("name", ["euler", "heun"])
def test_bridge_ode_samplers_reproduce_p_x0_given_y(name):
    s, denoise, y = bridge_toy("vp", 1000)
    x, _ = sample(BRIDGE_SAMPLERS[name], denoise, y, noise(range(1000), F64), 64, s)
    assert torch.allclose(x.mean(0), M_OF_Y(y[0]), atol=0.025)
    assert x.std(0).mean().item() == pytest.approx(0.05 ** 0.5, rel=0.06)    # euler 0.965, heun 0.983


def test_bridge_samplers_reject_guidance():
    s, denoise, y = bridge_toy("i2sb", 2)
    with pytest.raises(ValueError):
        sample(BRIDGE_SAMPLERS["euler"], denoise, y, noise(range(2), F64), 4, s, guidance=1.0)
