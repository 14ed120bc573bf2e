"""One registry feeds the schema, the stages and evaluation: a throw-away method registered
with one line (tests/helpers.py) is validated like the shipped ones and gets its
distill@ / evaluate@ stages from dvc.yaml (the contract tests train it too)."""
import shutil
from contextlib import chdir

import pytest
import yaml

from pipeline.config.schema import ConfigError, parse_params
from pipeline.distill import METHODS, name_of
from tests.conftest import ROOT
from tests.helpers import THROWAWAY, ThrowawayParams


def with_throwaway(**block):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["distill"]["methods"]["throwaway"] = "diffusion"
    raw["distill"]["throwaway"] = {**THROWAWAY.params().model_dump(mode="json"), **block}
    raw["evaluate"]["models"].append("throwaway")
    return raw


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(METHODS, "throwaway", THROWAWAY)


def test_a_registered_method_is_validated_like_the_others(registered):
    params = parse_params(with_throwaway(sigma=40.0))
    assert isinstance(params.distill.throwaway, ThrowawayParams) and params.distill.throwaway.sigma == 40.0
    assert name_of(params.distill.throwaway) == "throwaway"
    with pytest.raises(ConfigError, match=r"distill\.throwaway\.bogus"):
        parse_params(with_throwaway(bogus=1))
    with pytest.raises(ConfigError, match=r"distill\.throwaway\.sigma"):
        parse_params(with_throwaway(sigma=-1.0))
    raw = with_throwaway()
    raw["distill"]["methods"]["throwaway"] = "bridge"
    with pytest.raises(ConfigError, match="throwaway distils 'diffusion'"):
        parse_params(raw)


def test_an_unregistered_method_is_refused():
    with pytest.raises(ConfigError, match="distill.methods"):
        parse_params(with_throwaway())


def test_dvc_yaml_lists_its_stages(registered, tmp_path):
    from dvc.repo import Repo
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(with_throwaway()))
    with chdir(tmp_path):
        repo = Repo.init(str(tmp_path), no_scm=True)
        (distill,) = repo.stage.collect("distill@throwaway")
        (evaluate,) = repo.stage.collect("evaluate@throwaway")
    deps = {d.def_path for d in distill.deps}
    assert {"models/diffusion.pt", "pipeline/distill/throwaway.py"} <= deps
    assert [list(d.params) for d in distill.deps if getattr(d, "params", None)] == [
        ["seed", "ray", "distill.throwaway"]]
    assert [o.def_path for o in distill.outs] == ["models/throwaway.pt"]
    assert "models/throwaway.pt" in {d.def_path for d in evaluate.deps}
