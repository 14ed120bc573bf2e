"""Class-conditional generation (`corruption: none` with `labels: true`): the label embedding
and its null class, attention blocks, the data that carries the labels, a teacher that learns
to follow them and the students that inherit them (docs/class-conditional.md)."""
import copy

import pytest
import torch
from torch.func import functional_call, jvp

from pipeline.data.prepare import prepare_dataset
from pipeline.data.shards import load_split
from pipeline.distill import METHODS, make_method
from pipeline.models.students import Student
from pipeline.models.nets import Attention, UNet
from pipeline.evaluation.noise import SeededNoise
from pipeline.config.settings import DiffusionTeacherParams, DigitsSource, NoCorruption, TrainParams, UNetParams
from pipeline.models.teachers import DataShape, DiffusionTeacherTask, EDMDenoiser, Teacher
from pipeline.training.loop import run_training
from tests.helpers import square_images

pytestmark = pytest.mark.scale

SHAPE = DataShape(channels=1, image_size=8, conditional=False, classes=4)
TINY = UNetParams(channels=(16, 32), emb_dim=32)


def corner_of(x):
    """(B,) the corner (row-major 0..3) of each 8x8 image's brightest 4x4 quadrant."""
    quadrants = x.unfold(2, 4, 4).unfold(3, 4, 4).mean((-1, -2)).flatten(1)  # (B, 4)
    return quadrants.argmax(1)


def corner_data(n=512, seed=0):
    """square_images with label = the corner of the square: the label decides the image."""
    data = square_images(n, seed)
    return {"x0": data["x0"], "label": corner_of(data["x0"])}


def randomised(denoiser, seed=0):
    """`denoiser` with a non-zero output layer, so its output depends on every input."""
    torch.manual_seed(seed)
    torch.nn.init.normal_(denoiser.net.head[-1].weight, std=0.1)
    return denoiser


def test_a_dropped_label_is_the_null_class_and_labels_change_the_output():
    den = randomised(EDMDenoiser(DiffusionTeacherParams(net=TINY), SHAPE))
    x, sigma, label = torch.randn(4, 1, 8, 8), torch.ones(4), torch.tensor([0, 1, 2, 3])
    dropped = den(x, sigma, label, keep=torch.zeros(4, dtype=torch.bool))
    assert torch.allclose(dropped, den(x, sigma, None))
    kept = den(x, sigma, label, keep=torch.tensor([True, False, True, False]))
    assert torch.allclose(kept[1::2], dropped[1::2]) and not torch.allclose(kept[::2], dropped[::2])
    same_x = x[:1].expand(4, -1, -1, -1)
    outputs = den(same_x, sigma, label)
    assert min((outputs[i] - outputs[j]).abs().max() for i in range(4) for j in range(i)) > 1e-4


def test_attention_sits_at_the_named_sides_starts_as_identity_and_runs_under_forward_ad():
    net = UNet(UNetParams(patch=1, channels=(8, 16, 16), attention=(4,)), 1, 1, image_size=16)
    assert sorted(net.attn) == ["down2", "mid", "up0"]  # the 4x4 level: its down, mid, first up block
    with pytest.raises(ValueError, match=r"\[6\] is not a feature-map side .* \[16, 8, 4\]"):
        UNet(UNetParams(patch=1, channels=(8, 16, 16), attention=(6,)), 1, 1, image_size=16)
    block = Attention(64)
    h = torch.randn(2, 64, 4, 4)
    assert torch.equal(block(h), h)
    torch.nn.init.normal_(block.proj.weight)
    params = dict(block.named_parameters())
    tangents = {k: torch.randn_like(v) for k, v in params.items()}
    out, push = jvp(lambda p: functional_call(block, p, (h,)), (params,), (tangents,))
    eps = 1e-3
    moved = functional_call(block, {k: v + eps * tangents[k] for k, v in params.items()}, (h,))
    assert torch.allclose(push, (moved - out) / eps, atol=5e-2 * push.abs().max().item())


def test_prepare_marks_a_labelled_split_and_its_condition_is_the_label(tmp_path):
    prepare_dataset(DigitsSource(), NoCorruption(labels=True), n_test=100, shard_size=500, seed=0,
                    out_dir=tmp_path / "labelled")
    test = load_split(tmp_path / "labelled", "test")
    assert test.class_conditional and not test.conditional and test.num_classes == 10
    assert torch.equal(test.condition, test.label)
    prepare_dataset(DigitsSource(), NoCorruption(), n_test=100, shard_size=500, seed=0, out_dir=tmp_path / "plain")
    plain = load_split(tmp_path / "plain", "test")
    assert not plain.class_conditional and plain.condition is None


def test_labels_without_classes_are_refused_in_one_line(tmp_path):
    from PIL import Image

    from pipeline.config.settings import FolderSource
    for i in range(8):  # a flat folder: one class
        Image.new("RGB", (8, 8), (i * 30, 0, 0)).save(tmp_path / f"{i}.png")
    with pytest.raises(ValueError, match=r"needs a source with at least 2 classes; data.source \(folder\) has 1"):
        prepare_dataset(FolderSource(path=tmp_path, image_size=8), NoCorruption(labels=True), n_test=2,
                        shard_size=4, seed=0, out_dir=tmp_path / "out", n_reference=2)


def trained_corner_teacher():
    params = DiffusionTeacherParams(net=TINY, p_uncond=0.1)
    train = TrainParams(steps=400, batch_size=64, lr=3e-3, warmup_steps=20, lr_schedule="cosine",
                        ema_decay=0.95, log_every=100, checkpoint_every=400)
    task = DiffusionTeacherTask(params, SHAPE)
    state = run_training(task, corner_data(), train, seed=0)
    denoiser = task.build()["denoiser"]
    denoiser.load_state_dict(state["ema"]["denoiser"])
    return Teacher("diffusion", "diffusion", params, SHAPE, denoiser.eval().requires_grad_(False))


@pytest.fixture(scope="module")
def corner_teacher():
    return trained_corner_teacher()


def test_a_trained_teacher_draws_the_requested_class_and_without_a_label_all_classes(corner_teacher):
    labels = torch.arange(4).repeat(50)
    noise = SeededNoise(range(200), (1, 8, 8))
    x, _ = corner_teacher.sample("ddim", labels, noise, 8)
    accuracy = (corner_of(x) == labels).float().mean().item()
    assert accuracy > 0.9, accuracy
    free, _ = corner_teacher.sample("ddim", None, SeededNoise(range(200), (1, 8, 8)), 8)
    counts = torch.bincount(corner_of(free), minlength=4)
    assert (counts > 20).all(), counts  # unconditional: every class, none dominant
    guided, _ = corner_teacher.sample("ddim", labels, SeededNoise(range(200), (1, 8, 8)), 16, guidance=1.0)
    assert (corner_of(guided) == labels).float().mean().item() >= accuracy - 0.02


@pytest.mark.parametrize("method", [m for m, e in METHODS.items() if e.teacher == "diffusion"])
def test_every_diffusion_student_inherits_the_label(corner_teacher, method):
    teacher = copy.deepcopy(corner_teacher)
    student = make_method(method, METHODS[method].params(), teacher)
    assert student.train_keys[-1] == "label"
    nets = student.build()
    batch = corner_data(8, seed=1)
    loss = student.loss(nets, batch, torch.Generator().manual_seed(0))
    assert loss.shape == (8,) and torch.isfinite(loss).all()
    net = nets["student"]
    embeds = [m for m in net.modules() if isinstance(m, torch.nn.Embedding)]
    assert len(embeds) == 1 and torch.equal(embeds[0].weight, teacher.denoiser.net.label_embed.weight)
    # the student starts as the teacher: its few-step samples already follow the label
    nfe = student.nfe_choices()[-1]
    labels = torch.arange(4).repeat(16)
    x, used = Student(student, net.eval()).sample("student", labels, SeededNoise(range(64), (1, 8, 8)), nfe)
    assert used == nfe
    assert (corner_of(x) == labels).float().mean().item() > 0.5
