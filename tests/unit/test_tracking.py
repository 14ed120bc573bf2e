"""MLflow helpers: tagged, nested runs in a SQLite store, a picklable metric logger,
a down tracking server reported before any work, and a real server that stops answering
mid-run (its metrics arrive once it returns; gone for good, one line)."""
import os
import pickle
import subprocess

import pytest
from mlflow.entities import RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.runtime.tracking import StageRun, TrackingError, check_reachable, params_hash, retrying

from tests.mlflow_server import MlflowServer, free_port


def test_down_server_is_named(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(TrackingError, match=uri):
        check_reachable(uri, timeout_s=2)
    with pytest.raises(TrackingError, match="not reachable"):
        StageRun(uri, "e", "r", {"group": "g"}, {}, artifact_root=tmp_path.as_uri())


def test_stage_runs_nest_under_their_group_and_log_steps(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tags = {"group": "g1", "stage": "evaluate", "model": "diffusion"}
    with StageRun(uri, "exp", "evaluate@diffusion", tags, {"evaluate": {"nfe": [1, 2]}},
                  artifact_root=(tmp_path / "a").as_uri()) as run:
        child = run.child("diffusion/heun", {"sampler": "heun"})
        with child:
            logger = pickle.loads(pickle.dumps(child.logger()))  # travels to Ray workers
            for nfe, fid in ((1, 9.0), (3, 4.0)):
                logger({"fid": fid}, nfe)
    with StageRun(uri, "exp", "report", {"group": "g1", "stage": "report"}, {},
                  artifact_root=(tmp_path / "a").as_uri()):
        pass
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("exp")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    parent = runs["pipeline g1"]
    assert runs["evaluate@diffusion"].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert runs["report"].data.tags["mlflow.parentRunId"] == parent.info.run_id  # one parent per group
    heun = runs["diffusion/heun"]
    assert heun.data.tags["mlflow.parentRunId"] == runs["evaluate@diffusion"].info.run_id
    assert heun.data.tags["model"] == "diffusion" and heun.data.tags["sampler"] == "heun"
    assert runs["evaluate@diffusion"].data.params["evaluate.nfe"] == "[1, 2]"
    curve = sorted((m.step, m.value) for m in client.get_metric_history(heun.info.run_id, "fid"))
    assert curve == [(1, 9.0), (3, 4.0)]
    assert heun.info.status == "FINISHED"


def test_a_stage_that_loses_the_race_to_create_the_experiment_joins_it(tmp_path, monkeypatch):
    """Two stages starting at once on a new server (two `dvc exp` queue workers) both find the
    experiment missing; the second create fails, and that stage must use the first's."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    other = MlflowClient(uri)
    lookup = MlflowClient.get_experiment_by_name
    seen = []

    def missing_once(self, name):  # the other stage creates it just after this one looked
        if not seen:
            seen.append(name)
            other.create_experiment(name, artifact_location=(tmp_path / "a").as_uri())
            return None
        return lookup(self, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", missing_once)
    with StageRun(uri, "exp", "distill@cd", {"group": "g1", "stage": "distill"}, {},
                  artifact_root=(tmp_path / "a").as_uri()) as run:
        run_id = run.run_id
    monkeypatch.undo()
    exps = [e for e in other.search_experiments() if e.name == "exp"]
    assert seen == ["exp"] and len(exps) == 1
    assert {r.info.run_name for r in other.search_runs([exps[0].experiment_id])} == {"pipeline g1", "distill@cd"}
    assert other.get_run(run_id).info.experiment_id == exps[0].experiment_id


def test_params_hash_is_order_independent():
    assert params_hash({"a": 1, "b": {"c": 2}}) == params_hash({"b": {"c": 2}, "a": 1})
    assert params_hash({"a": 1}) != params_hash({"a": 2})


# --- a tracking server that stops answering ------------------------------------------------

@pytest.fixture
def fast_failing_http(monkeypatch):
    """One try per MLflow request, so an outage shows within seconds, not MLflow's ~4 min."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


@pytest.mark.faults
def test_retrying_outlasts_a_short_failure_and_names_a_long_one():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("refused")
        return "ok"

    assert retrying(flaky, 30, "testing", "http://x") == "ok" and len(calls) == 3
    with pytest.raises(TrackingError, match=r"http://x did not answer for 1 s while testing \(ConnectionError"):
        retrying(lambda: (_ for _ in ()).throw(ConnectionError("refused")), 1, "testing", "http://x")
    refused = []

    def bad_request():
        refused.append(1)
        raise MlflowException.invalid_parameter_value("metric value is not a number")

    with pytest.raises(MlflowException, match="not a number"):
        retrying(bad_request, 30, "testing", "http://x")
    assert len(refused) == 1  # the server's answer would not change: not retried


@pytest.mark.faults
@pytest.mark.slow
def test_metrics_logged_while_the_server_is_down_arrive_after_it_returns(tmp_path, fast_failing_http):
    with MlflowServer(tmp_path / "server") as server:
        run = StageRun(server.uri, "e", "teacher@diffusion", {"group": "g"}, {"a": 1},
                       artifact_root=(tmp_path / "a").as_uri(), retry_s=120)
        logger = run.logger()
        logger({"train/loss": 1.0}, 1)
        assert logger.flush(30)
        server.stop()
        for step in range(2, 6):
            logger({"train/loss": 1.0 / step}, step)  # returns: the calls only queue
        assert logger._queue.unfinished_tasks > 0  # nothing got through while the server is down
        server.start()
        assert logger.flush(120) and logger.dropped == 0
        with run:
            run.log_metrics({"done": 1.0})
        client = MlflowClient(server.uri)
        history = client.get_metric_history(run.run_id, "train/loss")
        assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]
        assert client.get_run(run.run_id).info.status == "FINISHED"


@pytest.mark.faults
@pytest.mark.slow
def test_a_server_gone_for_good_ends_the_run_with_one_line(tmp_path, fast_failing_http):
    server = MlflowServer(tmp_path / "server").start()
    try:
        run = StageRun(server.uri, "e", "report", {"group": "g"}, {}, artifact_root=(tmp_path / "a").as_uri(),
                       retry_s=2)
        logger = run.logger()
        server.stop()
        logger({"train/loss": 1.0}, 1)
        assert logger.flush(60) and logger.dropped == 1  # given up after the window, with a warning
        with pytest.raises(TrackingError) as err:
            with run:
                pass  # the stage's work, its outputs written
        message = str(err.value)
        assert "\n" not in message and server.uri in message
        assert f"run {run.run_id} is left RUNNING" in message and "dvc commit" in message
        server.start()
        assert MlflowClient(server.uri).get_run(run.run_id).info.status == "RUNNING"
    finally:
        server.stop()


@pytest.mark.faults
def test_interrupted_runs_end_killed_and_a_dead_stage_run_is_ended_by_the_next(tmp_path):
    uri, root = f"sqlite:///{tmp_path / 'mlflow.db'}", (tmp_path / "a").as_uri()
    tags = {"group": "g", "stage": "teacher", "model": "diffusion"}
    client = MlflowClient(uri)
    with pytest.raises(KeyboardInterrupt):
        with StageRun(uri, "e", "teacher@diffusion", tags, {}, artifact_root=root) as ctrl_c:
            raise KeyboardInterrupt  # Ctrl-C, or SIGTERM through stages/common.py
    assert client.get_run(ctrl_c.run_id).info.status == "KILLED"

    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer exists: a stage killed with SIGKILL
    alive = StageRun(uri, "e", "teacher@bridge", {**tags, "model": "bridge"}, {}, artifact_root=root)
    killed = StageRun(uri, "e", "teacher@diffusion", tags, {}, artifact_root=root)
    elsewhere = StageRun(uri, "e", "teacher@diffusion", tags, {}, artifact_root=root)
    client.set_tag(killed.run_id, "pid", str(gone.pid))
    client.log_batch(elsewhere.run_id, tags=[RunTag("pid", str(gone.pid)), RunTag("host", "another-host")])
    assert client.get_run(killed.run_id).info.status == "RUNNING"
    # the next stage to start, in another group (a rerun after a params change)
    again = StageRun(uri, "e", "report", {"group": "g2", "stage": "report"}, {}, artifact_root=root)
    assert again.ended_dead_runs == [killed.run_id]
    assert client.get_run(killed.run_id).info.status == "KILLED"
    assert client.get_run(alive.run_id).info.status == "RUNNING"  # its process is alive
    assert client.get_run(elsewhere.run_id).info.status == "RUNNING"  # its pid is another host's
    assert client.get_run(again.run_id).data.tags["pid"] == str(os.getpid())
