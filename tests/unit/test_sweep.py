"""Sweep files: parsing, the checks against params and the stage, overrides, the reproduce
command, the trials table; and every shipped sweep under sweeps/ against the real project."""
import math
import shlex

import pandas as pd
import pytest
import yaml

from pipeline.tuning.sweep import (Dimension, SweepError, SweepSpec, apply_overrides, best_trial, check_spec,
                            dvc_exp_command, load_spec, max_steps, reproduced_overrides, trials_table)
from pipeline.tuning.trial import TrialSetup, trial_overrides
from tests.conftest import ROOT

IBMD_SECTIONS = ["seed", "ray", "distill.ibmd"]


@pytest.fixture
def raw():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def spec(**kwargs):
    base = {"stage": "distill@ibmd", "space": {"distill.ibmd.train.lr": {"loguniform": [1e-4, 1e-2]}}}
    return SweepSpec.model_validate({**base, **kwargs})


def test_a_dimension_is_exactly_one_kind():
    assert Dimension(grid=[1, 2]).kind == "grid"
    with pytest.raises(ValueError, match="exactly one"):
        Dimension(grid=[1], choice=[2])
    with pytest.raises(ValueError, match="low < high"):
        Dimension(uniform=(1.0, 0.5))
    with pytest.raises(ValueError, match="low > 0"):
        Dimension(loguniform=(0.0, 1.0))


def test_load_spec_names_the_file_and_key(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("stage: distill@ibmd\nspace:\n  distill.ibmd.train.lr: {uniform: [1, 0]}\nbogus: 1\n")
    with pytest.raises(SweepError) as err:
        load_spec(path)
    assert f"{path}: space.distill.ibmd.train.lr" in str(err.value) and "bogus" in str(err.value)
    with pytest.raises(SweepError, match="no such sweep file"):
        load_spec(tmp_path / "missing.yaml")


def test_check_spec_accepts_a_valid_sweep_and_applies_fixed(raw):
    params = check_spec(spec(fixed={"distill.ibmd.train.steps": 50}), raw, IBMD_SECTIONS)
    assert params.distill.ibmd.train.steps == 50
    assert params.distill.ibmd.train.lr == raw["distill"]["ibmd"]["train"]["lr"]  # searched, not set


@pytest.mark.parametrize("space, message", [
    ({"distill.mm.train.lr": {"choice": [0.1]}}, "not a parameter of stage distill@ibmd"),
    ({"distill.ibmd.train.lrr": {"choice": [0.1]}}, "no such key in params"),
    ({"distill.ibmd.train": {"choice": [1]}}, "is a section"),
    ({"distill.ibmd.aux_updates": {"grid": [5, 0]}}, "distill.ibmd.aux_updates=0"),
    ({"distill.ibmd.train.lr": {"loguniform": [1e-4, 3.0]}}, "distill.ibmd.train.lr=3.0"),
    ({"distill.ibmd.train.steps": {"uniform": [10.5, 20]}}, "needs integer bounds"),
])
def test_check_spec_rejects_what_the_stage_or_schema_would(raw, space, message):
    with pytest.raises(SweepError, match=message.replace(".", r"\.").replace("[", r"\[")):
        check_spec(spec(space=space), raw, IBMD_SECTIONS)


def test_check_spec_rejects_invalid_fixed_values(raw):
    with pytest.raises(SweepError, match="fixed.*distill.ibmd.train.steps"):
        check_spec(spec(fixed={"distill.ibmd.train.steps": 0}), raw, IBMD_SECTIONS)
    with pytest.raises(ValueError, match="both searched and fixed"):
        spec(fixed={"distill.ibmd.train.lr": 0.1})


def test_apply_overrides_copies(raw):
    out = apply_overrides(raw, {"distill.mm.nfe": [2], "seed": 3})
    assert out["distill"]["mm"]["nfe"] == [2] and out["seed"] == 3
    assert raw["distill"]["mm"]["nfe"] == [4, 8] and raw["seed"] == 0


def test_dvc_exp_command_round_trips_through_the_shell_and_yaml():
    overrides = {"distill.mm.nfe": [4, 8], "distill.ibmd.train.lr": 0.00031622776601683794,
                 "distill.ibmd.aux_term": False, "distill.tdd.s_ratio": 0.0, "ray.num_workers": 2}
    args = shlex.split(dvc_exp_command(overrides))
    assert args[:3] == ["dvc", "exp", "run"]
    pairs = [a.split("=", 1) for a in args[4::2]]
    assert args[3::2] == ["-S"] * len(overrides)
    assert {k: yaml.safe_load(v) for k, v in pairs} == overrides


def test_trials_counts_grid_combinations():
    s = spec(space={"distill.ibmd.aux_updates": {"grid": [1, 2, 5]}, "distill.ibmd.nfe": {"grid": [1, 2]},
                    "distill.ibmd.train.lr": {"uniform": [0.001, 0.01]}}, num_samples=4)
    assert s.trials() == 3 * 2 * 4


def test_trial_overrides_round_integers_and_checkpoint_at_each_evaluation(raw, tmp_path):
    s = spec(space={"distill.ibmd.train.steps": {"uniform": [100, 300]}}, eval_every=25,
             fixed={"distill.ibmd.aux_updates": 2})
    setup = TrialSetup("s", s, raw, "", None, "", "", "", "")
    out = trial_overrides(setup, {"distill.ibmd.train.steps": 150.6})
    assert out == {"distill.ibmd.aux_updates": 2, "distill.ibmd.train.steps": 151,
                   "distill.ibmd.train.checkpoint_every": 25}
    assert max_steps(s, raw, "distill.ibmd") == 300
    # The reproduce command leaves out what changes no result: the cadence of checkpoints/logs.
    s2 = spec(fixed={"distill.ibmd.train.log_every": 5, "distill.ibmd.train.steps": 40})
    assert reproduced_overrides(s2, {"distill.ibmd.train.lr": 0.01}) == {
        "distill.ibmd.train.steps": 40, "distill.ibmd.train.lr": 0.01}


def test_trials_table_ranks_finished_trials_first_and_picks_the_best():
    s = spec()
    rows = [
        {"trial_id": "a", "config": {"distill.ibmd.train.lr": 1e-3}, "fid": 0.5, "step": 100, "error": False},
        {"trial_id": "b", "config": {"distill.ibmd.train.lr": 1e-2}, "fid": 0.9, "step": 300, "error": False},
        {"trial_id": "c", "config": {"distill.ibmd.train.lr": 3e-3}, "fid": 0.7, "step": 300, "error": False},
        {"trial_id": "d", "config": {"distill.ibmd.train.lr": 1e-4}, "error": True},
    ]
    table = trials_table(rows, s, steps=300)
    assert list(table["trial_id"]) == ["c", "b", "a", "d"]
    assert list(table["status"]) == ["finished", "finished", "stopped", "error"]
    assert math.isnan(table.loc[3, "fid"])
    assert best_trial(table, s)["trial_id"] == "c"  # a's 0.5 is from a third of the steps
    acc = spec(stage="features", objective={"metric": "accuracy"},
               space={"features.train.lr": {"uniform": [0.001, 0.01]}})
    rows = [{"trial_id": t, "config": {"features.train.lr": 0.01}, "accuracy": a, "step": 10, "error": False}
            for t, a in (("x", 0.9), ("y", 0.95))]
    assert best_trial(trials_table(rows, acc, steps=10), acc)["trial_id"] == "y"
    with pytest.raises(SweepError, match="no trial finished"):
        best_trial(pd.DataFrame(trials_table(rows, acc, steps=11)), acc)


def test_search_space_maps_each_kind():
    from ray import tune

    from pipeline.tuning.tuner import search_space
    s = spec(space={"distill.ibmd.aux_updates": {"grid": [2, 5]}, "distill.ibmd.nfe": {"choice": [1, 2]},
                    "distill.ibmd.train.steps": {"loguniform": [10, 1000]},
                    "distill.ibmd.train.lr": {"loguniform": [1e-4, 1e-2]}})
    space = search_space(s.space, integers={"distill.ibmd.train.steps"})
    assert space["distill.ibmd.aux_updates"] == tune.grid_search([2, 5])
    assert space["distill.ibmd.nfe"].categories == [1, 2]
    steps = [space["distill.ibmd.train.steps"].sample() for _ in range(50)]
    assert all(isinstance(v, int) and 10 <= v <= 1000 for v in steps)
    lrs = [space["distill.ibmd.train.lr"].sample() for _ in range(50)]
    assert all(1e-4 <= v <= 1e-2 for v in lrs) and min(lrs) < 1e-3 < max(lrs)


@pytest.mark.parametrize("path", sorted((ROOT / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweeps_fit_the_project(path, raw):
    """Each example sweep parses and checks against params.yaml and its stage's dvc.yaml params."""
    from dvc.repo import Repo
    s = load_spec(path)
    (stage,) = Repo(str(ROOT)).stage.collect(s.stage)
    sections = [k for d in stage.deps if getattr(d, "params", None) for k in d.params]
    check_spec(s, raw, sections, source=path.name)
    assert 2 <= s.trials() and s.eval_every <= max_steps(s, raw, s.stage.replace("@", "."))
