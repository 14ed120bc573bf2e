"""Streaming training data (pipeline.data.stream, `ray.buffer_shards`): a worker holds only
its share of the shards, K at a time; with the whole share resident it draws exactly what
the in-memory loader draws; the schedule is a function of the step, so a resumed run picks
up the buffer it was on; ranks own disjoint shards."""
import pytest
import torch

from pipeline.data import DataError
from pipeline.data.prepare import prepare_dataset
from pipeline.data.shards import load_split
from pipeline.data.stream import ShardStream, TrainData
from pipeline.config.settings import DiffusionTeacherParams, DigitsSource, SuperResolution, TrainParams, UNetParams
from pipeline.models.teachers import DataShape, DiffusionTeacherTask
from pipeline.training.loop import LoopHooks, run_training

pytestmark = pytest.mark.scale


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("stream") / "prepared"
    prepare_dataset(DigitsSource(), SuperResolution(factor=2), n_test=100, shard_size=100, seed=0, out_dir=out,
                    n_reference=100)
    return out  # 1,597 training digits in 16 shards


def train(data, steps=30, resume_at=None):
    task = DiffusionTeacherTask(DiffusionTeacherParams(net=UNetParams(channels=(8,), emb_dim=16)),
                                DataShape(1, 8, True))
    params = TrainParams(steps=steps, batch_size=16, lr=1e-3, warmup_steps=0, log_every=10, checkpoint_every=10)
    return run_training(task, data, params, seed=3, hooks=LoopHooks())


def test_whole_share_resident_draws_exactly_what_the_in_memory_loader_draws(prepared):
    in_memory = train(TrainData(str(prepared), "train", ("x0", "y"))())
    streamed = train(TrainData(str(prepared), "train", ("x0", "y"), buffer_shards=16)())
    for k, v in in_memory["nets"]["denoiser"].items():
        assert torch.equal(v, streamed["nets"]["denoiser"][k]), k


def test_a_worker_holds_at_most_k_shards_and_visits_its_whole_share(prepared):
    stream = ShardStream(prepared, "train", ("x0", "y"), buffer_shards=2, seed=0)
    g = torch.Generator().manual_seed(0)
    seen, sizes = set(), set()
    per_buffer = stream.steps_per_buffer(16)
    for step in range(0, per_buffer * stream.buffers_per_pass, per_buffer):
        batch = stream.batch(step, 16, g, "cpu")
        assert batch["x0"].shape == (16, 1, 8, 8) and -1 <= batch["x0"].min() <= batch["x0"].max() <= 1
        resident = stream.shards_at(step, 16)
        sizes.add(len(resident))
        seen |= set(resident)
        assert len(stream._tensors["x0"]) <= 2 * 100  # K shards of 100 samples
    assert seen == set(range(16)) and sizes == {2}  # one pass: every shard, two at a time
    whole = load_split(prepared, "train")
    assert any(torch.equal(batch["x0"][0], x) for x in whole.x0)  # the samples are the split's


def test_the_schedule_is_a_function_of_the_step(prepared):
    a = ShardStream(prepared, "train", ("x0",), buffer_shards=3, seed=1)
    b = ShardStream(prepared, "train", ("x0",), buffer_shards=3, seed=1)
    steps = [0, 5, 17, 40, 41, 200, 999]
    assert [a.shards_at(s, 16) for s in steps] == [b.shards_at(s, 16) for s in reversed(steps)][::-1]
    passes = {a.shards_at(s * a.steps_per_buffer(16), 16) for s in range(3 * a.buffers_per_pass)}
    assert len(passes) > a.buffers_per_pass  # each pass draws its own order


def test_ranks_own_disjoint_shares(prepared):
    shares = [ShardStream(prepared, "train", ("x0",), 2).for_rank(r, 3).share for r in range(3)]
    assert sorted(i for share in shares for i in share) == list(range(16))
    with pytest.raises(DataError, match="at least one shard per worker"):
        ShardStream(prepared, "train", ("x0",), 2).for_rank(0, 17)


def test_a_streamed_run_trains_and_its_result_depends_on_k(prepared):
    k2 = train(TrainData(str(prepared), "train", ("x0", "y"), buffer_shards=2)(), steps=60)
    k16 = train(TrainData(str(prepared), "train", ("x0", "y"), buffer_shards=16)(), steps=60)
    assert k2["step"] == 60
    assert any(not torch.equal(v, k16["nets"]["denoiser"][k]) for k, v in k2["nets"]["denoiser"].items())
