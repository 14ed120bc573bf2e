"""The research-scale profiles (profiles/*.yaml): each is a complete, valid params file sized for
GPUs, and every stage of the pipeline it defines accepts it (README, "Profiles")."""
import os
import shutil
import subprocess
import sys
from contextlib import chdir

import pytest
import torch
import yaml

from pipeline.config.schema import load_params
from pipeline.models.teachers import TEACHERS, DataShape
from tests.conftest import ROOT
from tests.unit.test_params_file import leaves

pytestmark = pytest.mark.scale

PROFILES = sorted((ROOT / "profiles").glob("*.yaml"))


def test_there_are_the_three_profiles_the_readme_names():
    assert [p.name for p in PROFILES] == ["cifar10-class.yaml", "cifar10-sr4.yaml", "edges2handbags-64.yaml"]
    readme = (ROOT / "README.md").read_text()
    assert all(f"profiles/{p.name}" in readme for p in PROFILES)


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_a_profile_is_valid_and_spells_out_every_field(profile):
    raw = yaml.safe_load(profile.read_text())
    resolved = load_params(profile).model_dump(mode="json")
    missing = sorted(set(leaves(resolved)) - set(leaves(raw)))
    assert not missing, f"{profile.name} lacks these fields of the schema: {missing}"


def used_teachers(params):
    return sorted({*params.distill.methods.values(), *(m for m in params.evaluate.models if m in TEACHERS)})


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_a_profile_is_sized_for_gpus(profile):
    params = load_params(profile)
    assert params.ray.use_gpu and params.ray.num_workers >= 2 and params.ray.compute.precision == "bf16"
    assert params.features.extractor == "inception" and params.evaluate.n_samples >= 10_000
    assert params.evaluate.device == "cuda"
    c, size, _ = params.data.source.image_shape
    shape = DataShape(c, size, params.corruption.conditional, 10 if params.corruption.class_conditional else 0)
    for name in used_teachers(params):
        section = getattr(params.teacher, name)
        assert 16 in section.net.attention, f"{profile.name}: teacher.{name} has no attention at 16x16"
        with torch.device("meta"):  # sizes only, no memory
            net = TEACHERS[name][1](section, shape).build()["denoiser"]
        count = sum(p.numel() for p in net.parameters())
        assert 10e6 <= count < 100e6, f"{profile.name}: teacher.{name} has {count / 1e6:.1f}M parameters"


@pytest.mark.slow
@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_every_stage_dry_runs_with_the_profile(tmp_path, profile):
    """`python stages/<stage>.py ... --dry-run` for every stage DVC resolves from the profile."""
    from dvc.repo import Repo
    for name in ("pipeline", "stages", "pretrained"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(profile, tmp_path / "params.yaml")
    with chdir(tmp_path):
        stages = Repo.init(str(tmp_path), no_scm=True).index.stages
    names = sorted(s.name for s in stages)
    params = load_params(profile)
    assert {f"distill@{m}" for m in params.distill.methods} | {f"evaluate@{m}" for m in params.evaluate.models} \
        <= set(names)
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    for stage in stages:
        out = subprocess.run(f"{stage.cmd} --dry-run", shell=True, cwd=tmp_path, env=env, capture_output=True,
                             text=True)
        assert out.returncode == 0, f"{stage.name}: {out.stderr[-2000:]}"
        assert yaml.safe_load(out.stdout), f"{stage.name} printed no params"
