"""Plumbing shared by the stage scripts: arguments, params, errors, Ray, MLflow.

This is the edge of the system: the only place that reads params.yaml, argv
and environment variables (RAY_ADDRESS, MLFLOW_TRACKING_URI, PIPELINE_RUN_GROUP,
PIPELINE_DEBUG, CI, PIPELINE_PROGRESS, PIPELINE_IMPORTS_LOG). Params are validated before anything
heavy loads: this module imports only pydantic and PyYAML at the top, and each
stage imports torch, Ray and MLflow inside `main()` after `load` (a typo in
params.yaml is reported in well under a second).

A stage reads its params through a `ParamsView` holding exactly the keys its
dvc.yaml entry lists (plus `tracking`, which changes no result): reading any
other key is an error, so no value DVC does not track can change a stage's
output (docs/architecture.md). Bad input (`PipelineError`) ends a stage with
one line and exit status 1; `--debug` or PIPELINE_DEBUG=1 shows the traceback.
"""
import argparse
import json
import os
import signal
import sys
from contextlib import chdir
from pathlib import Path

import yaml

from pipeline.config.schema import ConfigError, load_params
from pipeline.errors import PipelineError

PROJECT = Path(__file__).resolve().parent.parent
ALWAYS_READABLE = ("tracking",)  # where runs are recorded changes no output


def path(arg):
    """Path arguments are made absolute: Ray workers do not share the driver's cwd."""
    return Path(arg).resolve()


def parse(stage, description, extra=()):
    """Parse argv: `--params`, `--dry-run`, `--debug` and the stage's own `(flag, kwargs)`."""
    parser = argparse.ArgumentParser(prog=f"stages/{stage}.py", description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--dry-run", action="store_true", help="print the stage's params and exit")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an input error")
    for flag, kwargs in extra:
        parser.add_argument(flag, **kwargs)
    return parser.parse_args()


def _terminate(signum, frame):
    """SIGTERM (a cluster scheduler, `kill`) unwinds like Ctrl-C: the stage's MLflow run is
    ended KILLED and nothing half-done is recorded (docs/errors.md, "Interrupted runs")."""
    raise KeyboardInterrupt(f"signal {signum}")


def run(main, args):
    """Run `main(args)`; bad input ends it with one line on stderr and exit status 1."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        main(args)
        _log_imports(args)
    except PipelineError as err:
        if args.debug or os.environ.get("PIPELINE_DEBUG", "") not in ("", "0"):
            raise
        sys.exit(f"{Path(sys.argv[0]).stem}: {err}")


def _log_imports(args):
    """With PIPELINE_IMPORTS_LOG set, append {stage, modules} to that file: every library
    module this stage process loaded (tests/integration checks them against dvc.yaml's deps)."""
    log = os.environ.get("PIPELINE_IMPORTS_LOG")
    stage = getattr(args, "stage", None)
    if not log or not stage or stage.split("@")[0] != Path(sys.argv[0]).stem:
        return  # not a DVC stage's own process (the sweep command loads a stage's params too)
    root = Path(sys.modules["pipeline"].__file__).resolve().parent.parent  # where the library is installed from
    files = sorted(str(Path(m.__file__).resolve().relative_to(root)) for name, m in list(sys.modules.items())
                   if name.split(".")[0] == "pipeline" and getattr(m, "__file__", None))
    with open(log, "a") as f:
        f.write(json.dumps({"stage": stage, "modules": files}) + "\n")


class UndeclaredParam(PipelineError, AttributeError):
    """A stage read a params key its dvc.yaml entry does not list."""


class ParamsView:
    """Attribute access to the validated params, limited to `keys` (dotted, as dvc.yaml lists
    them). A key under a listed one reads as the value itself; a section holding listed keys
    reads as a narrower view; any other key raises UndeclaredParam."""

    def __init__(self, params, keys, stage, prefix=""):
        self._params, self._keys, self._stage, self._prefix = params, tuple(keys), stage, prefix

    def __getattr__(self, name):
        key = self._prefix + name
        value = getattr(self._params, name)
        if any(key == k or key.startswith(k + ".") for k in self._keys):
            return value
        if any(k.startswith(key + ".") for k in self._keys):
            return ParamsView(value, self._keys, self._stage, key + ".")
        raise UndeclaredParam(f"stage {self._stage} read params key {key!r}, which its dvc.yaml entry "
                              f"does not list (it lists {', '.join(self._keys)}); add it there")

    def dump(self):
        """{key: value as JSON-like} for every listed key: what MLflow records for the run."""
        out = {}
        for key in self._keys:
            node = self._params
            for part in key.split("."):
                node = getattr(node, part)
            out[key] = _plain(node)
        return out


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


def _dvc_stage(stage):
    """`stage` (e.g. "teacher@bridge") as DVC resolves it from dvc.yaml and params.yaml."""
    from dvc.repo import Repo
    from dvc.stage.exceptions import StageNotFound
    try:
        with chdir(PROJECT):  # DVC resolves dvc.yaml against the working directory
            (resolved,) = Repo(str(PROJECT)).stage.collect(stage)
    except (StageNotFound, ValueError) as err:
        raise ConfigError(f"dvc.yaml has no stage {stage!r} for these params ({err})") from None
    return resolved


def stage_params(stage):
    """The params keys `stage` depends on, as its dvc.yaml entry lists them."""
    return [key for dep in _dvc_stage(stage).deps if getattr(dep, "params", None) for key in dep.params]


def stage_outputs():
    """{stage: absolute path of its first output} for every stage of dvc.yaml."""
    from dvc.repo import Repo
    with chdir(PROJECT):
        stages = Repo(str(PROJECT)).index.stages
    return {s.addressing: PROJECT / s.outs[0].def_path for s in stages if s.outs}


def upstream_stages(stage):
    """The stages whose outputs `stage` reads (its dependencies that another stage writes)."""
    writers = {str(path.relative_to(PROJECT)): name for name, path in stage_outputs().items()}
    return [writers[d.def_path] for d in _dvc_stage(stage).deps if d.def_path in writers]


def load(args, stage):
    """The validated params as the DVC stage `stage` may read them (a `ParamsView`); on
    --dry-run print those keys' values and exit 0. Invalid params exit with one line per key,
    an HTTP tracking server that does not answer with one line naming it."""
    try:
        params = load_params(args.params)
    except ConfigError as err:
        reasons = str(err)  # one line per bad key, each naming the file and the key
        sys.exit(f"invalid params: {reasons}" if "\n" not in reasons else f"invalid params:\n{reasons}")
    view = ParamsView(params, [*stage_params(stage), *ALWAYS_READABLE], stage)
    args.stage = stage
    if args.dry_run:
        print(yaml.safe_dump(view.dump(), sort_keys=False))
        sys.exit(0)
    uri = tracking_uri(view)
    if uri.startswith(("http://", "https://")):  # a server that is down: one line, before Ray starts
        from pipeline.runtime.tracking import check_reachable
        check_reachable(uri)
    return view


def connect_ray():
    """Join RAY_ADDRESS if set, else start a local Ray sized to the machine."""
    from pipeline.runtime.cluster import RAY_ENV, connect
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
    from pipeline.runtime.tracking import default_uri
    return os.environ.get("MLFLOW_TRACKING_URI") or params.tracking.uri or default_uri(PROJECT)


def run_group(params_file):
    """Tag shared by the runs of one `dvc repro`: PIPELINE_RUN_GROUP, else commit + params."""
    from pipeline.runtime.tracking import git_commit, params_hash
    if os.environ.get("PIPELINE_RUN_GROUP"):
        return os.environ["PIPELINE_RUN_GROUP"]
    raw = yaml.safe_load(Path(params_file).read_text())
    return f"{git_commit(PROJECT)[:10]}-{params_hash(raw)}"


def stage_run(params, args, stage, model="", method="", teacher="", extra_tags=None):
    """An MLflow run for this stage execution, tagged, with the stage's params logged."""
    from pipeline.runtime.tracking import StageRun, git_commit, params_hash
    dumped = params.dump()
    tags = {"stage": stage, "model": model, "method": method, "teacher": teacher,
            "git_commit": git_commit(PROJECT), "params_hash": params_hash(dumped),
            "group": run_group(args.params), **(extra_tags or {})}
    return StageRun(tracking_uri(params), params.tracking.experiment, f"{stage}@{model}" if model else stage,
                    tags, dumped, artifact_root=(PROJECT / "mlartifacts").as_uri(),
                    retry_s=params.tracking.retry_s)
