"""Moment Matching (Salimans et al. 2024) and progressive distillation (Salimans & Ho 2022)
on a teacher that needs no training: per-pixel Gaussian data x0 ~ N(MEAN, VAR) whose EDM
denoiser is exact, E[x0 | x] = MEAN + VAR/(VAR + sigma^2) (x - MEAN), plus a zero-initialised
trainable correction so that a student copy can learn. The few-step DDPM/DDIM samplers of
this exact teacher are biased (their variance collapses), while the data moments are known.
"""
import copy

import torch

from pipeline.distill import MMParams, PDParams
from pipeline.models.students import Student
from pipeline.distill.mm import MomentMatching
from pipeline.distill.pd import ProgressiveDistillation
from pipeline.evaluation.noise import SeededNoise
from pipeline.samplers.nfe import CountingDenoiser
from pipeline.config.settings import TrainParams
from pipeline.training.loop import LoopHooks, run_training
from tests.helpers import GAUSS_MEAN as MEAN
from tests.helpers import GAUSS_VAR as VAR
from tests.helpers import gaussian_data as toy_data
from tests.helpers import gaussian_teacher as toy_teacher


def train_params(steps, lr, **kw):
    return TrainParams(**{**dict(steps=steps, batch_size=256, lr=lr, warmup_steps=0, adam_betas=(0.0, 0.99),
                                 ema_decay=0.0, log_every=50, checkpoint_every=10**6), **kw})


def trained_student(method, state):
    net = method.build()["student"]
    net.load_state_dict(state["nets"]["student"])
    return net.eval().requires_grad_(False)


def noise(n=2000, seed0=0):
    return SeededNoise(range(seed0, seed0 + n), (1, 2, 2))


# --- Moment Matching --------------------------------------------------------------------------

def test_mm_one_step_student_matches_data_moments_where_teacher_collapses():
    torch.set_num_threads(1)   # tiny nets: threads only add contention on a shared machine
    teacher = toy_teacher()
    method = MomentMatching(MMParams(step_input=False, nfe=[1]), teacher)
    state = run_training(method, toy_data(), train_params(600, 1e-2), seed=0)
    student = trained_student(method, state)
    with torch.no_grad():
        x_student = method.sample(student, None, noise(), 1)
    x_teacher, _ = teacher.sample("ddpm", None, noise(), 1)
    # 8000 pixel draws: the sample mean's s.e. is ~0.006, the variance's ~0.004. After 600
    # steps the student has not converged: over init seeds 0-3 its mean was 0.02-0.046 low
    # and its variance 0.16-0.20 (it keeps rising with more steps), so both bands are wide;
    # the 1-step teacher's variance is ~1e-5 (every sample is the posterior mean).
    assert abs(x_student.mean().item() - MEAN) < 0.07
    assert 0.12 < x_student.var().item() < 0.35
    assert abs(x_teacher.var().item() - VAR) > 0.2


def test_mm_loss_gradients_reach_only_the_student():
    method = MomentMatching(MMParams(step_input=False, nfe=[2, 4]), toy_teacher())
    nets = method.build()
    with torch.no_grad():   # make aux differ from the teacher, or the direction is 0
        nets["aux"].head[-1].bias.fill_(0.1)
    batch = {k: v[:32] for k, v in toy_data().items()}
    loss = method.loss(nets, batch, torch.Generator().manual_seed(0))
    assert loss.shape == (32,) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert all(p.grad is None for p in nets["aux"].parameters())
    assert all(p.grad is None for p in method.teacher.denoiser.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in nets["student"].parameters())


def test_mm_parameter_variant_trains_with_finite_loss_and_gradients():
    torch.set_num_threads(1)
    method = MomentMatching(MMParams(step_input=False, nfe=[1], variant="parameter"), toy_teacher())
    nets = method.build()
    assert set(nets) == {"student"}
    # Move the student off the teacher so that the teacher's gradient on its samples is non-zero.
    with torch.no_grad():
        nets["student"].denoiser.head[-1].bias.fill_(0.2)
    batch = {k: v[:64] for k, v in toy_data().items()}
    loss = method.loss(nets, batch, torch.Generator().manual_seed(0))
    assert loss.shape == (32,) and torch.isfinite(loss).all()
    loss.mean().backward()
    grads = [p.grad for p in nets["student"].parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in method.teacher.denoiser.parameters())
    hooks = LoopHooks()
    state = run_training(method, toy_data(), train_params(20, 1e-3, log_every=10), seed=0, hooks=hooks)
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in hooks.history)
    assert all(torch.isfinite(v).all() for v in state["nets"]["student"].values())


def test_mm_and_pd_sample_with_exactly_nfe_calls():
    teacher = toy_teacher()
    mm = MomentMatching(MMParams(step_input=False, nfe=[1, 2, 4]), teacher)
    pd = ProgressiveDistillation(PDParams(start_steps=8, rounds=2), teacher)
    for method in (mm, pd):
        net = method.build()["student"]
        for nfe in method.nfe_choices():
            counted = CountingDenoiser(net)
            with torch.no_grad():
                x = method.sample(counted, None, noise(4), nfe)
            assert counted.calls == nfe and x.shape == (4, 1, 2, 2) and torch.isfinite(x).all()
            assert Student(method, net).sample("student", None, noise(4), nfe)[1] == nfe
    assert pd.nfe_choices() == [2]


def test_mm_sampler_is_stochastic_given_the_start():
    """The posterior steps add noise: two seeds sharing nothing but the method differ, and one
    seed is reproducible (all randomness from SeededNoise)."""
    method = MomentMatching(MMParams(step_input=False, nfe=[4]), toy_teacher())
    net = method.build()["student"]
    with torch.no_grad():
        a, b = (method.sample(net, None, noise(8), 4) for _ in range(2))
    assert torch.equal(a, b)
    assert a.var().item() > 0


# --- Progressive distillation ------------------------------------------------------------------

def test_pd_one_round_two_step_student_matches_four_step_teacher():
    torch.set_num_threads(1)
    teacher = toy_teacher()
    method = ProgressiveDistillation(PDParams(start_steps=4, rounds=1, train=train_params(300, 1e-2)), teacher)
    state = run_training(method, toy_data(), method.params.train, seed=0)
    student = trained_student(method, state)
    # Round 0 distils the teacher's DDIM on its start_steps grid `vp_sigmas(4)`: the "edm" grid.
    x_teacher4, _ = teacher.sample("ddim", None, noise(500), 4, grid="edm")
    x_teacher2, _ = teacher.sample("ddim", None, noise(500), 2, grid="edm")
    with torch.no_grad():
        x_student = method.sample(student, None, noise(500), 2)
    # Same starting noise, deterministic samplers: the 2-step student lands on the 4-step
    # teacher's samples (RMS gap well under the teacher's own 2-vs-4-step gap).
    gap_student = (x_student - x_teacher4).square().mean().sqrt().item()
    gap_teacher = (x_teacher2 - x_teacher4).square().mean().sqrt().item()
    assert gap_teacher > 0.05
    assert gap_student < 0.2 * gap_teacher


def _pd(steps=40):
    return ProgressiveDistillation(PDParams(start_steps=8, rounds=2, train=train_params(steps, 1e-2)),
                                   toy_teacher())


def test_pd_round_bookkeeping_survives_resume():
    torch.set_num_threads(1)
    data, states = toy_data(256), {}

    def keep(metrics, state):
        if state is not None:
            states[state["step"]] = copy.deepcopy(state)   # state_dict tensors are live

    params = train_params(40, 1e-2, batch_size=16, log_every=10, checkpoint_every=10)
    full = run_training(_pd(), data, params, seed=0, hooks=LoopHooks(report=keep))
    assert int(states[10]["nets"]["target"]["pd_round"]) == 0
    assert int(full["nets"]["target"]["pd_round"]) == 1
    # The round-1 target is the student at step 20, not the teacher.
    head = "head.2.bias"
    assert torch.equal(full["nets"]["target"][head], states[20]["nets"]["student"][head])
    assert full["nets"]["target"][head].abs().sum() > 0
    # Resumed after the round switch: the target (and round) equal the uninterrupted run's.
    resumed = run_training(_pd(), data, params, seed=0, hooks=LoopHooks(resume=states[30]))
    assert int(resumed["nets"]["target"]["pd_round"]) == 1
    for k, v in full["nets"]["target"].items():
        assert torch.equal(resumed["nets"]["target"][k], v), k
    # Resumed before it: the switch still happens once, at step 20 of the resumed run.
    mid = {}
    early = run_training(_pd(), data, params, seed=0, hooks=LoopHooks(
        resume=states[10], report=lambda m, s: s is not None and mid.setdefault(s["step"], copy.deepcopy(s))))
    assert int(early["nets"]["target"]["pd_round"]) == 1
    assert torch.equal(early["nets"]["target"][head], mid[20]["nets"]["student"][head])
