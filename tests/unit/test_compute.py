"""The device options of `ray.compute` (pipeline.training.compute) on the CPU: each option reaches the
networks the loop trains, a bf16-autocast step runs and lowers the loss, and with every
option off the loop computes exactly what it computed without them."""
import pytest
import torch

from pipeline.training import compute
from pipeline.distill.base import unwrap
from pipeline.config.settings import ComputeParams, DiffusionTeacherParams, TrainParams, UNetParams
from pipeline.models.teachers import DataShape, DiffusionTeacherTask
from pipeline.training.loop import LoopHooks, run_training
from tests.helpers import square_images

pytestmark = pytest.mark.scale

SHAPE = DataShape(channels=1, image_size=8, conditional=True)


def task():
    return DiffusionTeacherTask(DiffusionTeacherParams(net=UNetParams(channels=(8, 16), emb_dim=16)), SHAPE)


def train(compute_params, steps=60):
    hooks = LoopHooks(compute=compute_params)
    params = TrainParams(steps=steps, batch_size=32, lr=3e-3, warmup_steps=5, log_every=10,
                         checkpoint_every=steps)
    state = run_training(task(), square_images(256), params, seed=0, hooks=hooks)
    return state, [m["loss"] for m in hooks.history]


def test_autocast_wrapper_runs_the_network_in_bf16_and_returns_float32():
    seen = []
    net = torch.nn.Linear(4, 3)
    net.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    wrapped = compute.for_training(net, ComputeParams(precision="bf16"), "cpu")
    out = wrapped(torch.randn(2, 4))
    assert seen == [torch.bfloat16] and out.dtype == torch.float32
    assert unwrap(wrapped) is net  # checkpoints and EMA see the plain module


def test_a_bf16_training_run_lowers_the_loss():
    state, losses = train(ComputeParams(precision="bf16"))
    assert state["step"] == 60
    assert all(isinstance(v, float) for v in losses)  # read once per report, as floats
    assert losses[-1] < 0.8 * losses[0]
    assert all(v.dtype == torch.float32 for v in state["nets"]["denoiser"].values() if v.is_floating_point())


def test_bf16_changes_the_numbers_and_fp32_reproduces_itself():
    a, _ = train(ComputeParams(), steps=10)
    b, _ = train(ComputeParams(), steps=10)
    c, _ = train(ComputeParams(precision="bf16"), steps=10)
    key = next(iter(a["nets"]["denoiser"]))
    for k in a["nets"]["denoiser"]:
        assert torch.equal(a["nets"]["denoiser"][k], b["nets"]["denoiser"][k])
    assert any(not torch.equal(a["nets"]["denoiser"][k], c["nets"]["denoiser"][k]) for k in a["nets"]["denoiser"]), key


def test_channels_last_reaches_the_weights_and_batches():
    net = torch.nn.Conv2d(1, 4, 3)
    compute.for_training(net, ComputeParams(channels_last=True), "cpu")
    assert net.weight.is_contiguous(memory_format=torch.channels_last)
    batch = compute.prepare_batch({"x0": torch.randn(2, 1, 8, 8), "label": torch.zeros(2)},
                                  ComputeParams(channels_last=True))
    assert batch["x0"].is_contiguous(memory_format=torch.channels_last) and batch["label"].dim() == 1
    state, losses = train(ComputeParams(channels_last=True), steps=20)
    assert state["step"] == 20 and all(torch.isfinite(torch.tensor(losses)))


def test_compile_wraps_the_trained_network_and_unwrap_finds_it():
    net = torch.nn.Linear(4, 3)
    wrapped = compute.for_training(net, ComputeParams(compile=True), "cpu")
    assert wrapped is not net and unwrap(wrapped) is net


def test_bad_precision_is_refused():
    with pytest.raises(ValueError, match="precision"):
        ComputeParams(precision="fp16")
