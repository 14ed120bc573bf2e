"""Evaluation plumbing: NFE planning, per-sample seeds (results independent of the
shard layout and batch size), jobs split per (sampler, nfe) giving the very same samples,
and the report's Pareto front."""
import pandas as pd
import pytest
import torch

from pipeline.checkpoint import save_checkpoint
from pipeline.data.shards import write_manifest, write_split
from pipeline.evaluation import merge_shards, plan, sample_shard, shard_jobs, split_by_plan
from pipeline.report import pareto_front, student_comparison
from pipeline.settings import DiffusionTeacherParams, UNetParams
from pipeline.teachers import DataShape, DiffusionTeacherTask, teacher_config


def test_plan_uses_reachable_nfe_only():
    jobs = plan("diffusion", ["euler", "heun"], [1, 2, 4, 8])
    assert [n for s, n in jobs if s == "euler"] == [1, 2, 4, 8]
    assert [n for s, n in jobs if s == "heun"] == [1, 3, 7]  # 2N-1, duplicates dropped
    guided = plan("diffusion", ["euler"], [1, 2, 4], guidance=2.0)
    assert guided == [("euler", 2), ("euler", 4)]  # CFG costs 2 per step: 1 buys nothing


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    shape = DataShape(1, 8, True)
    params = DiffusionTeacherParams(net=UNetParams(channels=(8,), emb_dim=16))
    den = DiffusionTeacherTask(params, shape).build()["denoiser"]
    torch.nn.init.normal_(den.net.head[-1].weight, std=0.1)  # non-trivial outputs
    save_checkpoint(root / "m.pt", "teacher_diffusion", teacher_config("diffusion", params, shape),
                    {"denoiser": den.state_dict()})
    n = 10
    x0 = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8)
    (root / "data").mkdir()
    entry = write_split(root / "data", "test", x0, torch.rand(n, 1, 8, 8) * 2 - 1,
                        torch.zeros(n, dtype=torch.int64), shard_size=4)
    write_manifest(root / "data", {"splits": {"test": entry}, "x0_shape": [1, 8, 8], "y_shape": [1, 8, 8],
                                   "conditional": True, "num_classes": 1})
    return root


@pytest.mark.parametrize("shards, batch", [(3, 2), (2, 10)])
def test_samples_do_not_depend_on_shards_or_batch_size(tiny_setup, shards, batch):
    jobs = [("ddpm", 3), ("heun", 3)]
    args = (tiny_setup / "m.pt", tiny_setup / "data", 10)
    one = merge_shards([sample_shard(j) for j in shard_jobs(*args, 1, jobs, 7, 0.0, 10)])
    many = merge_shards([sample_shard(j) for j in shard_jobs(*args, shards, jobs, 7, 0.0, batch)])
    for key in one:
        # Equal up to float round-off: conv kernels sum in a batch-size-dependent order.
        assert torch.allclose(one[key][0], many[key][0], atol=1e-3), key
        assert one[key][0].abs().max() <= 1.0  # clipped alike for every model
    other_seed = merge_shards([sample_shard(j) for j in shard_jobs(*args, 1, jobs, 8, 0.0, 10)])
    assert not torch.allclose(one[("ddpm", 3)][0], other_seed[("ddpm", 3)][0])


def test_jobs_split_per_plan_item_give_the_same_samples(tiny_setup):
    jobs = [("ddpm", 3), ("heun", 3), ("euler", 2)]
    shards = shard_jobs(tiny_setup / "m.pt", tiny_setup / "data", 10, 2, jobs, 7, 0.0, 3)
    split = split_by_plan(shards)
    assert [(j.plan, j.start) for j in split[:2]] == [((("ddpm", 3),), 0), ((("ddpm", 3),), 5)]
    assert len(split) == len(jobs) * len(shards)
    whole = merge_shards([sample_shard(j) for j in shards])
    pieces = merge_shards([sample_shard(j) for j in split])
    assert list(pieces) == list(whole) == jobs
    for key in whole:
        assert torch.equal(pieces[key][0], whole[key][0]), key  # bit for bit, not just close


def test_pareto_front_keeps_only_undominated_points():
    table = pd.DataFrame({"model": ["a", "a", "b", "b", "c"], "nfe": [1, 4, 1, 2, 8],
                          "fid": [10.0, 3.0, 12.0, 5.0, 4.0]})
    front = pareto_front(table)
    assert list(zip(front["nfe"], front["fid"])) == [(1, 10.0), (2, 5.0), (4, 3.0)]


def test_student_comparison_against_its_own_teacher():
    t = dict(method="teacher", sampler="ddim")
    table = pd.DataFrame([
        {**t, "model": "diffusion", "teacher": "diffusion", "nfe": 1, "fid": 9.0, "sec_per_sample": 1.0},
        {**t, "model": "diffusion", "teacher": "diffusion", "nfe": 8, "fid": 2.0, "sec_per_sample": 8.0},
        {**t, "model": "diffusion", "teacher": "diffusion", "nfe": 32, "fid": 1.0, "sec_per_sample": 32.0},
        {**t, "model": "bridge", "teacher": "bridge", "nfe": 1, "fid": 0.1, "sec_per_sample": 1.0},
        {"model": "mm", "method": "mm", "teacher": "diffusion", "sampler": "student", "nfe": 4,
         "fid": 1.5, "sec_per_sample": 2.0},
        {"model": "pd", "method": "pd", "teacher": "diffusion", "sampler": "student", "nfe": 2,
         "fid": 0.5, "sec_per_sample": 1.0},
    ])
    rows = student_comparison(table).set_index("model")
    mm = rows.loc["mm"]
    assert mm["teacher_best_fid"] == 1.0 and mm["vs_best"] == 1.5  # the bridge's 0.1 is not its teacher
    assert mm["teacher_fid_le_nfe"] == 9.0  # the teacher's best with at most 4 NFE
    assert mm["teacher_nfe_same_fid"] == 32 and mm["speedup"] == 16.0  # 32 s / 2 s
    assert pd.isna(rows.loc["pd", "speedup"])  # no teacher point is as good
