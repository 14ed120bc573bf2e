"""Sweep one training stage's hyper-parameters with Ray Tune (not a DVC stage).

    python stages/sweep.py sweeps/ibmd_lr_lk.yaml

Checks the sweep file against params.yaml and the stage's dvc.yaml entry, then runs the
trials (pipeline.tuning.driver): ASHA stops weak ones, each is an MLflow child run of the
sweep's run, and results/sweeps/<name>/best.json holds the `dvc exp run -S ...` command
that reproduces the best trial. The same command again resumes; --restart discards it.
"""
import common
import yaml


def main(args):
    from pipeline.config.schema import load_params, read_params
    from pipeline.tuning.sweep import check_spec, load_spec
    raw, name = read_params(args.params), args.sweep_file.stem
    load_params(args.params)  # params.yaml itself is valid
    spec = load_spec(args.sweep_file)
    base = check_spec(spec, raw, common.stage_params(spec.stage), source=str(args.sweep_file))
    outs = common.stage_outputs()  # {stage: its output path}, from dvc.yaml
    upstream = [outs[s] for s in common.upstream_stages(spec.stage)] + (
        [] if spec.stage == "features" else [outs["features"]])
    missing = [str(p) for p in upstream if not p.exists()]
    if missing:
        raise common.PipelineError(f"{spec.stage} needs {missing}; run `dvc repro {spec.stage}` first")
    if args.dry_run:
        print(yaml.safe_dump({"sweep": name, "stage": spec.stage, "trials": spec.trials(),
                              **spec.model_dump(mode="json", exclude_none=True)}, sort_keys=False))
        return
    from pipeline.training.jobs import (
        params_section,  # torch: only once the sweep is known to be valid
    )
    from pipeline.tuning.driver import SweepPlaces, run_sweep
    teacher = next((outs[s] for s in common.upstream_stages(spec.stage) if s.startswith("teacher@")), None)
    places = SweepPlaces(outs["prepare"], outs["features"], teacher, args.storage,
                         args.out or common.PROJECT / "results" / "sweeps" / name, common.PROJECT / "mlartifacts")
    common.connect_ray()
    table, best = run_sweep(name, spec, raw, base, params_section(spec.stage), places,
                            common.tracking_uri(base), restart=args.restart)
    print(table.to_string(index=False))
    print(f"\nbest {best['metric']} {best['value']:.4f} (trial {best['trial_id']}); "
          f"reproduce it in the pipeline with:\n  {best['command']}\nwrote {places.out}")


if __name__ == "__main__":
    common.run(main, common.parse("sweep", __doc__, [
        ("sweep_file", {"type": common.path, "help": "a sweep YAML file (see sweeps/)"}),
        ("--restart", {"action": "store_true", "help": "discard an earlier run of this sweep"}),
        ("--out", {"type": common.path, "help": "default: results/sweeps/<name>"}),
        ("--storage", {"default": "ray_results/sweeps", "type": common.path})]))
