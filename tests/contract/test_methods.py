"""The contract every distillation method in the registry keeps: picked up automatically
for a new method. Teachers are tiny real networks with random weights: the contract is
about plumbing (shapes, gradients, NFE), not quality. A throw-away method
(tests/helpers.py), registered with one registry line, is held to the same contract."""
import pytest
import torch

from pipeline.models.checkpoint import save_checkpoint
from pipeline.distill import METHODS, make_method
from pipeline.distill.base import student_config, unwrap
from pipeline.models.loading import build_teacher, load_student
from pipeline.models.students import Student
from pipeline.evaluation.noise import SeededNoise
from pipeline.samplers.nfe import CountingDenoiser
from pipeline.config.settings import BridgeTeacherParams, DiffusionTeacherParams, TrainParams, UNetParams
from pipeline.models.teachers import DataShape, teacher_config
from pipeline.training.loop import run_training
from tests.helpers import THROWAWAY

SHAPE = DataShape(channels=1, image_size=8, conditional=True)
NET = UNetParams(patch=2, channels=(16, 16), emb_dim=32)
TRAIN = TrainParams(steps=4, batch_size=6, lr=1e-3, warmup_steps=0, log_every=2, checkpoint_every=4)
# Every registered method, a bridge's students on every bridge style they distil, and the throw-away.
CASES = [(name, style) for name, entry in METHODS.items()
         for style in (entry.bridge_styles if entry.teacher == "bridge" else ("i2sb",))] + [("throwaway", "i2sb")]


def tiny_teacher(name, style):
    params = (BridgeTeacherParams(style=style, net=NET) if name == "bridge"
              else DiffusionTeacherParams(net=NET))
    teacher = build_teacher(teacher_config(name, params, SHAPE))
    torch.manual_seed(0)
    with torch.no_grad():  # the UNet head starts at zero; make the network do something
        for p in teacher.denoiser.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return teacher


def method_for(name, style, **train):
    entry = METHODS[name]
    params = entry.params().model_copy(update={"train": TRAIN.model_copy(update=train)})
    return make_method(name, params, tiny_teacher(entry.teacher, style))


def batch(method, n=6):
    g = torch.Generator().manual_seed(1)
    full = {"x0": torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, "y": torch.rand(n, 1, 8, 8, generator=g) * 2 - 1}
    return {k: full[k] for k in method.data_keys}


@pytest.fixture(params=CASES, ids=[f"{n}-{s}" if [c[0] for c in CASES].count(n) > 1 else n for n, s in CASES])
def method(request, monkeypatch):
    name, style = request.param
    if name == "throwaway":  # one registry line, as a new method would add it
        monkeypatch.setitem(METHODS, "throwaway", THROWAWAY)
    return method_for(name, style)


def test_loss_is_finite_and_per_sample(method):
    nets = method.build()
    loss = method.loss(nets, batch(method), torch.Generator().manual_seed(0))
    assert loss.shape == (6,) and torch.isfinite(loss).all()


def test_gradients_reach_only_the_student(method):
    nets = method.build()
    # One training step first: where an auxiliary network starts as the teacher (MM), the
    # student's signal is exactly zero until the auxiliary network has moved.
    method.train_step(nets, method.optimizers(nets, method.params.train), batch(method),
                      torch.Generator().manual_seed(1), method.params.train)
    for net in nets.values():
        net.zero_grad(set_to_none=True)
    method.loss(nets, batch(method), torch.Generator().manual_seed(0)).sum().backward()
    student_grads = [p.grad for p in nets["student"].parameters()]
    assert all(g is not None for g in student_grads) and any(g.abs().sum() > 0 for g in student_grads)
    assert all(p.grad is None for p in method.teacher.denoiser.parameters())
    for key, net in nets.items():
        if key != "student":
            assert all(p.grad is None for p in net.parameters()), f"{key} received a gradient"


def test_a_training_step_moves_the_student_and_not_the_teacher(method):
    teacher_before = {k: v.clone() for k, v in method.teacher.denoiser.state_dict().items()}
    nets = method.build()
    student_before = {k: v.clone() for k, v in nets["student"].state_dict().items()}
    optimizers = method.optimizers(nets, method.params.train)
    for step in (1, 2):  # two: MM's student only moves once its auxiliary network has
        metrics = method.train_step(nets, optimizers, batch(method), torch.Generator().manual_seed(step),
                                    method.params.train)
        method.after_step(nets, step)
        # Detached 0-d tensors: the loop reads them only when it reports (no per-step sync).
        assert all(torch.is_tensor(v) and v.dim() == 0 and not v.requires_grad for v in metrics.values())
    for k, v in method.teacher.denoiser.state_dict().items():
        assert torch.equal(v, teacher_before[k]), f"teacher tensor {k} changed"
    assert any(not torch.equal(v, student_before[k]) for k, v in nets["student"].state_dict().items())


def test_sample_calls_the_network_exactly_nfe_times(method):
    student = unwrap(method.build()["student"]).eval()
    y = torch.rand(3, 1, 8, 8) * 2 - 1
    for nfe in method.nfe_choices():
        counted = CountingDenoiser(student)
        noise = SeededNoise([0, 1, 2], y.shape[1:])
        with torch.no_grad():
            x = method.sample(counted, y, noise, nfe)
        assert counted.calls == nfe and x.shape == y.shape and torch.isfinite(x).all()


def test_student_checkpoint_is_self_describing(method, tmp_path):
    state = run_training(method, batch(method), method.params.train, seed=0)
    path = tmp_path / "student.pt"
    save_checkpoint(path, f"student_{method.name}", student_config(method), {"student": state["ema"]["student"]})
    loaded = load_student(path)
    assert isinstance(loaded, Student) and loaded.name == method.name
    y, nfe = torch.rand(2, 1, 8, 8) * 2 - 1, method.nfe_choices()[0]
    direct = method.build()["student"]
    direct.load_state_dict(state["ema"]["student"])
    x_loaded, used = loaded.sample("student", y, SeededNoise([3, 4], y.shape[1:]), nfe)
    with torch.no_grad():
        x_direct = method.sample(direct.eval(), y, SeededNoise([3, 4], y.shape[1:]), nfe)
    assert used == nfe and torch.allclose(x_loaded, x_direct, atol=1e-6)
    with pytest.raises(ValueError, match="nfe"):
        loaded.sample("student", y, SeededNoise([3, 4], y.shape[1:]), max(method.nfe_choices()) + 1)


def test_a_method_refuses_the_wrong_teacher():
    wrong = {"bridge": "diffusion", "diffusion": "bridge"}
    for name, entry in METHODS.items():
        with pytest.raises(ValueError, match=entry.teacher):
            make_method(name, entry.params(), tiny_teacher(wrong[entry.teacher], "i2sb"))
