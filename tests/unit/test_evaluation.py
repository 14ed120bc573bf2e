"""Evaluation plumbing: NFE planning, per-sample seeds (results independent of the
shard layout and batch size), and jobs split per (sampler, nfe) giving the very same
samples."""
import pytest
import torch

from pipeline.models.checkpoint import save_checkpoint
from pipeline.data.shards import write_manifest, write_split
from pipeline.evaluation.sampling import merge_shards, plan, sample_shard, shard_jobs, split_by_plan
from pipeline.config.settings import DiffusionTeacherParams, UNetParams
from pipeline.models.teachers import DataShape, DiffusionTeacherTask, teacher_config


def test_plan_uses_reachable_nfe_only():
    jobs = plan("diffusion", ["euler", "heun"], [1, 2, 4, 8])
    assert [n for s, n in jobs if s == "euler"] == [1, 2, 4, 8]
    assert [n for s, n in jobs if s == "heun"] == [1, 3, 7]  # 2N-1, duplicates dropped
    guided = plan("diffusion", ["euler"], [1, 2, 4], guidance=2.0)
    assert guided == [("euler", 2), ("euler", 4)]  # CFG costs 2 per step: 1 buys nothing


def test_max_nfe_caps_only_the_named_sampler():
    jobs = plan("diffusion", ["euler", "heun"], [1, 2, 4, 8, 16, 32], max_nfe={"heun": 16})
    assert [n for s, n in jobs if s == "euler"] == [1, 2, 4, 8, 16, 32]
    assert [n for s, n in jobs if s == "heun"] == [1, 3, 7, 15]  # 31 would exceed the cap


def test_max_nfe_names_only_samplers_of_the_family():
    from pydantic import ValidationError

    from pipeline.config.settings import EvaluateParams
    assert EvaluateParams(max_nfe={"bridge": {"posterior_ode": 8}}).max_nfe.bridge == {"posterior_ode": 8}
    with pytest.raises(ValidationError, match="unknown or repeated sampler"):
        EvaluateParams(max_nfe={"bridge": {"dpmpp_2m": 8}})  # a diffusion sampler
    with pytest.raises(ValidationError, match="at least 1 NFE"):
        EvaluateParams(max_nfe={"diffusion": {"ddim": 0}})


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
    one = merge_shards([sample_shard(j) for j in shard_jobs(*args, 1, jobs, [7], 0.0, 10)])
    many = merge_shards([sample_shard(j) for j in shard_jobs(*args, shards, jobs, [7], 0.0, batch)])
    for key in one:
        # Equal up to float round-off: conv kernels sum in a batch-size-dependent order.
        assert torch.allclose(one[key][0], many[key][0], atol=1e-3), key
        assert one[key][0].abs().max() <= 1.0  # clipped alike for every model
    other_seed = merge_shards([sample_shard(j) for j in shard_jobs(*args, 1, jobs, [8], 0.0, 10)])
    assert not torch.allclose(one[("ddpm", 3, 7)][0], other_seed[("ddpm", 3, 8)][0])


def test_jobs_split_per_plan_item_give_the_same_samples(tiny_setup):
    jobs = [("ddpm", 3), ("heun", 3), ("euler", 2)]
    shards = shard_jobs(tiny_setup / "m.pt", tiny_setup / "data", 10, 2, jobs, [7], 0.0, 3)
    split = split_by_plan(shards)
    assert [(j.plan, j.start) for j in split[:2]] == [((("ddpm", 3),), 0), ((("ddpm", 3),), 5)]
    assert len(split) == len(jobs) * len(shards)
    whole = merge_shards([sample_shard(j) for j in shards])
    pieces = merge_shards([sample_shard(j) for j in split])
    assert list(pieces) == list(whole) == [(s, n, 7) for s, n in jobs]
    for key in whole:
        assert torch.equal(pieces[key][0], whole[key][0]), key  # bit for bit, not just close
