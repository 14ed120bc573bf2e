"""MLflow: one experiment per pipeline, one run per stage execution.

Every run carries the tags `stage`, `model`, `method`, `teacher`, `git_commit`,
`params_hash` and `group` (shared by the runs of one `dvc repro`), and is a
child of that group's parent run, so the UI filters and nests them. Metrics
are logged with `log_batch` (one database round trip per call, see docs/stack.md).

A tracking server that stops answering mid-stage costs no computed result
(docs/errors.md, "The tracking server"): training metrics are sent by a background
thread (`MetricLogger`), so the loop never waits on the server, and every call is
retried for `tracking.retry_s` seconds. A server still down after that ends the
stage with one line, after its outputs are written.
"""
import hashlib
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from types import SimpleNamespace

from pipeline.errors import PipelineError

GROUP_TAG = "group"
RETRY_S = 300.0  # the default of params `tracking.retry_s`
MAX_METRICS = 1000  # the most metrics one log_batch call takes


def _mlflow():
    """MLflow's client and entities, imported where a run is first touched. Importing mlflow
    costs ~2.5 s (BENCHMARKS.md, "Stage fixed cost"), which neither a stage that stops on bad
    input nor a Ray worker that unpickles its `MetricLogger` should pay up front."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    return SimpleNamespace(Metric=Metric, Param=Param, RunTag=RunTag, MlflowException=MlflowException,
                           MlflowClient=MlflowClient)


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
    """The experiment's id, created on first use. Two stages that start at once on a new
    server (two `dvc exp` queue workers) may both find it missing; the one whose create
    loses the race reads the winner's."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_root)
    except MlflowException as err:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


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


def retrying(call, retry_s, what, uri):
    """`call()`, retried with backoff (0.5 s doubling to 10 s) until it succeeds or
    `retry_s` seconds have passed; then a TrackingError naming the server and `what`.
    A request the server refuses (an MLflow error of HTTP status 4xx: a bad value, a run
    that does not exist) is raised at once: trying again would not change the answer.
    (Each try may itself retry inside MLflow: MLFLOW_HTTP_REQUEST_MAX_RETRIES.)"""
    start, wait = time.monotonic(), 0.5
    while True:
        try:
            return call()
        except Exception as err:  # MLflow raises several types for one outage  # noqa: BLE001
            if isinstance(err, _mlflow().MlflowException) and err.get_http_status_code() < 500:
                raise
            if time.monotonic() - start + wait > retry_s:
                raise TrackingError(f"MLflow tracking server {uri} did not answer for {retry_s:g} s "
                                    f"while {what} ({type(err).__name__}: {_first_line(err)})") from err
            time.sleep(wait)
            wait = min(2 * wait, 10.0)


def chunks(metrics):
    """`metrics` in lists of at most MAX_METRICS, as one log_batch call takes them."""
    return [metrics[i:i + MAX_METRICS] for i in range(0, len(metrics), MAX_METRICS)]


def _first_line(err):
    text = str(err).strip().splitlines()
    return text[0][:200] if text else ""


def end_status(exc_type):
    """FINISHED, KILLED (interrupted: SIGINT, or SIGTERM through stages/common.py) or FAILED."""
    if exc_type is None:
        return "FINISHED"
    return "KILLED" if issubclass(exc_type, (KeyboardInterrupt, SystemExit)) else "FAILED"


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def end_dead_runs(client, exp_id):
    """Mark KILLED the RUNNING runs of this experiment started on this host whose process is
    gone: a stage killed with SIGKILL (or a lost machine) cannot end its own run, so the
    next stage that starts on the host does, whatever its group (a rerun after a params
    change has a new one). Runs of other hosts are left alone: their pids mean nothing
    here. Returns their ids."""
    found = client.search_runs([exp_id], filter_string=(
        f"tags.host = '{socket.gethostname()}' and attributes.status = 'RUNNING'"))
    dead = [r.info.run_id for r in found
            if r.data.tags.get("pid", "").isdigit() and not _alive(int(r.data.tags["pid"]))]
    for run_id in dead:
        client.set_terminated(run_id, "KILLED")
    return dead


class _Run:
    """Logging into one existing MLflow run; use as a context manager (ends the run).

    Calls made after the stage's work are retried for `retry_s` (see `retrying`)."""

    def __init__(self, client, run_id, uri, retry_s=RETRY_S):
        self.client, self.run_id, self.uri, self.retry_s = client, run_id, uri, retry_s

    def _call(self, what, fn, *args, **kwargs):
        return retrying(lambda: fn(*args, **kwargs), self.retry_s, what, self.uri)

    def child(self, run_name, tags):
        """A nested run under this one (e.g. one per sampler of an evaluation)."""
        run = self._call("reading the run", self.client.get_run, self.run_id)
        tags = {**{k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")},
                **tags, "mlflow.parentRunId": self.run_id}
        child = self._call(f"creating run {run_name}", self.client.create_run, run.info.experiment_id,
                           run_name=run_name, tags=tags)
        return _Run(self.client, child.info.run_id, self.uri, self.retry_s)

    def logger(self):
        """The training loop's logger (sends in the background; picklable for Ray workers)."""
        return MetricLogger(self.uri, self.run_id, self.retry_s)

    def log_metrics(self, metrics, step=0):
        now = int(time.time() * 1000)
        batch = [_mlflow().Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        self._call("logging metrics", self.client.log_batch, self.run_id, metrics=batch)

    def log_curves(self, model, rows, metrics):
        """One child run per sampler (`<model>/<sampler>`) with `metrics` of every row logged at
        step = nfe: in the UI, selecting these runs and charting `fid` over Step is FID vs NFE."""
        for sampler in dict.fromkeys(r["sampler"] for r in rows):
            curve = [r for r in rows if r["sampler"] == sampler]
            child = self.child(f"{model}/{sampler}", {"sampler": sampler, "stage": "evaluate",
                                                     "nfe": ",".join(str(r["nfe"]) for r in curve)})
            with child:
                now = int(time.time() * 1000)
                for part in chunks([_mlflow().Metric(m, float(r[m]), now, int(r["nfe"])) for r in curve for m in metrics]):
                    child._call("logging the FID curves", child.client.log_batch, child.run_id, metrics=part)

    def log_artifact(self, path, artifact_path=None):
        self._call(f"uploading {Path(path).name}", self.client.log_artifact, self.run_id, str(path), artifact_path)

    def set_tags(self, tags):
        self._call("setting tags", self.client.log_batch, self.run_id,
                   tags=[_mlflow().RunTag(k, str(v)) for k, v in tags.items()])

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if isinstance(exc, TrackingError):
            return False  # the server is gone: the run stays RUNNING (docs/errors.md)
        try:
            self._call("ending the run", self.client.set_terminated, self.run_id, end_status(exc_type))
        except TrackingError as err:
            if exc_type is None:
                raise TrackingError(f"{err}; the stage's outputs are written and run {self.run_id} is "
                                    "left RUNNING: restart the server, then `dvc commit` keeps the "
                                    "outputs (or `dvc repro` reruns the stage)") from err
            print(f"warning: {err}; run {self.run_id} is left RUNNING", file=sys.stderr)
        return False


class StageRun(_Run):
    """A new run for one stage execution, tagged, under its group's parent run."""

    def __init__(self, uri, experiment, run_name, tags, params, artifact_root, retry_s=RETRY_S):
        check_reachable(uri)
        client = _mlflow().MlflowClient(tracking_uri=uri)
        exp_id = _experiment_id(client, experiment, artifact_root)
        parent = _group_parent(client, exp_id, tags[GROUP_TAG])
        self.ended_dead_runs = end_dead_runs(client, exp_id)
        tags = {**tags, "mlflow.parentRunId": parent, "host": socket.gethostname(), "pid": str(os.getpid())}
        super().__init__(client, client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id, uri,
                         retry_s)
        self._call("logging the stage's params", _log_params, client, self.run_id, params)


class SweepRun(_Run):
    """The parent run of a sweep (its trials are children); `run_id` reopens it on resume."""

    def __init__(self, uri, experiment, run_name, tags, params, artifact_root, run_id=None):
        check_reachable(uri)
        client = _mlflow().MlflowClient(tracking_uri=uri)
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
    client = _mlflow().MlflowClient(tracking_uri=uri)
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
    """Picklable `log(metrics, step)` for a run: Ray workers receive it and log from rank 0.

    A call only queues the metrics and returns: a daemon thread, started by the first
    call in each process, sends what has queued in `log_batch` calls of at most
    MAX_METRICS and retries a failing server for `retry_s` (what is still unsent after
    that is dropped, with a warning). `flush()` waits until the queue is empty; the
    training worker calls it when its loop ends (pipeline.training.ray_train)."""

    def __init__(self, uri, run_id, retry_s=RETRY_S):
        self.uri, self.run_id, self.retry_s = uri, run_id, retry_s
        self._queue = self._thread = None
        self.sent = self.dropped = 0

    def __getstate__(self):  # a copy starts with an empty queue and no thread
        return {"uri": self.uri, "run_id": self.run_id, "retry_s": self.retry_s}

    def __setstate__(self, state):
        self.__init__(**state)

    def __call__(self, metrics, step):
        now = int(time.time() * 1000)
        if self._thread is None:
            self._queue = queue.Queue()
            self._thread = threading.Thread(target=self._send_forever, daemon=True, name="mlflow-metrics")
            self._thread.start()
        self._queue.put([(k, float(v), now, int(step)) for k, v in metrics.items()])  # Metric()s: in the sender

    def flush(self, timeout_s=None):
        """Wait (at most `timeout_s`; default: the retry window plus a minute) until every
        queued metric is sent or dropped; True when none is left."""
        if self._queue is None:
            return True
        deadline = time.monotonic() + (self.retry_s + 60.0 if timeout_s is None else timeout_s)
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self._queue.unfinished_tasks

    def _send_forever(self):
        mlflow = _mlflow()  # imported by this thread, not by the training loop
        client, Metric = mlflow.MlflowClient(tracking_uri=self.uri), mlflow.Metric
        while True:
            batches = [self._queue.get()]
            while not self._queue.empty() and sum(map(len, batches)) < MAX_METRICS:
                batches.append(self._queue.get())
            unsent = sum(map(len, batches))
            try:
                for part in chunks([Metric(*m) for b in batches for m in b]):
                    retrying(lambda p=part: client.log_batch(self.run_id, metrics=p), self.retry_s,
                             "logging training metrics", self.uri)
                    self.sent, unsent = self.sent + len(part), unsent - len(part)
            except TrackingError as err:
                self.dropped += unsent
                print(f"warning: {err}; {self.dropped} metrics of run {self.run_id} dropped", file=sys.stderr)
            finally:
                for _ in batches:
                    self._queue.task_done()


def _param(key, value):
    return _mlflow().Param(key, str(value)[:6000])


def _flatten(d, prefix=""):
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.extend(_flatten(v, key + "."))
        else:
            out.append((key, v))
    return out
