"""MLflow helpers: tagged, nested runs in a SQLite store, a picklable metric logger,
and a down tracking server reported before any work."""
import pickle
import socket

import pytest
from mlflow.tracking import MlflowClient

from pipeline.tracking import StageRun, TrackingError, check_reachable, params_hash


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def test_params_hash_is_order_independent():
    assert params_hash({"a": 1, "b": {"c": 2}}) == params_hash({"b": {"c": 2}, "a": 1})
    assert params_hash({"a": 1}) != params_hash({"a": 2})
