"""Plumbing shared by the stage scripts: arguments, params, Ray, MLflow.

This is the edge of the system: the only place that reads params.yaml, argv
and environment variables (RAY_ADDRESS, MLFLOW_TRACKING_URI,
PIPELINE_RUN_GROUP, CI, PIPELINE_PROGRESS). Params are validated before
anything heavy loads: this module imports only pydantic and PyYAML at the
top, and each stage imports torch, Ray and MLflow inside `main()` after
`load` (a typo in params.yaml is reported in well under a second).
"""
import argparse
import os
import sys
from pathlib import Path

import yaml

from pipeline.config import ConfigError, load_params

PROJECT = Path(__file__).resolve().parent.parent


def path(arg):
    """Path arguments are made absolute: Ray workers do not share the driver's cwd."""
    return Path(arg).resolve()


def parse(stage, description, extra=()):
    """Parse argv: `--params`, `--dry-run` and the stage's own `(flag, kwargs)` arguments."""
    parser = argparse.ArgumentParser(prog=f"stages/{stage}.py", description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    for flag, kwargs in extra:
        parser.add_argument(flag, **kwargs)
    return parser.parse_args()


def load(args, section=None):
    """Validated params; on --dry-run print the resolved config (or one section) and exit 0."""
    try:
        params = load_params(args.params)
    except ConfigError as err:
        sys.exit(f"invalid params:\n{err}")
    if args.dry_run:
        shown = params.model_dump(mode="json")
        for key in section.split(".") if section else []:
            shown = shown[key]
        print(yaml.safe_dump({section: shown} if section else shown, sort_keys=False))
        sys.exit(0)
    return params


def connect_ray(params):
    """Join RAY_ADDRESS if set, else start a local Ray sized to the machine."""
    from pipeline.distributed import RAY_ENV, connect
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    connect(os.environ.get("RAY_ADDRESS"), num_cpus=os.cpu_count())


def progress_enabled():
    """Progress bars on: only when stderr is a terminal, and never under CI (`CI` set to
    anything but "", "0" or "false") or with PIPELINE_PROGRESS=0."""
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false"):
        return False
    if os.environ.get("PIPELINE_PROGRESS") == "0":
        return False
    return sys.stderr.isatty()


def tracking_uri(params):
    from pipeline.tracking import default_uri
    return os.environ.get("MLFLOW_TRACKING_URI") or params.tracking.uri or default_uri(PROJECT)


def run_group(params):
    """Tag shared by the runs of one `dvc repro`: PIPELINE_RUN_GROUP, else commit + params."""
    from pipeline.tracking import git_commit, params_hash
    if os.environ.get("PIPELINE_RUN_GROUP"):
        return os.environ["PIPELINE_RUN_GROUP"]
    return f"{git_commit(PROJECT)[:10]}-{params_hash(params.model_dump(mode='json'))}"


def stage_run(params, stage, section, model="", method="", teacher="", extra_tags=None):
    """An MLflow run for this stage, tagged; exits with a clear message if tracking is down."""
    from pipeline.tracking import StageRun, TrackingError, git_commit, params_hash
    dumped = params.model_dump(mode="json")
    for key in section.split("."):
        dumped = dumped[key]
    tags = {"stage": stage, "model": model, "method": method, "teacher": teacher,
            "git_commit": git_commit(PROJECT), "params_hash": params_hash(dumped),
            "group": run_group(params), **(extra_tags or {})}
    name = f"{stage}@{model}" if model else stage
    try:
        return StageRun(tracking_uri(params), params.tracking.experiment, name, tags,
                        {section: dumped}, artifact_root=(PROJECT / "mlartifacts").as_uri())
    except TrackingError as err:
        sys.exit(str(err))
