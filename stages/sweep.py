"""Sweep one training stage's hyper-parameters with Ray Tune (not a DVC stage).

    python stages/sweep.py sweeps/ibmd_lr_lk.yaml

Checks the sweep file against params.yaml and the stage's dvc.yaml entry, then runs
the trials (ASHA stops weak ones), logs each as an MLflow child run of the sweep's
run, and writes results/sweeps/<name>/trials.csv and best.json, whose `command` is
the `dvc exp run -S ...` that reproduces the best trial in the pipeline. Running
the same command again resumes an interrupted sweep; --restart discards it.
"""
import argparse
import functools
import hashlib
import json
import shutil
import sys
from pathlib import Path

import yaml

import common


def stage_contract(stage):
    """(params sections, upstream outputs) of a dvc.yaml stage, as DVC resolves them."""
    from dvc.repo import Repo
    from dvc.stage.exceptions import StageNotFound
    try:
        (resolved,) = Repo(str(common.PROJECT)).stage.collect(stage)
    except (StageNotFound, ValueError) as err:
        sys.exit(f"sweep: no stage {stage!r} in dvc.yaml ({err})")
    sections = [k for d in resolved.deps if hasattr(d, "params") and d.params for k in d.params]
    code = ("pipeline", "stages", "params.yaml")
    upstream = [d.def_path for d in resolved.deps if not d.def_path.split("/")[0] in code]
    return sections, upstream


def main():
    args = common.parse("sweep", __doc__, [
        ("sweep_file", {"type": common.path, "help": "a sweep YAML file (see sweeps/)"}),
        ("--restart", {"action": "store_true", "help": "discard an earlier run of this sweep"}),
        ("--out", {"type": common.path, "help": "default: results/sweeps/<name>"}),
        ("--storage", {"default": "ray_results/sweeps", "type": common.path})])
    common.load(argparse.Namespace(params=args.params, dry_run=False))  # params.yaml itself is valid
    from pipeline.sweep import SweepError, check_spec, load_spec
    raw = yaml.safe_load(Path(args.params).read_text())
    name = args.sweep_file.stem
    try:
        spec = load_spec(args.sweep_file)
        sections, upstream = stage_contract(spec.stage)
        base = check_spec(spec, raw, sections, source=str(args.sweep_file))
    except SweepError as err:
        sys.exit(f"invalid sweep:\n{err}")
    paths = yaml.safe_load((common.PROJECT / "dvc.yaml").read_text())["vars"][0]["paths"]
    needed = upstream + ([] if spec.stage == "features" else [paths["features"]])
    missing = [p for p in needed if not (common.PROJECT / p).exists()]
    if missing:
        sys.exit(f"sweep: {spec.stage} needs {missing}; run `dvc repro {spec.stage}` (or its upstream) first")
    if args.dry_run:
        print(yaml.safe_dump({"sweep": name, "stage": spec.stage, "sections": sections, "trials": spec.trials(),
                              **spec.model_dump(mode="json", exclude_none=True)}, sort_keys=False))
        return
    out = args.out or common.PROJECT / "results" / "sweeps" / name
    from pipeline.jobs import params_section  # torch: only once the sweep is known to be valid
    section = params_section(spec.stage)
    run_sweep(name, spec, raw, base, section, paths, out, args)


def run_sweep(name, spec, raw, base, section, paths, out, args):
    from pipeline import distributed
    from pipeline.sweep import (best_trial, dvc_exp_command, integer_keys, max_steps,
                                reproduced_overrides, trials_table)
    from pipeline.trial import TrialSetup, run_trial
    from pipeline.tracking import SweepRun
    state_file = args.storage / name / "pipeline_sweep.json"
    spec_hash = hashlib.sha256(json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:12]
    common.connect_ray(base)
    resume = distributed.can_resume(args.storage, name) and state_file.exists() and not args.restart
    if resume and json.loads(state_file.read_text())["spec_hash"] != spec_hash:
        sys.exit(f"sweep {name}: {args.storage / name} holds a run of a different sweep file; "
                 "pass --restart to discard it")
    if not resume and (args.storage / name).exists():
        shutil.rmtree(args.storage / name)
    parent_id = json.loads(state_file.read_text())["parent_run_id"] if resume else None
    uri = common.tracking_uri(base)
    tags = {"stage": "sweep", "sweep": name, "sweep_stage": spec.stage, "spec_hash": spec_hash}
    with SweepRun(uri, base.tracking.experiment, f"sweep {name}", tags, {"sweep": spec.model_dump(mode="json")},
                  (common.PROJECT / "mlartifacts").as_uri(), run_id=parent_id) as parent:
        state_file.parent.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps({"spec_hash": spec_hash, "parent_run_id": parent.run_id}))
        setup = TrialSetup(name, spec, raw, str(common.PROJECT / paths["data"]), str(common.PROJECT / paths["models"]),
                           str(common.PROJECT / paths["features"]), str(args.storage / name / "train"), uri,
                           parent.run_id)
        steps = max_steps(spec, raw, section)
        rows = distributed.tune(
            functools.partial(run_trial, setup), distributed.search_space(spec.space, integer_keys(spec, raw)),
            metric=spec.objective.metric, mode=spec.objective.mode, num_samples=spec.num_samples,
            seed=spec.seed, max_steps=steps, asha=spec.scheduler,
            max_concurrent=spec.max_concurrent_trials or trials_that_fit(base), storage_path=args.storage,
            name=name, resume=resume)
        table = trials_table(link_runs(rows, parent), spec, steps)
        mark_runs(table, parent)
        best = best_trial(table, spec)
        config = reproduced_overrides(spec, {k: best[k] for k in spec.space})
        summary = {"sweep": name, "stage": spec.stage, "metric": spec.objective.metric, "mode": spec.objective.mode,
                   "value": float(best[spec.objective.metric]), "trial_id": best["trial_id"],
                   "config": {k: _plain(v) for k, v in config.items()},
                   "command": dvc_exp_command({k: _plain(v) for k, v in config.items()})}
        write_results(out, table, summary)
        parent.log_metrics({f"best_{spec.objective.metric}": summary["value"]})
        parent.set_tags({"best_trial": summary["trial_id"], "best_command": summary["command"]})
        parent.log_artifact(out / "trials.csv")
    print(table.to_string(index=False))
    print(f"\nbest {spec.objective.metric} {summary['value']:.4f} (trial {summary['trial_id']}); "
          f"reproduce it in the pipeline with:\n  {summary['command']}\nwrote {out}")


def trials_that_fit(params):
    """Concurrent trials the cluster holds at the params' per-trial resources."""
    import ray
    resources = ray.cluster_resources()
    if params.ray.use_gpu:
        return max(1, int(resources.get("GPU", 0)) // params.ray.num_workers)
    per_trial = params.ray.num_workers * params.ray.threads_per_worker
    return max(1, int(resources.get("CPU", 1)) // per_trial)


def link_runs(rows, parent):
    """Attach each trial's MLflow run id (found by its trial_id tag under the sweep's run)."""
    exp_id = parent.client.get_run(parent.run_id).info.experiment_id
    runs = parent.client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'")
    by_trial = {r.data.tags.get("trial_id"): r.info.run_id for r in runs}
    return [{**row, "mlflow_run_id": by_trial.get(row["trial_id"], "")} for row in rows]


def mark_runs(table, parent):
    """Close each trial's run with its outcome: ASHA kills a stopped trial's process mid-run."""
    for row in table.itertuples():
        if row.mlflow_run_id:
            parent.client.set_tag(row.mlflow_run_id, "sweep_status", row.status)
            parent.client.set_terminated(row.mlflow_run_id, "FAILED" if row.status == "error" else "FINISHED")


def write_results(out, table, summary):
    from pipeline.outputs import staging_dir, write_json
    with staging_dir(out) as tmp:
        table.to_csv(tmp / "trials.csv", index=False)
        write_json(tmp / "best.json", summary)


def _plain(value):
    """numpy scalars from the table as plain Python values (YAML/JSON friendly)."""
    return value.item() if hasattr(value, "item") else value


if __name__ == "__main__":
    main()
