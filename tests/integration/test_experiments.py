"""Sweeps and DVC experiments on the smoke project: the shipped tiny sweep runs under
Ray Tune with ASHA, logs a parent run and one child per trial to MLflow, writes its
table and best configuration, resumes instead of starting over, and its `dvc exp run`
command reproduces the best trial in the pipeline, which `dvc exp show` and
`dvc plots diff` then compare."""
import json
import re
import time

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import release_placement_groups_of_ended_jobs
from tests.integration.conftest import copy_project, sh
from tests.mlflow_server import MlflowServer

pytestmark = pytest.mark.slow

SWEEP = "tiny_cd_lr"


@pytest.fixture(scope="module")
def sweep(project):
    root, env = project
    out = sh(f"python stages/sweep.py sweeps/{SWEEP}.yaml", root, env)
    return root, env, out.stdout


def ran_stages(stdout):
    return {line.split("'")[1] for line in stdout.splitlines() if line.startswith("Running stage")}


def sweep_runs(env):
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("distillation")
    parent = client.search_runs([exp.experiment_id], f"tags.stage = 'sweep' and tags.sweep = '{SWEEP}'")
    trials = client.search_runs([exp.experiment_id], f"tags.stage = 'sweep_trial' and tags.sweep = '{SWEEP}'")
    return client, parent, trials


def test_sweep_writes_trials_and_the_best_configuration(sweep):
    root, _, stdout = sweep
    spec = yaml.safe_load((root / "sweeps" / f"{SWEEP}.yaml").read_text())
    table = pd.read_csv(root / "results" / "sweeps" / SWEEP / "trials.csv")
    lrs = spec["space"]["distill.cd.train.lr"]["grid"]
    assert sorted(table["distill.cd.train.lr"]) == sorted(lrs)
    assert set(table["status"]) <= {"finished", "stopped"} and "finished" in set(table["status"])
    assert (table["nfe"] == spec["objective"]["nfe"]).all() and table["fid"].notna().all()
    best = json.loads((root / "results" / "sweeps" / SWEEP / "best.json").read_text())
    finished = table[table["status"] == "finished"]
    assert best["value"] == pytest.approx(finished["fid"].min())
    assert best["config"] == {"distill.cd.train.steps": 20, "distill.cd.train.lr": best["config"]["distill.cd.train.lr"]}
    assert best["command"].startswith("dvc exp run -S distill.cd.train.steps=20 -S distill.cd.train.lr=")
    assert best["command"] in stdout


def test_sweep_is_a_parent_run_with_one_child_per_trial(sweep):
    root, env, _ = sweep
    client, parents, trials = sweep_runs(env)
    assert len(parents) == 1 and len(trials) == 2
    parent = parents[0]
    table = pd.read_csv(root / "results" / "sweeps" / SWEEP / "trials.csv")
    assert set(table["mlflow_run_id"]) == {t.info.run_id for t in trials}
    assert parent.data.metrics["best_fid"] == pytest.approx(table[table["status"] == "finished"]["fid"].min())
    for trial in trials:
        tags = trial.data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id and tags["method"] == "cd"
        assert tags["sweep_status"] in {"finished", "stopped"} and trial.info.status == "FINISHED"
        assert float(trial.data.params["distill.cd.train.lr"]) in (0.0001, 0.001)
        steps = [m.step for m in client.get_metric_history(trial.info.run_id, "sweep/fid")]
        assert steps == sorted(steps) and steps[0] == 10  # scored at every eval_every steps
        assert (20 in steps) == (tags["sweep_status"] == "finished")
        assert client.get_metric_history(trial.info.run_id, "train/loss")


def test_running_a_finished_sweep_again_resumes_it(sweep):
    root, env, _ = sweep
    before = pd.read_csv(root / "results" / "sweeps" / SWEEP / "trials.csv")
    sh(f"python stages/sweep.py sweeps/{SWEEP}.yaml", root, env)
    after = pd.read_csv(root / "results" / "sweeps" / SWEEP / "trials.csv")
    assert sorted(after["trial_id"]) == sorted(before["trial_id"])  # restored, not rerun
    _, parents, trials = sweep_runs(env)
    assert len(parents) == 1 and len(trials) == 2


def test_a_bad_sweep_fails_before_starting_and_names_the_key(project, tmp_path):
    root, env = project
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: distill@cd\nspace:\n  distill.cd.ema_mu: {grid: [0.5, 1.5]}\n")
    out = sh(f"python stages/sweep.py {bad}", root, env, check=False)
    assert out.returncode != 0 and "distill.cd.ema_mu=1.5" in out.stderr
    assert "Started a local Ray" not in out.stderr and not (root / "results" / "sweeps" / "bad").exists()


@pytest.fixture(scope="module")
def queued(sweep, tmp_path_factory):
    """The sweep's best command and a second experiment (another key), queued with `dvc exp run
    --queue` and run by two DVC queue workers at once, in a copy of the smoke project after the
    sweep, tracked by its own MLflow server (these runs must not become the newest group of
    the smoke chain's). Both experiments reach the same stages, so one pair of runs serves
    the reproduction check and the side-by-side one."""
    source, env, _ = sweep
    release_placement_groups_of_ended_jobs()  # both experiments' training stages need a CPU at once
    tmp = tmp_path_factory.mktemp("queued")
    root = copy_project(source, tmp / "project")
    command = json.loads((root / "results" / "sweeps" / SWEEP / "best.json").read_text())["command"]
    with MlflowServer(tmp / "server") as server:
        # a group per experiment (commit + params), both on one server
        env = {**{k: v for k, v in env.items() if k != "PIPELINE_RUN_GROUP"}, "MLFLOW_TRACKING_URI": server.uri}
        sh(command.replace("dvc exp run", "dvc exp run --queue --name best-lr"), root, env)
        sh("dvc exp run --queue --name ema -S distill.cd.ema_mu=0.9", root, env)
        status = run_queue(root, env)
        client = MlflowClient(server.uri)
        exp = client.get_experiment_by_name("distillation")
        runs = client.search_runs([exp.experiment_id], "tags.stage = 'distill' and tags.model = 'cd'")
        yield root, env, command, status, runs


def run_queue(root, env, timeout_s=900):
    """`dvc queue start -j 2`, then wait until nothing is queued or running; the last status."""
    sh("dvc queue start -j 2", root, env)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = sh("dvc queue status", root, env).stdout
        if not any(word in status for word in ("Queued", "Running")):
            break
        time.sleep(5)
    sh("dvc queue stop --kill", root, env, check=False)
    return status


def test_best_command_reproduces_in_dvc_experiments(queued):
    """The printed `dvc exp run -S ...` reruns only the swept student's branch; a second
    experiment changes another key; `dvc exp show` lists their metrics and `dvc plots diff`
    draws both FID-vs-NFE curves."""
    root, env, _, _, _ = queued
    for name in ("best-lr", "ema"):
        assert ran_stages(sh(f"dvc queue logs {name}", root, env).stdout) == {"distill@cd", "evaluate@cd", "report"}
    shown = json.loads(sh("dvc exp show --json", root, env).stdout)
    experiments = _experiments(shown)
    assert {"best-lr", "ema"} <= set(experiments)
    for name in ("best-lr", "ema"):
        metrics = experiments[name]["data"]["metrics"]
        assert list(metrics) == ["results/headline.json"]  # the headline, not every (sampler, NFE) point
        headline = metrics["results/headline.json"]["data"]
        assert set(headline) == set(yaml.safe_load((root / "params.yaml").read_text())["evaluate"]["models"])
        assert headline["cd"]["fid"] > 0 and {"fid", "teacher_best_fid", "speedup"} <= set(headline["cd"])
    diff = json.loads(sh("dvc metrics diff best-lr ema --json", root, env).stdout)
    assert "cd.fid" in diff["results/headline.json"]  # the two students differ; the teachers do not
    assert "diffusion.teacher_best_fid" not in diff["results/headline.json"]
    ema = experiments["ema"]["data"]["params"]["params.yaml"]["data"]["distill"]["cd"]["ema_mu"]
    assert ema == 0.9
    plots = json.loads(sh("dvc plots diff best-lr ema --json", root, env).stdout)
    assert not plots.get("errors"), plots.get("errors")
    (entry,) = plots["data"]["results/fid_vs_nfe_curves.csv"]
    assert entry["revisions"] == ["best-lr", "ema"]
    curves = {}
    for point in entry["content"]["data"]["values"]:
        curves.setdefault((point["rev"], point["curve"]), []).append(float(point["fid"]))
    assert ("best-lr", "cd/student") in curves and ("ema", "cd/student") in curves
    assert curves[("best-lr", "cd/student")] != curves[("ema", "cd/student")]  # two different students
    assert curves[("best-lr", "diffusion/ddim")] == curves[("ema", "diffusion/ddim")]  # one shared teacher
    assert plots["data"]["results/verdicts.csv"][0]["revisions"] == ["best-lr", "ema"]
    # Offline: both runs' charts rendered by scripts/plots.py, the Vega scripts inlined, no CDN.
    out = root / "offline"
    sh(f"python scripts/plots.py best-lr ema -o {out}", root, env)
    for stem in ("results_verdicts", "results_fid_vs_nfe_curves"):
        html = (out / f"{stem}.html").read_text()
        assert not re.search(r"<script[^>]+src=", html) and "vegaEmbed" in html, stem
        assert '"rev":"best-lr"' in html.replace(" ", "") and '"rev":"ema"' in html.replace(" ", ""), stem
        assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _experiments(shown):
    """{name: experiment} from `dvc exp show --json` (a list of baselines with experiments)."""
    found = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs", []):
                if rev.get("name"):
                    found[rev["name"]] = rev
    return found


@pytest.mark.faults
def test_two_queued_experiments_run_side_by_side(queued):
    """Two DVC queue workers at once: both experiments complete, `dvc exp show` lists both with
    their params and metrics, and their MLflow server holds each one's distill run, FINISHED."""
    root, env, command, status, runs = queued
    assert "Failed" not in status and status.count("Success") == 2, status
    experiments = _experiments(json.loads(sh("dvc exp show --json", root, env).stdout))
    best_lr = float(command.split("distill.cd.train.lr=")[1].split()[0])
    cd = {name: experiments[name]["data"]["params"]["params.yaml"]["data"]["distill"]["cd"] for name in ("best-lr", "ema")}
    assert cd["best-lr"]["train"]["lr"] == best_lr and cd["ema"]["ema_mu"] == 0.9
    for name in ("best-lr", "ema"):
        assert experiments[name]["data"]["metrics"]["results/headline.json"]["data"]["cd"]["fid"] > 0
    base = yaml.safe_load((root / "params.yaml").read_text())["distill"]["cd"]  # the baseline's
    ran = sorted((float(r.data.params["distill.cd.train.lr"]), float(r.data.params["distill.cd.ema_mu"]),
                  r.info.status) for r in runs)
    assert ran == sorted([(best_lr, base["ema_mu"], "FINISHED"), (base["train"]["lr"], 0.9, "FINISHED")]), ran
