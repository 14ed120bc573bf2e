"""The CUDA paths (`gpu` marker; skipped, with the reason, where torch sees no CUDA device):
bf16 autocast with TF32 and channels_last on a GPU lowers the loss, and a TorchTrainer with
`use_gpu` trains over NCCL. `bash bench/gpu_check.sh` runs them with the GPU benchmarks."""
import functools

import pytest
import torch

from pipeline.config.settings import ComputeParams, DiffusionTeacherParams, RayParams, TrainParams, UNetParams
from pipeline.models.teachers import DataShape, DiffusionTeacherTask
from pipeline.training.loop import LoopHooks, TrainRun, run_training
from tests.helpers import square_images

pytestmark = pytest.mark.gpu

SHAPE = DataShape(channels=1, image_size=8, conditional=True)
FAST = ComputeParams(precision="bf16", tf32=True, channels_last=True)


def task():
    return DiffusionTeacherTask(DiffusionTeacherParams(net=UNetParams(channels=(16, 32), emb_dim=32)), SHAPE)


def train_params(steps=90):
    return TrainParams(steps=steps, batch_size=64, lr=3e-3, warmup_steps=10, log_every=30, checkpoint_every=steps)


def test_bf16_tf32_channels_last_training_on_cuda_lowers_the_loss():
    hooks = LoopHooks(device=torch.device("cuda"), compute=FAST)
    state = run_training(task(), square_images(512), train_params(), seed=0, hooks=hooks)
    losses = [m["loss"] for m in hooks.history]
    assert state["step"] == 90 and losses[-1] < 0.8 * losses[0], losses
    weights = state["nets"]["denoiser"]
    assert all(v.device.type == "cuda" and v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())
    assert torch.backends.cuda.matmul.allow_tf32


def test_the_class_conditional_profile_network_trains_in_bf16_on_cuda():
    """profiles/cifar10-class.yaml's teacher (26.7M parameters, attention at 16x16, labels)
    under the profile's compute options: finite, falling loss on labelled 32x32 RGB data."""
    from pipeline.config.schema import load_params
    from tests.conftest import ROOT
    params = load_params(ROOT / "profiles" / "cifar10-class.yaml")
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (512,), generator=g)
    x0 = (labels.float()[:, None, None, None] / 4.5 - 1).expand(-1, 3, 32, 32).contiguous()  # class k: grey level k
    task = DiffusionTeacherTask(params.teacher.diffusion, DataShape(3, 32, False, classes=10))
    hooks = LoopHooks(device=torch.device("cuda"), compute=params.ray.compute)
    train = TrainParams(steps=60, batch_size=64, lr=2e-4, warmup_steps=5, log_every=20, checkpoint_every=60)
    run_training(task, {"x0": x0, "label": labels}, train, seed=0, hooks=hooks)
    losses = [m["loss"] for m in hooks.history]
    assert all(map(lambda v: v == v, losses)) and losses[-1] < losses[0], losses


def require_nccl(metrics, state, context):
    """Report hook: fails the worker unless its DDP process group runs on NCCL."""
    backend = torch.distributed.get_backend()
    assert backend == "nccl", f"DDP backend is {backend}, not nccl"


@pytest.mark.slow
def test_torch_trainer_with_use_gpu_trains_over_nccl(ray_address, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.training.ray_train import fit
    from pipeline.runtime.tracking import StageRun
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = StageRun(uri, "test", "gpu", {"group": "g", "stage": "teacher"}, {},
                   artifact_root=(tmp_path / "artifacts").as_uri())
    workers = min(2, torch.cuda.device_count())
    scaling = RayParams(num_workers=workers, use_gpu=True, threads_per_worker=1, compute=FAST)
    state = fit(TrainRun(task(), functools.partial(square_images, 512), train_params(), 0, scaling,
                         log=run.logger(), hooks=(require_nccl,)), tmp_path / "ray", f"gpu{workers}")
    assert state["step"] == 90
    losses = [m.value for m in sorted(MlflowClient(uri).get_metric_history(run.run_id, "train/loss"),
                                      key=lambda m: m.step)]
    assert len(losses) == 3 and losses[-1] < 0.8 * losses[0], losses


def sampling_on(device, tmp_path):
    """{(model, sampler, nfe): samples} of sample_shard on `device`, for tiny untrained teachers
    and every registered student on 8x8 digits (2x super-resolution)."""
    from pipeline.models.checkpoint import save_checkpoint
    from pipeline.data.prepare import prepare_dataset
    from pipeline.distill import METHODS, make_method
    from pipeline.distill.base import student_config
    from pipeline.evaluation.sampling import ShardJob, model_plan, sample_shard
    from pipeline.models.loading import build_teacher, load_model
    from pipeline.config.settings import DigitsSource, EvaluateParams, SuperResolution
    from pipeline.models.teachers import TEACHERS, teacher_config
    data = tmp_path / "data"
    if not data.exists():
        prepare_dataset(DigitsSource(), SuperResolution(factor=2), n_test=16, shard_size=400, seed=0, out_dir=data)
    shape, tiny = DataShape(1, 8, True), UNetParams(channels=(8, 16), emb_dim=16)
    torch.manual_seed(0)
    paths, teachers = {}, {}
    for name, (params_cls, _) in TEACHERS.items():
        params = params_cls(net=tiny)
        teachers[name] = build_teacher(teacher_config(name, params, shape))
        paths[name] = tmp_path / f"{name}.pt"
        save_checkpoint(paths[name], f"teacher_{name}", teacher_config(name, params, shape),
                        {"denoiser": teachers[name].denoiser.state_dict()})
    for method, entry in METHODS.items():
        student = make_method(method, entry.params(), teachers[entry.teacher])
        paths[method] = tmp_path / f"{method}.pt"
        save_checkpoint(paths[method], f"student_{method}", student_config(student),
                        {"student": student.build()["student"].state_dict()})
    out, ev = {}, EvaluateParams(nfe=[1, 2, 4])
    for name, path in paths.items():
        points, guidance = model_plan(load_model(path), ev)
        job = ShardJob(str(path), str(data), 0, 16, tuple(points), 1, guidance, 8, 1, "fair", device)
        out.update({(name, s, n): x for (s, n, _), (x, _) in sample_shard(job).items()})
    return out


def test_every_model_samples_on_cuda_as_on_the_cpu(tmp_path):
    """evaluate.device: cuda. The same noise (drawn by the CPU generators), the same samples up
    to floating-point differences, for both teachers' samplers and every student."""
    cpu, cuda = sampling_on("cpu", tmp_path), sampling_on("cuda", tmp_path)
    assert cpu.keys() == cuda.keys()
    for key in cpu:
        assert cuda[key].device.type == "cpu"
        assert torch.allclose(cpu[key], cuda[key], atol=2e-3), (key, (cpu[key] - cuda[key]).abs().max())
