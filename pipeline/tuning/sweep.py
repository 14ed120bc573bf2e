"""Hyper-parameter sweeps of one training stage: the spec, its checks, the results.

A sweep file (YAML under sweeps/) names a training stage (`features`,
`teacher@<name>`, `distill@<method>`), a search space over params keys of that
stage, fixed overrides, and the objective: a quick evaluation (FID at a target
NFE on the first `n_samples` test images, or the classifier's test accuracy
for `features`) computed at every `eval_every` training steps. ASHA stops weak
trials at those points. Every value the space can produce is checked against
the params schema before anything starts.

A trial (pipeline.tuning.trial) runs the stage's own training job; the Ray side
(Tuner, ASHA, restore) is in pipeline.tuning.tuner; pipeline.tuning.driver runs a whole sweep.
"""
import copy
import math
import shlex
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import Field, ValidationError, model_validator

from pipeline.config.schema import ConfigError, format_errors, parse_params
from pipeline.config.settings import Params
from pipeline.errors import PipelineError

MODES = {"fid": "min", "kid": "min", "accuracy": "max"}


class SweepError(PipelineError, ValueError):
    """A sweep file that is missing, invalid, or does not fit the params or the stage."""


class Dimension(Params):
    """One axis of the search space: exactly one of the four kinds."""
    choice: Optional[list[Any]] = Field(None, min_length=1)  # sampled uniformly
    grid: Optional[list[Any]] = Field(None, min_length=1)  # every value, in every trial set
    uniform: Optional[tuple[float, float]] = None  # [low, high]
    loguniform: Optional[tuple[float, float]] = None  # [low, high], low > 0

    @model_validator(mode="after")
    def _one_kind(self):
        given = [k for k in ("choice", "grid", "uniform", "loguniform") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of choice, grid, uniform, loguniform (got {given or 'none'})")
        bounds = self.uniform or self.loguniform
        if bounds and not bounds[0] < bounds[1]:
            raise ValueError(f"needs low < high, got {list(bounds)}")
        if self.loguniform and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform needs low > 0, got {list(self.loguniform)}")
        return self

    @property
    def kind(self):
        return next(k for k in ("choice", "grid", "uniform", "loguniform") if getattr(self, k) is not None)

    def candidates(self):
        """The values checked against the schema: every listed value, or both bounds."""
        return list(getattr(self, self.kind))


class Objective(Params):
    metric: Literal["fid", "kid", "accuracy"] = "fid"
    nfe: Optional[int] = Field(None, ge=1)  # None: a student's smallest distilled NFE
    sampler: Optional[str] = None  # teachers (required): a sampler of the teacher's family
    n_samples: int = Field(200, ge=2)  # the first n test images
    batch_size: int = Field(100, ge=1)

    @property
    def mode(self):
        return MODES[self.metric]


class Asha(Params):
    grace_steps: int = Field(100, ge=1)  # no trial stops before this many training steps
    reduction_factor: float = Field(3.0, gt=1.0)


class SweepSpec(Params):
    stage: str
    objective: Objective = Objective()
    space: dict[str, Dimension] = Field(min_length=1)
    fixed: dict[str, Any] = {}
    num_samples: int = Field(1, ge=1)  # random draws; a grid is crossed with each draw
    eval_every: int = Field(100, ge=1)  # training steps between quick evaluations
    scheduler: Optional[Asha] = Asha()  # null: every trial runs to the end
    max_concurrent_trials: Optional[int] = Field(None, ge=1)  # null: as many as the cluster fits
    seed: int = Field(0, ge=0)  # of the random search

    def trials(self):
        """How many trials the sweep runs: each grid combination num_samples times."""
        return self.num_samples * math.prod(len(d.grid) for d in self.space.values() if d.kind == "grid")

    @model_validator(mode="after")
    def _disjoint(self):
        both = sorted(set(self.space) & set(self.fixed))
        if both:
            raise ValueError(f"keys both searched and fixed: {both}")
        return self


def load_spec(path) -> SweepSpec:
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"{path}: no such sweep file")
    try:
        raw = yaml.safe_load(path.read_text())
        return SweepSpec.model_validate(raw if isinstance(raw, dict) else {})
    except yaml.YAMLError as err:
        raise SweepError(f"{path}: not valid YAML ({err})") from None
    except ValidationError as err:
        raise SweepError(format_errors(err, str(path))) from None


# --- params overrides -----------------------------------------------------------

def get_key(raw, key):
    node = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def apply_overrides(raw, overrides):
    """A deep copy of the params dict `raw` with dotted `overrides` set (keys must exist)."""
    out = copy.deepcopy(raw)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node[part]
        node[leaf] = copy.deepcopy(value)
    return out


def _yaml_value(value):
    """A value as `dvc exp run -S` parses it (YAML flow style)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("...").strip()


def dvc_exp_command(overrides):
    """`dvc exp run -S key=value ...`: reruns the pipeline with these params."""
    args = ["dvc", "exp", "run"]
    for key, value in overrides.items():
        args += ["-S", f"{key}={_yaml_value(value)}"]
    return " ".join(shlex.quote(a) for a in args)


def reproduced_overrides(spec: SweepSpec, config):
    """What `dvc exp run` must set to train what the trial trained: the fixed overrides and
    the trial's values, without the checkpoint/log cadence (it does not change results)."""
    cadence = (".train.checkpoint_every", ".train.log_every")
    fixed = {k: v for k, v in spec.fixed.items() if not k.endswith(cadence)}
    return {**fixed, **config}


# --- checks before anything starts -------------------------------------------------

def _params_error(raw, overrides, where):
    try:
        parse_params(apply_overrides(raw, overrides))
    except ConfigError as err:
        return f"{where}: {err}"
    return None


def check_spec(spec: SweepSpec, raw, sections, source="sweep"):
    """Every key belongs to the stage (one of its dvc.yaml params `sections`) and exists in
    params; the fixed overrides and every value of every axis pass the params schema.
    Returns the validated base params of the trials (params + fixed)."""
    errors = []
    for group, keys in (("space", spec.space), ("fixed", spec.fixed)):
        for key in keys:
            if not any(key == s or key.startswith(s + ".") for s in sections):
                errors.append(f"{source}: {group}.{key}: not a parameter of stage {spec.stage} "
                              f"(its params: {', '.join(sections)})")
                continue
            try:
                value = get_key(raw, key)
            except KeyError:
                errors.append(f"{source}: {group}.{key}: no such key in params")
                continue
            if isinstance(value, dict):
                errors.append(f"{source}: {group}.{key}: is a section; name a single setting in it")
    if errors:
        raise SweepError("\n".join(errors))
    base_error = _params_error(raw, spec.fixed, f"{source}: fixed")
    if base_error:
        raise SweepError(base_error)
    integers = integer_keys(spec, raw)
    for key, dim in spec.space.items():
        if key in integers and not all(float(b).is_integer() for b in dim.candidates()):
            errors.append(f"{source}: space.{key}: an integer setting needs integer bounds, got {dim.candidates()}")
        for value in dim.candidates():
            value = int(value) if key in integers else value
            problem = _params_error(raw, {**spec.fixed, key: value}, f"{source}: space.{key}={value!r}")
            if problem:
                errors.append(problem)
    if errors:
        raise SweepError("\n".join(errors))
    return parse_params(apply_overrides(raw, spec.fixed))


def integer_keys(spec, raw):
    """Range axes over integer settings (sampled as integers)."""
    def integer(value):
        return isinstance(value, int) and not isinstance(value, bool)
    return {k for k, d in spec.space.items() if d.kind in ("uniform", "loguniform")
            and integer(get_key(raw, k))}


def max_steps(spec, raw, stage_section):
    """The most training steps any trial can run (ASHA's max_t)."""
    key = f"{stage_section}.train.steps"
    if key in spec.space:
        return int(max(spec.space[key].candidates()))
    return int(spec.fixed.get(key, get_key(raw, key)))


# --- results ---------------------------------------------------------------------

def trials_table(rows, spec: SweepSpec, steps):
    """pandas table, best first: trial_id, status, the metric, nfe, step, mlflow_run_id and
    one column per searched key. `status` is finished / stopped (by ASHA) / error."""
    import pandas as pd
    metric = spec.objective.metric
    records = []
    for r in rows:
        status = "error" if r.get("error") else ("finished" if r.get("step", 0) >= steps else "stopped")
        records.append({"trial_id": r["trial_id"], "status": status, metric: r.get(metric, math.nan),
                        "nfe": r.get("nfe", math.nan), "step": r.get("step", 0),
                        "mlflow_run_id": r.get("mlflow_run_id", ""),
                        **{k: r["config"].get(k) for k in spec.space}})
    table = pd.DataFrame.from_records(records, columns=["trial_id", "status", metric, "nfe", "step",
                                                        "mlflow_run_id", *spec.space])
    rank = table["status"].map({"finished": 0, "stopped": 1, "error": 2})
    table = table.assign(_rank=rank).sort_values(["_rank", metric], ascending=[True, spec.objective.mode == "min"])
    return table.drop(columns="_rank").reset_index(drop=True)


def best_trial(table, spec: SweepSpec):
    """The best finished trial (a stopped trial's metric is from fewer steps): a table row."""
    done = table[(table["status"] == "finished") & table[spec.objective.metric].notna()]
    if done.empty:
        raise SweepError("no trial finished with a metric; see the trials table and the Ray logs")
    return done.iloc[0]
