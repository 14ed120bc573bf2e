"""MLflow: one experiment per pipeline, one run per stage execution.

Every run carries the tags `stage`, `model`, `method`, `teacher`, `git_commit`,
`params_hash` and `group` (shared by the runs of one `dvc repro`), and is a
child of that group's parent run, so the UI filters and nests them. Metrics
are logged with `log_batch` (one database round trip per call, see docs/stack.md).
"""
import hashlib
import json
import subprocess
import time
import urllib.error
import urllib.request

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from pipeline.errors import PipelineError

GROUP_TAG = "group"


class TrackingError(PipelineError, RuntimeError):
    """The tracking server cannot be reached or the URI is unusable."""


def default_uri(project_dir):
    return f"sqlite:///{project_dir.resolve() / 'mlflow.db'}"


def check_reachable(uri, timeout_s=5.0):
    """Fail fast, before any training, if an HTTP tracking server is down."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s)
    except (urllib.error.URLError, OSError) as err:
        raise TrackingError(f"MLflow tracking server {uri} is not reachable ({err}); "
                            "start it or unset MLFLOW_TRACKING_URI") from err


def params_hash(params_dict):
    blob = json.dumps(params_dict, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def git_commit(cwd):
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _experiment_id(client, name, artifact_root):
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root)


def _group_parent(client, exp_id, group):
    """The parent run of a group, created by whichever stage runs first."""
    found = client.search_runs([exp_id], filter_string=f"tags.{GROUP_TAG} = '{group}' "
                               "and tags.stage = 'pipeline'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=f"pipeline {group}",
                            tags={GROUP_TAG: group, "stage": "pipeline"})
    client.set_terminated(run.info.run_id)
    return run.info.run_id


class _Run:
    """Logging into one existing MLflow run; use as a context manager (ends the run)."""

    def __init__(self, client, run_id, uri):
        self.client, self.run_id, self.uri = client, run_id, uri

    def child(self, run_name, tags):
        """A nested run under this one (e.g. one per sampler of an evaluation)."""
        run = self.client.get_run(self.run_id)
        tags = {**{k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")},
                **tags, "mlflow.parentRunId": self.run_id}
        child = self.client.create_run(run.info.experiment_id, run_name=run_name, tags=tags)
        return _Run(self.client, child.info.run_id, self.uri)

    def logger(self):
        return MetricLogger(self.uri, self.run_id)

    def log_metrics(self, metrics, step=0):
        self.logger()(metrics, step)

    def log_curves(self, model, rows, metrics):
        """One child run per sampler (`<model>/<sampler>`) with `metrics` of every row logged at
        step = nfe: in the UI, selecting these runs and charting `fid` over Step is FID vs NFE."""
        for sampler in dict.fromkeys(r["sampler"] for r in rows):
            curve = [r for r in rows if r["sampler"] == sampler]
            child = self.child(f"{model}/{sampler}", {"sampler": sampler, "stage": "evaluate",
                                                     "nfe": ",".join(str(r["nfe"]) for r in curve)})
            with child:
                now = int(time.time() * 1000)
                child.client.log_batch(child.run_id, metrics=[
                    Metric(m, float(r[m]), now, int(r["nfe"])) for r in curve for m in metrics])

    def log_artifact(self, path, artifact_path=None):
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags):
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.client.set_terminated(self.run_id, "FAILED" if exc_type else "FINISHED")
        return False


class StageRun(_Run):
    """A new run for one stage execution, tagged, under its group's parent run."""

    def __init__(self, uri, experiment, run_name, tags, params, artifact_root):
        check_reachable(uri)
        client = MlflowClient(tracking_uri=uri)
        exp_id = _experiment_id(client, experiment, artifact_root)
        parent = _group_parent(client, exp_id, tags[GROUP_TAG])
        tags = {**tags, "mlflow.parentRunId": parent}
        super().__init__(client, client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id, uri)
        _log_params(client, self.run_id, params)


class SweepRun(_Run):
    """The parent run of a sweep (its trials are children); `run_id` reopens it on resume."""

    def __init__(self, uri, experiment, run_name, tags, params, artifact_root, run_id=None):
        check_reachable(uri)
        client = MlflowClient(tracking_uri=uri)
        if run_id is not None:
            client.update_run(run_id, status="RUNNING")
            super().__init__(client, run_id, uri)
            return
        exp_id = _experiment_id(client, experiment, artifact_root)
        super().__init__(client, client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id, uri)
        _log_params(client, self.run_id, params)


def trial_run(uri, parent_run_id, run_name, tags, params):
    """The run of one sweep trial under its sweep's run: the existing one when the trial
    restarts (a resumed sweep), else a new one with `params` logged."""
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(parent_run_id)
    found = client.search_runs([parent.info.experiment_id], max_results=1, filter_string=(
        f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.trial_id = '{tags['trial_id']}'"))
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return _Run(client, found[0].info.run_id, uri)
    run = _Run(client, parent_run_id, uri).child(run_name, tags)
    _log_params(client, run.run_id, params)
    return run


def _log_params(client, run_id, params):
    flat = _flatten(params)
    for i in range(0, len(flat), 100):  # log_batch takes at most 100 params
        client.log_batch(run_id, params=[_param(k, v) for k, v in flat[i:i + 100]])


class MetricLogger:
    """Picklable `log(metrics, step)` for a run: Ray workers receive it and log from rank 0."""

    def __init__(self, uri, run_id):
        self.uri, self.run_id = uri, run_id

    def __call__(self, metrics, step):
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        MlflowClient(tracking_uri=self.uri).log_batch(self.run_id, metrics=batch)

    def flush(self, timeout_s=None):
        """Deliver what is held; True when nothing is left unsent."""
        return True


def _param(key, value):
    return Param(key, str(value)[:6000])


def _flatten(d, prefix=""):
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.extend(_flatten(v, key + "."))
        else:
            out.append((key, v))
    return out
