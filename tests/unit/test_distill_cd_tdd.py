"""CD and TDD on an analytic Gaussian teacher that needs no training.

Toy: x0 = MU + A y + S e per pixel, y ~ N(0, VY) (conditional) or x0 ~ N(MU, S^2)
(unconditional). The toy is an `EDMDenoiser` whose raw network returns the exact F with
c_skip x + c_out F = E[x0 | x, y] (E[x0 | x] under the null condition), plus a small
FiLM-MLP correction whose last layer is zero: the teacher is exact, a student can learn.
"""
import pytest
import torch

from pipeline.distill import ConsistencyParams, TDDParams
from pipeline.models.students import Student
from pipeline.distill.cd import ConsistencyDistillation
from pipeline.distill.consistency import boundary_scalings, raw_output
from pipeline.distill.tdd import TargetDrivenDistillation, dynamic_threshold, equidistant_schedule
from pipeline.evaluation.noise import SeededNoise
from pipeline.samplers.nfe import CountingDenoiser
from pipeline.models.schedules import edm_precond
from pipeline.config.settings import DiffusionTeacherParams, TrainParams, UNetParams
from pipeline.models.teachers import DataShape, EDMDenoiser
from pipeline.training.loop import run_training
from tests.helpers import COND_A as A
from tests.helpers import COND_MU as MU
from tests.helpers import COND_S as S
from tests.helpers import COND_SCHEDULE as SCHEDULE
from tests.helpers import COND_SHAPE as SHAPE
from tests.helpers import col, perturb, unconditional_data
from tests.helpers import conditional_data as toy_data
from tests.helpers import conditional_teacher as toy_teacher


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: intra-op threads only contend (200 CD steps took 95 s with 2
    threads on a loaded 2-core host, 4 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def noise(n, seed=0):
    return SeededNoise([seed * 100_000 + i for i in range(n)], SHAPE)


MATCHED_TDD = dict(timesteps=100, ddim_steps=20, schedule_steps=(2, 4), nfe=[2, 4], p_uncond=0.0,
                   guidance=0.0, huber_c=0.001, distance="pseudo_huber_elementwise")
MATCHED_CD = dict(grid="vp", timesteps=100, grid_steps=20, solver="ddim", ema_mu=0.0,
                  distance="pseudo_huber_elementwise", huber_c=0.001, nfe=[1, 2])


# ---- the shared consistency function -----------------------------------------------------------

def test_consistency_function_is_the_identity_at_sigma_min():
    method = ConsistencyDistillation(ConsistencyParams(), toy_teacher(True))
    f = perturb(method.build()["student"])
    x, y = torch.randn(5, *SHAPE), torch.randn(5, *SHAPE)
    sigma = torch.full((5,), SCHEDULE.sigma_min)
    assert torch.allclose(f(x, sigma, y), x, atol=1e-6)
    big = torch.full((5,), 10.0)
    assert not torch.allclose(f(x, big, y), x, atol=1e-2)
    c_skip, c_out = boundary_scalings(big[:1], SCHEDULE.sigma_min, SCHEDULE.sigma_data)
    assert c_skip.item() == pytest.approx(0.25 / ((10 - 0.002) ** 2 + 0.25))
    assert c_out.item() == pytest.approx((10 - 0.002) * 0.5 / (100 + 0.25) ** 0.5)


# ---- TDD with target selection off is CD -------------------------------------------------------

def test_tdd_without_target_selection_computes_exactly_the_cd_loss():
    teacher = toy_teacher(True)
    cd = ConsistencyDistillation(ConsistencyParams(**MATCHED_CD), teacher)
    tdd_off = TargetDrivenDistillation(TDDParams(target_selection=False, **MATCHED_TDD), teacher)
    tdd_on = TargetDrivenDistillation(TDDParams(target_selection=True, **MATCHED_TDD), teacher)
    nets = {"student": perturb(cd.build()["student"])}
    assert set(cd.build()) == {"student"}  # ema_mu = 0: the online student is the target
    batch = toy_data(64)
    loss = lambda m: m.loss(nets, batch, torch.Generator().manual_seed(3))
    loss_cd, loss_off, loss_on = loss(cd), loss(tdd_off), loss(tdd_on)
    assert loss_cd.shape == (64,) and bool((loss_cd > 0).all())
    assert torch.equal(loss_cd, loss_off)
    assert not torch.allclose(loss_cd, loss_on, rtol=1e-3)
    # The gradients match too (same graph), and reach the student.
    grads = []
    for m in (cd, tdd_off):
        nets["student"].zero_grad()
        loss(m).mean().backward()
        grads.append(nets["student"].denoiser.net.last.weight.grad.clone())
    assert torch.equal(*grads) and grads[0].abs().sum() > 0


# ---- CD ---------------------------------------------------------------------------------------

def test_cd_ema_target_is_checkpointed_frozen_and_follows_the_student():
    method = ConsistencyDistillation(ConsistencyParams(ema_mu=0.5), toy_teacher(False))
    nets = method.build()
    assert set(nets) == {"student", "target"}
    assert not any(p.requires_grad for p in nets["target"].parameters())
    perturb(nets["student"])
    method.after_step(nets, 1)
    w_s, w_t = nets["student"].denoiser.net.last.weight, nets["target"].denoiser.net.last.weight
    assert torch.allclose(w_t, 0.5 * w_s)


@pytest.mark.parametrize("conditional", [False, True])
def test_cd_sample_makes_exactly_nfe_calls(conditional):
    method = ConsistencyDistillation(ConsistencyParams(nfe=[1, 2, 3, 8]), toy_teacher(conditional))
    student = method.build()["student"]
    y = toy_data(6)["y"] if conditional else None
    for nfe in method.nfe_choices():
        counted = CountingDenoiser(student)
        with torch.no_grad():
            x = method.sample(counted, y, noise(6), nfe)
        assert counted.calls == nfe and x.shape == (6, *SHAPE) and bool(x.isfinite().all())
    with pytest.raises(ValueError):
        method.sample(CountingDenoiser(student), y, noise(6), 5)
    assert method.sampling_sigmas(1) == [SCHEDULE.sigma_max]
    assert all(s > SCHEDULE.sigma_min for s in method.sampling_sigmas(8))


def moment_error(x):
    return abs(x.mean().item() - MU) + abs(x.std().item() - S)


def test_cd_trains_and_beats_the_teacher_at_one_and_two_steps():
    teacher = toy_teacher(False)
    params = ConsistencyParams(grid_steps=18, solver="heun", ema_mu=0.9, nfe=[1, 2])
    method = ConsistencyDistillation(params, teacher)
    train = TrainParams(steps=400, batch_size=256, lr=3e-3, warmup_steps=0, log_every=100,
                        checkpoint_every=400)
    state = run_training(method, unconditional_data(4096), train, seed=0)
    net = method.build()["student"]
    net.load_state_dict(state["nets"]["student"])
    student = Student(method, net.eval().requires_grad_(False))
    for nfe in (1, 2):
        x, used = student.sample("student", None, noise(2000, seed=7), nfe)
        teacher_err = min(moment_error(teacher.sample(s, None, noise(2000, seed=7), nfe)[0])
                          for s in ("ddim", "euler", "dpmpp_2m"))
        assert used == nfe
        assert teacher_err > 0.4  # the teacher's few-step samples collapse to the mean
        assert moment_error(x) < 0.1, (nfe, moment_error(x))


# ---- TDD --------------------------------------------------------------------------------------

def test_tdd_target_selection_lies_in_the_schedules_below_t_n():
    params = TDDParams(timesteps=1000, ddim_steps=50, schedule_steps=(4, 8), window=260, s_ratio=0.0)
    method = TargetDrivenDistillation(params, toy_teacher(True))
    union = {0} | {int(t) for k in range(4, 9) for t in equidistant_schedule(method.grid, k)}
    assert set(method.candidates.tolist()) == union and 999 in union
    assert set(equidistant_schedule(method.grid, 4).tolist()) <= set(method.grid.tolist())
    from pipeline.distill.tdd import select_targets
    g = torch.Generator().manual_seed(0)
    t_n = method.grid[torch.randint(0, 49, (4000,), generator=g)]
    s = select_targets(t_n, method.candidates, 260, 0.0, g)
    assert set(s.tolist()) <= union and bool((s <= t_n).all())
    below = sorted(union)

    def window(t):  # the candidates within 260 timesteps below tau, the largest one <= t
        tau = [c for c in below if c <= t][-1]
        return [c for c in below if tau - 260 <= c <= tau]

    for t, target in zip(t_n.tolist(), s.tolist()):
        assert target in window(t)
    top = method.grid[48]
    assert set(s[t_n == top].tolist()) == set(window(int(top))) and len(window(int(top))) > 1  # all of it used
    # With the stochastic offset: floor((1 - u s_ratio) c) for a window candidate c.
    s = select_targets(t_n, method.candidates, 260, 0.3, g)
    assert bool((s <= t_n).all()) and not set(s.tolist()) <= union
    for t, target in zip(t_n.tolist(), s.tolist()):
        assert any(int(0.7 * c) - 1 <= target <= c for c in window(t))


@pytest.mark.parametrize("schedule", [None, [99, 80, 50, 20]])
def test_tdd_gamma_sampling_makes_exactly_nfe_calls(schedule):
    nfe = [4] if schedule else [2, 4, 6]
    params = TDDParams(timesteps=100, ddim_steps=20, nfe=nfe, schedule=schedule, clip_x0_steps=1)
    method = TargetDrivenDistillation(params, toy_teacher(True))
    student = perturb(method.build()["student"])
    y = toy_data(6)["y"]
    for n in nfe:
        for guidance, calls in ((0.0, n), (1.5, 2 * n)):
            counted = CountingDenoiser(student)
            with torch.no_grad():
                x = method.sample(counted, y, noise(6), calls, guidance)
            assert counted.calls == calls and bool(x.isfinite().all())
    with pytest.raises(ValueError):
        method.check_sample_args(3, 1.5)  # guided nfe is 2N


def test_tdd_sampling_steps_follow_gamma_sampling():
    """Record the sigmas the student is called at: the schedule's times, in order."""
    params = TDDParams(timesteps=100, ddim_steps=20, nfe=[4], schedule=[99, 80, 50, 20], eta=0.2)
    method = TargetDrivenDistillation(params, toy_teacher(True))
    seen = []

    def student(x, sigma, y, keep=None):
        seen.append(sigma[0].item())
        return torch.zeros_like(x)
    x = method.sample(student, toy_data(3)["y"], noise(3), 4)
    assert seen == pytest.approx([method.timeline[t].item() for t in (99, 80, 50, 20)], rel=1e-6)
    assert torch.equal(x, torch.zeros_like(x))  # the last step lands on x0


def test_dynamic_threshold_bounds_x0():
    x0 = torch.linspace(-3, 3, 4 * 100).reshape(4, 1, 10, 10)
    clipped = dynamic_threshold(x0, 0.9)
    assert clipped.abs().max() <= 1 and not torch.equal(clipped, x0)
    small = 0.5 * torch.rand(2, 1, 4, 4)
    assert torch.equal(dynamic_threshold(small, 0.995), small)  # r = max(1, q) = 1


def test_tdd_guidance_changes_samples_only_with_condition_dropout():
    teacher, data = toy_teacher(True), toy_data(8)
    with_dropout = TargetDrivenDistillation(TDDParams(**{**MATCHED_TDD, "p_uncond": 0.2}), teacher)
    without = TargetDrivenDistillation(TDDParams(**MATCHED_TDD), teacher)
    student = Student(with_dropout, with_dropout.build()["student"].eval())
    plain, _ = student.sample("student", data["y"], noise(8), 4)
    guided, used = student.sample("student", data["y"], noise(8), 8, guidance=2.0)
    assert used == 8 and (guided - plain).abs().max() > 1e-2
    frozen = Student(without, without.build()["student"].eval())
    frozen.sample("student", data["y"], noise(8), 4)
    with pytest.raises(ValueError, match="p_uncond"):
        frozen.sample("student", data["y"], noise(8), 8, guidance=2.0)


def test_tdd_condition_dropout_and_teacher_guidance_enter_the_loss():
    teacher, batch = toy_teacher(True), toy_data(64)
    nets = {"student": perturb(TargetDrivenDistillation(TDDParams(**MATCHED_TDD), teacher).build()["student"])}
    loss = lambda **kw: TargetDrivenDistillation(TDDParams(**{**MATCHED_TDD, **kw}), teacher).loss(
        nets, batch, torch.Generator().manual_seed(5))
    base = loss()
    assert not torch.allclose(base, loss(p_uncond=0.5))
    assert not torch.allclose(base, loss(guidance=3.0))


def test_tdd_trains_on_the_conditional_toy():
    """4-step TDD beats the 4-NFE DDIM it distils (and its own initialisation)."""
    teacher, data = toy_teacher(True), toy_data(2000, seed=9)
    params = TDDParams(timesteps=200, ddim_steps=40, nfe=[4], p_uncond=0.2, huber_c=0.001)
    method = TargetDrivenDistillation(params, teacher)
    train = TrainParams(steps=300, batch_size=256, lr=3e-3, warmup_steps=0, log_every=100,
                        checkpoint_every=300)
    state = run_training(method, toy_data(4096), train, seed=0)
    residual_error = lambda x: moment_error(x - A * data["y"])  # x0 - A y ~ N(MU, S^2)
    net = method.build()["student"]
    init = Student(method, net.eval())
    init_err = residual_error(init.sample("student", data["y"], noise(2000, seed=9), 4)[0])
    net.load_state_dict(state["nets"]["student"])
    trained_err = residual_error(init.sample("student", data["y"], noise(2000, seed=9), 4)[0])
    ddim_err = residual_error(teacher.sample("ddim", data["y"], noise(2000, seed=9), 4)[0])
    assert trained_err < 0.6 * ddim_err and trained_err < 0.7 * init_err, (trained_err, ddim_err, init_err)


@pytest.mark.parametrize("conditional,classes", [(False, 0), (True, 0), (False, 3)])
def test_raw_output_feeds_the_real_edm_denoiser_as_its_forward_does(conditional, classes):
    shape = DataShape(channels=1, image_size=4, conditional=conditional, classes=classes)
    params = DiffusionTeacherParams(net=UNetParams(channels=(8,), emb_dim=16))
    torch.manual_seed(0)
    denoiser = EDMDenoiser(params, shape)
    torch.nn.init.normal_(denoiser.net.head[-1].weight)  # an output that depends on the condition
    x, sigma = torch.randn(3, 1, 4, 4), torch.tensor([0.01, 1.0, 50.0])
    y = torch.tensor([0, 2, 1]) if classes else torch.randn(3, 1, 4, 4)
    keep = torch.tensor([True, False, True])
    c_skip, c_out, _, _ = edm_precond(sigma, denoiser.sigma_data)
    for y_, keep_ in ((y, keep), (None, None)):
        rebuilt = col(c_skip) * x + col(c_out) * raw_output(denoiser, x, sigma, y_, keep_)
        assert torch.allclose(rebuilt, denoiser(x, sigma, y_, keep_), atol=1e-5)
