"""IBMD on an analytic Gaussian toy: a bridge teacher that needs no training.

Data: per pixel, x0 ~ N(M, V) and y = x0 + N(0, NOISE), so (x0, y) is jointly
Gaussian and p(x0 | y) = N(M + R (y - M), POST_VAR), R = V/(V + NOISE),
POST_VAR = V NOISE/(V + NOISE). For the bridge x_t = a y + b x0 + c eps both
posterior means the teacher needs are linear in the inputs:
- DDBM (sees y):   E[x0 | x_t, y] = mu + vp b/(b^2 vp + c^2) (x_t - a y - b mu),
                   mu, vp the mean and variance of x0 | y;
- I2SB (never y):  E[x0 | x_t] = m_x + (a C + b Vx)/Var(x_t) (x_t - a m_y - b m_x).
`GaussianBridgeDenoiser` computes these for a joint Gaussian (m_x, m_y, Vx, Vy, C)
whose five numbers are its trainable parameters, started at the truth (so the
teacher is exact); `widen_input` adds a zero-initialised linear map of the noise
channels. The family is closed under what IBMD needs: a one-step student
x0 = mu(y) + w z is again a joint Gaussian, so phi can represent its bridge exactly
and the optimum (w^2 = POST_VAR) is reachable.
"""
import math

import pytest
import torch

from pipeline.distill import METHODS, IBMDParams
from pipeline.distill.ibmd import IBMD
from pipeline.evaluation.noise import SeededNoise
from pipeline.samplers.nfe import CountingDenoiser
from pipeline.config.settings import TrainParams
from pipeline.training.loop import LoopHooks, run_training
from tests.helpers import BRIDGE_M as M
from tests.helpers import BRIDGE_POST_VAR as POST_VAR
from tests.helpers import BRIDGE_R as R
from tests.helpers import bridge_teacher as toy_teacher
from tests.helpers import bridge_y as toy_y


@pytest.fixture(autouse=True)
def _few_threads():
    """One intra-op thread (overrides conftest's 2): on these 2x2 images extra threads only
    spin, which made training ~20x slower on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def ibmd(style="ddbm", **overrides):
    params = IBMDParams(**{"train": TrainParams(steps=300, batch_size=256, lr=3e-3, warmup_steps=0,
                                                 log_every=50), **overrides})
    return IBMD(params, toy_teacher(style))


def train(method, seed=0):
    """(trained student G, loop history) after training on y only."""
    hooks = LoopHooks()
    state = run_training(method, {"y": toy_y()}, method.params.train, seed=seed, hooks=hooks)
    student = method.build()["student"]
    student.load_state_dict(state["nets"]["student"])
    return student.eval().requires_grad_(False), hooks.history


def z_moments(method, student, y, draws=4000):
    """Mean and variance over z of the student's samples for each fixed y: (B, 1, 2, 2) each."""
    noise = SeededNoise(range(draws * len(y)), y.shape[1:])
    ys = y.repeat(draws, 1, 1, 1)
    with torch.no_grad():
        x0 = method.sample(student, ys, noise, method.params.nfe).reshape(draws, *y.shape)
    return x0.mean(0), x0.var(0)


def test_registered_and_trains_on_y_only():
    assert METHODS["ibmd"].load() is IBMD and IBMD.data_keys == ("y",)
    method = ibmd()
    method.to("cpu")
    nets = method.build()
    loss = method.loss(nets, {"y": toy_y(8)}, torch.Generator().manual_seed(0))
    assert loss.shape == (8,) and torch.isfinite(loss).all()


def test_loss_gradients_reach_only_the_student():
    method = ibmd()
    nets = method.build()
    nets["student"].z_weight.data.fill_(0.3)
    method.loss(nets, {"y": toy_y(16)}, torch.Generator().manual_seed(1)).mean().backward()
    assert all(p.grad is not None for p in nets["student"].parameters())
    assert all(p.grad is None for p in nets["aux"].parameters())
    assert all(p.grad is None for p in method.teacher.denoiser.parameters())


@pytest.mark.parametrize("nfe", [1, 2, 3])
def test_sample_calls_the_student_exactly_nfe_times(nfe):
    method = ibmd(nfe=nfe)
    student = CountingDenoiser(method.build()["student"])
    y = toy_y(4)
    x0 = method.sample(student, y, SeededNoise(range(4), y.shape[1:]), nfe)
    assert student.calls == nfe and x0.shape == y.shape and torch.isfinite(x0).all()
    with pytest.raises(ValueError):
        method.sample(student, y, SeededNoise(range(4), y.shape[1:]), nfe + 1)


@pytest.mark.parametrize("style", ["ddbm", "i2sb"])
def test_one_step_student_matches_the_true_posterior(style):
    # The posterior is N(M + R (y - M), POST_VAR) for every y. Tolerances: 4000 draws
    # give the variance to ~2% (1 sd); the rest is training noise at lr 3e-3. The
    # untrained student (the teacher's posterior mean) has variance 0.
    method = ibmd(style)
    student, history = train(method)
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["aux_loss"]) for h in history)
    y = torch.tensor([-0.8, 0.0, 0.4, 1.2]).reshape(4, 1, 1, 1).expand(4, 1, 2, 2).contiguous()
    mean, var = z_moments(method, student, y)
    assert torch.allclose(mean, M + R * (y - M), atol=0.1 * math.sqrt(POST_VAR))
    assert torch.allclose(var, torch.full_like(var, POST_VAR), rtol=0.15)


def test_without_the_aux_term_the_generator_collapses():
    # Start G at the true posterior (w^2 = POST_VAR), not at w = 0 where no gradient on w
    # could show a collapse: without -phi the teacher term alone pulls every z to one point.
    method = ibmd(aux_term=False)
    build = method.build

    def build_diverse():
        nets = build()
        nets["student"].z_weight.data.fill_(math.sqrt(POST_VAR))
        return nets

    method.build = build_diverse
    _, var_start = z_moments(method, method.build()["student"], toy_y(4), draws=1000)
    student, _ = train(method)
    _, var = z_moments(method, student, toy_y(4), draws=1000)
    assert var_start.min() > 0.8 * POST_VAR
    assert var.max() < 0.1 * POST_VAR


@pytest.mark.parametrize("style", ["ddbm", "i2sb"])
@pytest.mark.parametrize("multistep_x0,through", [("stopped", False), ("chain", True)])
def test_multistep_student_trains(style, multistep_x0, through):
    method = ibmd(style, nfe=2, multistep_x0=multistep_x0, grad_through_chain=through,
                  train=TrainParams(steps=20, batch_size=64, lr=3e-3, warmup_steps=0, log_every=10))
    student, history = train(method)
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["aux_loss"]) for h in history)
    assert student.z_weight.abs().sum() > 0  # the noise input was trained
    counted = CountingDenoiser(student)
    y = toy_y(4)
    x0 = method.sample(counted, y, SeededNoise(range(4), y.shape[1:]), 2)
    assert counted.calls == 2 and torch.isfinite(x0).all()
