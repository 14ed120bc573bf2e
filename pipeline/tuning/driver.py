"""Running a whole sweep from the driver: Ray Tune over the trials, MLflow, the results.

`run_sweep` opens (or, on resume, reopens) the sweep's MLflow parent run, runs the trials
with `tuning.tune` (each trial is `trial.run_trial`), links and closes the trials' runs,
and writes `trials.csv` and `best.json` (whose `command` is the `dvc exp run -S ...` that
reproduces the best trial in the pipeline). Running it again with the same spec resumes
the sweep (`Tuner.restore`); a changed spec is refused unless `restart`.
"""
import functools
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipeline.errors import PipelineError
from pipeline.runtime.outputs import staging_dir, write_json
from pipeline.tuning.sweep import (SweepSpec, best_trial, dvc_exp_command, integer_keys, max_steps,
                            reproduced_overrides, trials_table)


@dataclass(frozen=True)
class SweepPlaces:
    """Where a sweep reads and writes (absolute paths)."""
    data: Path  # the prepare stage's output
    features: Path  # the features stage's output
    teacher: Optional[Path]  # a student's teacher checkpoint
    storage: Path  # Ray Tune / Train runs: storage / <sweep name>
    out: Path  # results/sweeps/<name>
    artifacts: Path  # MLflow artifact root


def spec_hash(spec: SweepSpec):
    return hashlib.sha256(json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:12]


def run_sweep(name, spec: SweepSpec, raw, base, section, places: SweepPlaces, uri, restart=False):
    """Run (or resume) the sweep `name`; returns (trials table, summary dict)."""
    from pipeline.tuning import tuner as tuning
    from pipeline.runtime.tracking import SweepRun
    from pipeline.tuning.trial import TrialSetup, run_trial
    state_file = places.storage / name / "pipeline_sweep.json"
    digest = spec_hash(spec)
    resume = tuning.can_resume(places.storage, name) and state_file.exists() and not restart
    if resume and json.loads(state_file.read_text())["spec_hash"] != digest:
        raise PipelineError(f"sweep {name}: {places.storage / name} holds a run of a different sweep "
                            "file; pass --restart to discard it")
    if not resume and (places.storage / name).exists():
        shutil.rmtree(places.storage / name)
    parent_id = json.loads(state_file.read_text())["parent_run_id"] if resume else None
    tags = {"stage": "sweep", "sweep": name, "sweep_stage": spec.stage, "spec_hash": digest}
    with SweepRun(uri, base.tracking.experiment, f"sweep {name}", tags, {"sweep": spec.model_dump(mode="json")},
                  places.artifacts.as_uri(), run_id=parent_id) as parent:
        state_file.parent.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps({"spec_hash": digest, "parent_run_id": parent.run_id}))
        setup = TrialSetup(name, spec, raw, str(places.data), places.teacher and str(places.teacher),
                           str(places.features), str(places.storage / name / "train"), uri, parent.run_id)
        steps = max_steps(spec, raw, section)
        rows = tuning.tune(
            functools.partial(run_trial, setup), tuning.search_space(spec.space, integer_keys(spec, raw)),
            metric=spec.objective.metric, mode=spec.objective.mode, num_samples=spec.num_samples,
            seed=spec.seed, max_steps=steps, asha=spec.scheduler,
            max_concurrent=spec.max_concurrent_trials or tuning.trials_that_fit(base.ray),
            storage_path=places.storage, name=name, resume=resume)
        table = trials_table(_link_runs(rows, parent), spec, steps)
        _mark_runs(table, parent)
        summary = _summary(name, spec, best_trial(table, spec))
        with staging_dir(places.out) as tmp:
            table.to_csv(tmp / "trials.csv", index=False)
            write_json(tmp / "best.json", summary)
        parent.log_metrics({f"best_{spec.objective.metric}": summary["value"]})
        parent.set_tags({"best_trial": summary["trial_id"], "best_command": summary["command"]})
        parent.log_artifact(places.out / "trials.csv")
    return table, summary


def _summary(name, spec, best):
    config = {k: _plain(v) for k, v in reproduced_overrides(spec, {k: best[k] for k in spec.space}).items()}
    return {"sweep": name, "stage": spec.stage, "metric": spec.objective.metric, "mode": spec.objective.mode,
            "value": float(best[spec.objective.metric]), "trial_id": best["trial_id"], "config": config,
            "command": dvc_exp_command(config)}


def _link_runs(rows, parent):
    """Attach each trial's MLflow run id (found by its trial_id tag under the sweep's run)."""
    exp_id = parent.client.get_run(parent.run_id).info.experiment_id
    runs = parent.client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'")
    by_trial = {r.data.tags.get("trial_id"): r.info.run_id for r in runs}
    return [{**row, "mlflow_run_id": by_trial.get(row["trial_id"], "")} for row in rows]


def _mark_runs(table, parent):
    """Close each trial's run with its outcome: ASHA kills a stopped trial's process mid-run."""
    for row in table.itertuples():
        if row.mlflow_run_id:
            parent.client.set_tag(row.mlflow_run_id, "sweep_status", row.status)
            parent.client.set_terminated(row.mlflow_run_id, "FAILED" if row.status == "error" else "FINISHED")


def _plain(value):
    """numpy scalars from the table as plain Python values (YAML/JSON friendly)."""
    return value.item() if hasattr(value, "item") else value
