"""Teachers: preconditioned denoisers, their losses under the shared training loop,
condition dropout, and self-describing checkpoints."""
import pytest
import torch

from pipeline.models.checkpoint import CheckpointError, save_checkpoint
from pipeline.config.settings import BridgeTeacherParams, DiffusionTeacherParams, TrainParams, UNetParams
from pipeline.models.loading import load_teacher
from pipeline.models.teachers import TEACHERS, BridgeDenoiser, DataShape, EDMDenoiser, teacher_config
from pipeline.training.loop import LoopHooks, run_training
from tests.helpers import square_images as toy_data

SHAPE = DataShape(channels=1, image_size=8, conditional=True)
TINY = UNetParams(channels=(8, 16), emb_dim=16)


def test_edm_denoiser_at_tiny_sigma_returns_its_input():
    # c_skip -> 1 and c_out -> 0 as sigma -> 0: D(x, sigma) = x whatever the network says.
    den = EDMDenoiser(DiffusionTeacherParams(net=TINY), SHAPE)
    torch.nn.init.normal_(den.net.head[-1].weight)  # a network that outputs something
    x = torch.randn(4, 1, 8, 8)
    out = den(x, torch.full((4,), 1e-9), torch.zeros_like(x))
    assert torch.allclose(out, x, atol=1e-5)


def test_null_condition_differs_from_condition_only_through_y():
    den = EDMDenoiser(DiffusionTeacherParams(net=TINY), SHAPE)
    torch.nn.init.normal_(den.net.head[-1].weight)
    x, y, sigma = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8), torch.ones(3)
    dropped = den(x, sigma, y, keep=torch.zeros(3, dtype=torch.bool))
    assert torch.allclose(dropped, den(x, sigma, None))  # keep=False is the null input
    assert not torch.allclose(dropped, den(x, sigma, y))


def test_i2sb_bridge_network_never_sees_y():
    for style, sees in (("i2sb", False), ("ddbm", True)):
        den = BridgeDenoiser(BridgeTeacherParams(style=style, net=TINY), SHAPE)
        torch.nn.init.normal_(den.net.head[-1].weight)
        x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 0.5)
        changed = not torch.allclose(den(x, t, torch.zeros_like(x)), den(x, t, torch.ones_like(x)))
        assert changed == sees, style


@pytest.mark.parametrize("name", sorted(TEACHERS))
def test_training_lowers_the_loss(name):
    params_cls, task_cls = TEACHERS[name]
    params = params_cls(net=TINY)
    task = task_cls(params, SHAPE)
    train = TrainParams(steps=120, batch_size=32, lr=3e-3, warmup_steps=10, log_every=40)
    hooks = LoopHooks()
    state = run_training(task, toy_data(), train, seed=0, hooks=hooks)
    assert state["step"] == 120
    assert hooks.history[-1]["loss"] < 0.7 * hooks.history[0]["loss"]


@pytest.mark.parametrize("name", sorted(TEACHERS))
def test_checkpoint_round_trip_and_wrong_kind(tmp_path, name):
    params_cls, task_cls = TEACHERS[name]
    params = params_cls(net=TINY)
    den = task_cls(params, SHAPE).build()["denoiser"]
    path = tmp_path / f"{name}.pt"
    save_checkpoint(path, f"teacher_{name}", teacher_config(name, params, SHAPE),
                    {"denoiser": den.state_dict()})
    teacher = load_teacher(path)
    assert teacher.params == params and teacher.shape == SHAPE
    for a, b in zip(teacher.denoiser.parameters(), den.parameters()):
        assert torch.equal(a, b)
    other = "bridge" if name == "diffusion" else "diffusion"
    with pytest.raises(CheckpointError, match=f"kind 'teacher_{name}'"):
        load_teacher(path, names=(other,))


def test_truncated_or_foreign_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_teacher(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=str(bad)):
        load_teacher(bad)
    torch.save({"weights": torch.zeros(1)}, bad)
    with pytest.raises(CheckpointError, match="not a pipeline checkpoint"):
        load_teacher(bad)


def test_cosine_schedule_warms_up_then_decays_to_zero():
    from pipeline.training.loop import lr_scale
    train = TrainParams(steps=110, warmup_steps=10, lr_schedule="cosine")
    assert lr_scale(train, 0) == pytest.approx(0.1) and lr_scale(train, 9) == pytest.approx(1.0)
    assert lr_scale(train, 10) == pytest.approx(1.0)
    assert lr_scale(train, 60) == pytest.approx(0.5)
    assert lr_scale(train, 109) < 0.001
    assert lr_scale(TrainParams(steps=110, warmup_steps=10), 109) == 1.0
