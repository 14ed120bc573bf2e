"""A tracking server killed in the middle of a training stage (the smoke profile's
teacher@diffusion on data the prepare stage wrote, against its own `mlflow server`): back within the retry window, the
stage completes with every metric; gone for good, it ends with one line after writing its
checkpoint, and the run is left RUNNING for `dvc commit` (docs/errors.md)."""
import os
import subprocess
import sys
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.models.checkpoint import load_checkpoint
from tests.conftest import ROOT, smoke_params
from tests.integration.conftest import sh
from tests.mlflow_server import MlflowServer

pytestmark = [pytest.mark.slow, pytest.mark.faults]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, ray_address):
    """A folder holding the smoke profile's prepared data (the prepare stage alone), and the
    environment that joins the session's Ray cluster: all a training stage reads."""
    root = tmp_path_factory.mktemp("outage")
    (root / "params.yaml").write_text(yaml.safe_dump(smoke_params(), sort_keys=False))
    env = {**os.environ, "RAY_ADDRESS": ray_address, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    sh(f"{sys.executable} {ROOT / 'stages' / 'prepare.py'} --out data/prepared", root, env)
    return root, env


def start_teacher(root, env, tmp_path, server, retry_s):
    params = smoke_params()
    params["tracking"]["retry_s"] = retry_s
    file = tmp_path / "params.yaml"
    file.write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**env, "MLFLOW_TRACKING_URI": server.uri, "PIPELINE_RUN_GROUP": f"outage-{retry_s}",
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "stages" / "teacher.py"), "diffusion", "--data",
                             "data/prepared", "--out", str(tmp_path / "diffusion.pt"), "--storage",
                             str(tmp_path / "ray"), "--params", str(file)],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, params["teacher"]["diffusion"]["train"]


def kill_once(server, proc, ready, timeout_s=300):
    """Kill the server as soon as the stage's run satisfies `ready(client, run)`."""
    client, deadline = MlflowClient(server.uri), time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        exp = client.get_experiment_by_name("distillation")
        runs = client.search_runs([exp.experiment_id], "tags.stage = 'teacher'") if exp else []
        if runs and ready(client, runs[0]):
            server.stop()
            return runs[0].info.run_id
        time.sleep(0.2)
    raise AssertionError(f"the teacher run never got ready; stage output:\n{proc.communicate()}")


def params_logged(client, run):  # the run is set up, its training not yet started
    return bool(run.data.params)


def training_logged(client, run):  # the training is under way
    return bool(client.get_metric_history(run.info.run_id, "train/loss"))


def logged_steps(train):
    return sorted(s for s in range(1, train["steps"] + 1) if s % train["log_every"] == 0 or s == train["steps"])


def test_server_back_within_the_window_loses_no_metric(prepared, tmp_path):
    root, env = prepared
    with MlflowServer(tmp_path / "server") as server:
        proc, train = start_teacher(root, env, tmp_path, server, retry_s=300)
        run_id = kill_once(server, proc, params_logged)
        down = time.monotonic()
        time.sleep(15)  # the outage: training starts and logs meanwhile
        server.start()
        back = time.monotonic()
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
        client = MlflowClient(server.uri)
        assert client.get_run(run_id).info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
        assert steps == logged_steps(train)
        assert (tmp_path / "diffusion.pt").exists()
        print(f"fault: tracking server down {back - down:.0f} s mid-stage | stage finished {time.monotonic() - back:.1f} s "
              f"after it returned | metrics lost {len(logged_steps(train)) - len(steps)} | outputs lost 0")


def test_server_gone_for_good_is_one_line_and_keeps_the_checkpoint(prepared, tmp_path):
    root, env = prepared
    server = MlflowServer(tmp_path / "server").start()
    try:
        proc, _ = start_teacher(root, env, tmp_path, server, retry_s=5)
        run_id = kill_once(server, proc, training_logged)
        down = time.monotonic()
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 1, err[-3000:]
        last = err.strip().splitlines()[-1]  # Ray's worker warnings may precede it
        assert last.startswith("teacher: MLflow tracking server ") and server.uri in last, err[-3000:]
        assert f"run {run_id} is left RUNNING" in last and "dvc commit" in last and "Traceback" not in err
        assert load_checkpoint(tmp_path / "diffusion.pt", ["teacher_diffusion"])  # the training result is kept
        server.start()
        assert MlflowClient(server.uri).get_run(run_id).info.status == "RUNNING"
        print(f"fault: tracking server gone for good | stage ended after {time.monotonic() - down:.1f} s "
              "with one line | checkpoint kept | run left RUNNING for `dvc commit`")
    finally:
        server.stop()
