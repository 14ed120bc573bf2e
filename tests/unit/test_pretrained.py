"""A pretrained diffusers model as the diffusion teacher (pipeline/models/pretrained.py, docs/pretrained.md).

A tiny randomly initialised `UNet2DModel` is saved with its scheduler config, as an
epsilon-prediction model (pipeline layout: unet/, scheduler/), a v-prediction model (flat
layout) and a learned-variance epsilon model (2C output channels); each is loaded back by
`load_diffusers_teacher` and checked against the diffusers schedulers' own `step`: the x0
estimate (`pred_original_sample`) and the next sample, mapped z <-> x. Then every diffusion
sampler evaluates it with counted NFE, and MM, TDD, PD and CD distil it for a few steps.
"""
import copy
import json
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.scale

from pipeline.distill import ConsistencyParams, MMParams, PDParams, TDDParams, make_method
from pipeline.models.students import Student
from pipeline.distill.consistency import ConsistencyFunction, ddim_jump, raw_output
from pipeline.distill.mm import StepAwareDenoiser, ddpm_posterior
from pipeline.evaluation.noise import SeededNoise
from pipeline.models.checkpoint import load_checkpoint
from pipeline.models.loading import load_student, load_teacher
from pipeline.models.pretrained import (PretrainedError, check_data, load_diffusers_teacher, resolve_schedule,
                                        write_pretrained_teacher)
from pipeline.samplers import DIFFUSION_SAMPLERS, get_sampler, steps_for_nfe
from pipeline.models.schedules import edm_precond
from pipeline.config.settings import PretrainedParams, TrainParams
from pipeline.training.loop import LoopHooks, run_training

C, SIZE, T = 2, 8, 1000


def tiny_unet(out_channels=C, **overrides):
    torch.manual_seed(0)
    config = {"sample_size": SIZE, "in_channels": C, "out_channels": out_channels, "block_out_channels": (8, 16),
              "layers_per_block": 1, "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
              "up_block_types": ("AttnUpBlock2D", "UpBlock2D"), "norm_num_groups": 4, "attention_head_dim": 4}
    return diffusers.UNet2DModel(**{**config, **overrides})


def ddpm_scheduler(prediction_type, **overrides):
    return diffusers.DDPMScheduler(num_train_timesteps=T, prediction_type=prediction_type, clip_sample=False,
                                   **overrides)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusers")
    made = {}
    made["eps"] = root / "eps"  # pipeline layout, as DDPMPipeline.save_pretrained writes
    tiny_unet().save_pretrained(made["eps"] / "unet")
    ddpm_scheduler("epsilon").save_pretrained(made["eps"] / "scheduler")
    made["v"] = root / "v"  # flat layout, as a hub repo of a bare model
    tiny_unet().save_pretrained(made["v"])
    ddpm_scheduler("v_prediction").save_pretrained(made["v"])
    made["learned"] = root / "learned"  # improved-DDPM style: eps and a variance, 2C channels
    tiny_unet(out_channels=2 * C).save_pretrained(made["learned"] / "unet")
    ddpm_scheduler("epsilon", variance_type="learned_range").save_pretrained(made["learned"] / "scheduler")
    return made


@pytest.fixture(scope="module")
def teachers(folders):
    return {name: load_diffusers_teacher(path) for name, path in folders.items()}


def reference(folder, dtype):
    """The model and its scheduler config, loaded by diffusers alone."""
    sub = folder / "unet" if (folder / "unet").is_dir() else folder
    unet = diffusers.UNet2DModel.from_pretrained(sub, low_cpu_mem_usage=False, torch_dtype=dtype).eval()
    config = diffusers.DDPMScheduler.load_config(folder / "scheduler" if (folder / "scheduler").is_dir() else folder)
    return unet, config


def in_dtype(sched, dtype):
    """The scheduler's arithmetic in `dtype`: its alphas_cumprod are float32 numbers, which
    float64 holds exactly, so the schedule is unchanged and only the rounding of its step goes."""
    sched.alphas_cumprod = sched.alphas_cumprod.to(dtype)
    return sched


def full(x, value):
    return torch.full((len(x),), float(value), dtype=x.dtype)


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1.0))


# --- the conversion ------------------------------------------------------------------------

def test_timeline_schedule_and_shape(teachers):
    t = teachers["eps"]
    a_bar = ddpm_scheduler("epsilon").alphas_cumprod.double()
    sigmas = ((1 - a_bar) / a_bar).sqrt()
    assert torch.equal(t.denoiser.net.sigmas, sigmas)
    s = t.schedule
    assert (s.sigma_min, s.sigma_max, s.sigma_data) == (float(sigmas[0]), float(sigmas[-1]), 0.5)
    assert 0.0099 < s.sigma_min < 0.0101 and 150 < s.sigma_max < 160   # linear 1e-4 .. 0.02
    assert (t.name, t.family, t.shape.channels, t.shape.image_size, t.shape.conditional) == \
        ("diffusion", "diffusion", C, SIZE, False)
    x = torch.randn(3, C, SIZE, SIZE)
    sigma = torch.tensor([0.05, 1.0, 30.0])
    assert torch.equal(t.denoiser(x, sigma), t.denoiser(x, sigma, torch.randn_like(x), torch.ones(3).bool()))
    with pytest.raises(ValueError, match="sigma_min"):
        resolve_schedule(sigmas, sigma_min=0.002)
    assert resolve_schedule(sigmas, 0.02, 80.0).sigma_max == 80.0


def test_sigma_to_timestep(teachers):
    net = teachers["eps"].denoiser.net
    k = torch.tensor([0, 1, 250, 998, 999])
    assert torch.equal(net.timestep(net.sigmas[k]), k.double())                  # exact on the grid
    mid = (0.5 * (net.log_sigmas[k[:-1]] + net.log_sigmas[k[:-1] + 1])).exp()
    assert torch.allclose(net.timestep(mid), k[:-1].double() + 0.5, atol=1e-9)   # linear in log-sigma
    assert net.timestep(torch.tensor([1e-4, 1e4])).tolist() == [0.0, 999.0]     # clamped to the ends
    net.timestep_mode = "nearest"
    try:
        below = (0.8 * net.log_sigmas[k[:-1]] + 0.2 * net.log_sigmas[k[:-1] + 1]).exp()
        assert torch.equal(net.timestep(below), k[:-1]) and net.timestep(below).dtype == torch.long
        assert torch.equal(net.timestep(mid * 1.001), k[:-1] + 1)
    finally:
        net.timestep_mode = "interpolate"


@pytest.mark.parametrize("name", ["eps", "v"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_ddim_step_matches_the_scheduler(folders, name, dtype, tol):
    """DDIMScheduler.step (eta = 0) from t to t_prev against D and the project's DDIM move
    x' = D + (sigma'/sigma)(x - D), on one 5-step trajectory run by each side on its own.
    Errors are relative to max(1, max |reference|): a random eps-model's x0 at t = 999 is
    ~ z / sqrt(a_bar) ~ 500 in size."""
    teacher = load_diffusers_teacher(folders[name], dtype=dtype)
    unet, config = reference(folders[name], dtype)
    sched = diffusers.DDIMScheduler.from_config(config, timestep_spacing="trailing", set_alpha_to_one=True)
    in_dtype(sched, dtype).set_timesteps(5)
    sigmas, a_bar = teacher.denoiser.net.sigmas, sched.alphas_cumprod.double()
    z = torch.randn(3, C, SIZE, SIZE, generator=torch.Generator().manual_seed(1), dtype=dtype)
    x = z / a_bar[sched.timesteps[0]].sqrt().to(dtype)
    jump = T // 5
    for t in sched.timesteps.tolist():
        with torch.no_grad():
            out = sched.step(unet(z, t).sample, t, z, eta=0.0)
            d = teacher.denoiser(x, full(x, sigmas[t]))
        sigma_prev = float(sigmas[t - jump]) if t - jump >= 0 else 0.0
        x = ddim_jump(x, d, full(x, sigmas[t]), full(x, sigma_prev))
        z = out.prev_sample
        assert rel_err(d, out.pred_original_sample) < tol, t
        assert rel_err(x / math.sqrt(1 + sigma_prev ** 2), z) < tol, t   # z = alpha x


@pytest.mark.parametrize("name", ["eps", "v", "learned"])
def test_ddpm_step_matches_the_scheduler(folders, name):
    """DDPMScheduler.step (ancestral, posterior variance) against the project's DDPM posterior
    q(x_s | x_t, x0 = D), with the scheduler's own noise draws, in float64."""
    teacher = load_diffusers_teacher(folders[name], dtype=torch.float64)
    unet, config = reference(folders[name], torch.float64)
    sched = in_dtype(diffusers.DDPMScheduler.from_config(config), torch.float64)
    sched.set_timesteps(4)
    sigmas = teacher.denoiser.net.sigmas
    z = torch.randn(3, C, SIZE, SIZE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = z * math.sqrt(1 + float(sigmas[sched.timesteps[0]]) ** 2)
    g_ref, g_ours = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    timesteps = sched.timesteps.tolist()
    for t, t_prev in zip(timesteps, timesteps[1:] + [-1]):
        with torch.no_grad():
            out = sched.step(unet(z, t).sample, t, z, generator=g_ref)
            d = teacher.denoiser(x, full(x, sigmas[t]))
        eps = torch.randn(z.shape, generator=g_ours, dtype=z.dtype)              # the scheduler's draw
        sigma_prev = float(sigmas[t_prev]) if t_prev >= 0 else 0.0
        alpha_prev = 1 / math.sqrt(1 + sigma_prev ** 2)
        assert rel_err(d, out.pred_original_sample) < 1e-10, t
        if name == "learned":   # the variance is the model's own: compare x0 and the posterior mean
            mean = ddpm_posterior(x, d, float(sigmas[t]), sigma_prev, torch.zeros_like(eps))
            assert rel_err(mean * alpha_prev, _ddpm_mean(sched, out.pred_original_sample, z, t, t_prev)) < 1e-10
            x = out.prev_sample / alpha_prev                                    # go on from its sample
        else:
            x = ddpm_posterior(x, d, float(sigmas[t]), sigma_prev, eps)
            assert rel_err(x * alpha_prev, out.prev_sample) < 1e-10, t
        z = out.prev_sample


def _ddpm_mean(sched, x0, z, t, t_prev):
    """The scheduler's posterior mean (its step without the variance term)."""
    a, a_prev = sched.alphas_cumprod[t].double(), sched.alphas_cumprod[t_prev].double() if t_prev >= 0 else 1.0
    beta = 1 - a / a_prev
    return (a_prev ** 0.5 * beta / (1 - a)) * x0 + ((1 - beta) ** 0.5 * (1 - a_prev) / (1 - a)) * z


def test_raw_network_reproduces_the_denoiser(teachers):
    """CD/TDD's raw_output and MM's widened net see an EDM-preconditioned network:
    c_skip x + c_out F(c_in x, c_noise) = D; f(x, sigma_min) = x; a widened input is a no-op."""
    den = teachers["v"].denoiser
    x = torch.randn(4, C, SIZE, SIZE) * 3
    sigma = torch.tensor([den.schedule.sigma_min, 0.3, 7.0, den.schedule.sigma_max])
    c_skip, c_out, _, _ = edm_precond(sigma, den.sigma_data)
    with torch.no_grad():
        d = den(x, sigma)
        rebuilt = c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * raw_output(den, x, sigma)
        assert rel_err(rebuilt / (1 + sigma.view(-1, 1, 1, 1)), d / (1 + sigma.view(-1, 1, 1, 1))) < 1e-5
        f = ConsistencyFunction(den, den.schedule.sigma_min)
        smin = full(x, den.schedule.sigma_min)
        assert torch.allclose(f(x, smin), x)
        step_aware = StepAwareDenoiser(copy.deepcopy(den))
        assert rel_err(step_aware(x, sigma, None, sigma / 2), d) < 1e-5


# --- sampling and distilling ----------------------------------------------------------------

@pytest.mark.parametrize("sampler", sorted(DIFFUSION_SAMPLERS))
def test_every_diffusion_sampler_runs_with_counted_nfe(teachers, sampler):
    for name in ("eps", "v"):
        for nfe in (1, 2, 4):
            noise = SeededNoise([5, 6], (C, SIZE, SIZE))
            x, used = teachers[name].sample(sampler, None, noise, nfe)   # samplers.sample counts calls
            steps = steps_for_nfe(f"diffusion/{sampler}", nfe)
            assert used == get_sampler(f"diffusion/{sampler}").nfe_of_steps(steps, 0.0) <= nfe
            assert x.shape == (2, C, SIZE, SIZE) and bool(torch.isfinite(x).all())


TRAIN = TrainParams(steps=3, batch_size=4, lr=1e-3, warmup_steps=0, ema_decay=0.5, log_every=1,
                    checkpoint_every=3)
METHODS = {
    "mm": MMParams(nfe=[1, 2], train=TRAIN),
    "mm-parameter": MMParams(variant="parameter", nfe=[1, 2], train=TRAIN),   # a JVP through the teacher
    "tdd": TDDParams(ddim_steps=10, schedule_steps=(2, 4), nfe=[2, 4], train=TRAIN),
    "pd": PDParams(start_steps=4, rounds=1, train=TRAIN),
    "cd": ConsistencyParams(grid_steps=6, nfe=[1, 2], train=TRAIN),
}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # torch.func, MM's JVP
def test_every_diffusion_method_distils_it(folders, teachers, method):
    if method == "mm-parameter":  # scaled_dot_product_attention has no forward-mode AD
        teacher = load_diffusers_teacher(folders["eps"], attention="explicit")
    else:
        teacher = teachers["eps"]
    m = make_method(method.split("-")[0], METHODS[method], teacher)
    torch.manual_seed(0)
    initial = {k: v.clone() for k, v in m.build()["student"].state_dict().items()}
    data = {"x0": torch.rand(16, C, SIZE, SIZE) * 2 - 1, "y": torch.zeros(16, C, SIZE, SIZE)}
    hooks = LoopHooks()
    state = run_training(m, data, m.params.train, seed=0, hooks=hooks)
    losses = [h["loss"] for h in hooks.history]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    final = state["nets"]["student"]
    assert final.keys() == initial.keys()
    assert any(not torch.equal(initial[k], final[k]) for k in final)      # the student moved
    net = m.build()["student"]
    net.load_state_dict(state["ema"]["student"])
    nfe = m.nfe_choices()[0]
    x, used = Student(m, net.eval()).sample("student", None, SeededNoise([1, 2], (C, SIZE, SIZE)), nfe)
    assert used == nfe and bool(torch.isfinite(x).all())


def test_the_teacher_stage_writes_a_self_describing_checkpoint(folders, teachers, tmp_path):
    """write_pretrained_teacher (teacher@diffusion with `pretrained` set): checks the prepared
    data's manifest, embeds the weights; the checkpoint loads with weights_only=True and
    rebuilds the teacher without the folder."""
    data = tmp_path / "data"
    data.mkdir()
    manifest = data / "manifest.json"
    manifest.write_text(json.dumps({"x0_shape": [C, SIZE, SIZE], "conditional": False}))
    block = PretrainedParams(path=folders["v"], sigma_max=80.0)
    teacher = write_pretrained_teacher(tmp_path / "diffusion.pt", block, data_dir=data)
    back = load_teacher(tmp_path / "diffusion.pt")
    assert "arch" in load_checkpoint(tmp_path / "diffusion.pt", {"teacher_diffusion"})["config"]
    x, sigma = torch.randn(2, C, SIZE, SIZE), torch.tensor([0.5, 20.0])
    with torch.no_grad():
        assert torch.equal(back.denoiser(x, sigma), teacher.denoiser(x, sigma))
        assert torch.equal(back.denoiser(x, sigma), teachers["v"].denoiser(x, sigma))
    assert back.schedule == teacher.schedule and back.schedule.sigma_max == 80.0 and back.shape == teacher.shape
    assert back.denoiser.arch["source"]["sha256"] == teacher.denoiser.arch["source"]["sha256"]
    manifest.write_text(json.dumps({"x0_shape": [C, SIZE, SIZE], "conditional": True}))
    with pytest.raises(PretrainedError, match="corruption.kind: none"):
        check_data(teacher.shape, data)
    manifest.write_text(json.dumps({"x0_shape": [1, 28, 28], "conditional": False}))
    with pytest.raises(PretrainedError, match="data.source"):
        check_data(teacher.shape, data)


def test_rejects_what_it_cannot_wrap(tmp_path):
    tiny_unet(time_embedding_type="learned", num_train_timesteps=T).save_pretrained(tmp_path / "unet")
    ddpm_scheduler("epsilon").save_pretrained(tmp_path / "scheduler")
    with pytest.raises(ValueError, match="nearest"):
        load_diffusers_teacher(tmp_path)
    teacher = load_diffusers_teacher(tmp_path, timestep="nearest")      # integer timesteps only
    with torch.no_grad():
        assert torch.isfinite(teacher.denoiser(torch.zeros(1, C, SIZE, SIZE), torch.tensor([3.3]))).all()
    with pytest.raises(PretrainedError, match="does not exist"):
        load_diffusers_teacher(tmp_path / "missing")


def test_the_pipeline_loads_the_teacher_and_its_students(folders, tmp_path):
    """loading.load_teacher and loading.load_student rebuild a pretrained teacher (and a
    student distilled from it) from their checkpoints alone."""
    from pipeline.models.checkpoint import save_checkpoint
    from pipeline.distill.base import student_config
    from pipeline.config.settings import DiffusionTeacherParams
    block = PretrainedParams(path=folders["eps"])
    teacher = write_pretrained_teacher(tmp_path / "diffusion.pt", block, DiffusionTeacherParams(pretrained=block))
    back = load_teacher(tmp_path / "diffusion.pt")
    x, sigma = torch.randn(2, C, SIZE, SIZE), torch.tensor([0.5, 20.0])
    with torch.no_grad():
        assert torch.equal(back.denoiser(x, sigma), teacher.denoiser(x, sigma))
    assert back.params.pretrained == block
    m = make_method("mm", METHODS["mm"], back)
    net = m.build()["student"]
    save_checkpoint(tmp_path / "mm.pt", "student_mm", student_config(m), {"student": net.state_dict()})
    student = load_student(tmp_path / "mm.pt")
    x, used = student.sample("student", None, SeededNoise([1, 2], (C, SIZE, SIZE)), 2)
    assert used == 2 and bool(torch.isfinite(x).all())
