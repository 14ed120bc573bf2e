"""`dvc repro` interrupted (SIGINT to its process group, as Ctrl-C sends it, or SIGKILL)
during training, during evaluation and while the report is written, in a copy of the
smoke project: the next `dvc repro` completes, `dvc.lock` matches what is on disk, a
retrained stage comes out bit-identical (never a plausible-but-stale output), and no
interrupted MLflow run is left RUNNING (docs/errors.md, "Interrupted runs")."""
import os
import signal
import subprocess
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.integration.conftest import sh

pytestmark = [pytest.mark.slow, pytest.mark.faults]


def lock_md5(root, stage):
    """{output path: md5} of `stage` as dvc.lock records it."""
    entry = yaml.safe_load((root / "dvc.lock").read_text())["stages"][stage]  # `teacher@diffusion` as it is
    return {o["path"]: o["md5"] for o in entry["outs"]}


def runs_of(env, group, stage):
    """The MLflow runs of `stage` (named like the DVC stage) in `group` (none before the
    first stage has made the experiment)."""
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("distillation")
    return [] if exp is None else [r for r in client.search_runs([exp.experiment_id], f"tags.group = '{group}'")
                                   if r.info.run_name == stage]


CASES = {  # stage, signal, what must exist before the signal is sent
    "SIGINT during training": ("teacher@diffusion", signal.SIGINT, "run"),  # its Ray Train job starting
    "SIGKILL during training": ("teacher@diffusion", signal.SIGKILL, "run"),
    "SIGINT during evaluation": ("evaluate@cd", signal.SIGINT, "run"),
    "SIGKILL during evaluation": ("evaluate@cd", signal.SIGKILL, "run"),
    # report writes its files before it opens its MLflow run (to log them as artifacts)
    "SIGINT while the report is written": ("report", signal.SIGINT, "results/fid_vs_nfe.csv"),
    "SIGKILL while the report is written": ("report", signal.SIGKILL, "results/fid_vs_nfe.csv"),
}


@pytest.mark.parametrize("case", CASES)
def test_an_interrupted_repro_completes_next_time(case, project_copy):
    stage, sig, ready = CASES[case]
    root, env = project_copy  # its own SQLite store: these runs never reach the smoke chain's server
    group = env["PIPELINE_RUN_GROUP"]
    before, lock_before = lock_md5(root, stage), (root / "dvc.lock").read_bytes()

    # A changed stage, as after an edit: DVC has no cached output for it, so the interrupted
    # run and the next one both really run it (an unchanged stage would just be checked out
    # from DVC's cache). A comment changes the script's hash, not what it computes.
    with open(root / "stages" / f"{stage.partition('@')[0]}.py", "a") as script:
        script.write("# edited: the stage runs again\n")
    if ready != "run":
        (root / ready).unlink()  # DVC removes it too; wait for the stage's own file
    proc = subprocess.Popen(["dvc", "repro", "-s", stage], cwd=root, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (runs_of(env, group, stage) if ready == "run" else (root / ready).exists()):
            break
        time.sleep(0.2)
    assert proc.poll() is None, f"{stage} ended before it could be interrupted:\n{proc.communicate()[0][-3000:]}"
    if ready == "run":
        time.sleep(1.0)  # into the stage's work
    os.killpg(proc.pid, sig)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0, out[-3000:]
    assert (root / "dvc.lock").read_bytes() == lock_before  # nothing half-done was recorded
    if sig == signal.SIGINT:  # the stage unwound: its run, if it had opened one, says so
        statuses = {r.info.status for r in runs_of(env, group, stage)}
        assert statuses == {"KILLED"} if ready == "run" else statuses <= {"KILLED"}, out[-3000:]

    tick = time.perf_counter()
    sh(f"dvc repro {stage}", root, env)
    rerun = time.perf_counter() - tick
    assert "up to date" in sh(f"dvc status {stage}", root, env).stdout
    statuses = [(r.info.run_name, r.info.status) for r in runs_of(env, group, stage)]
    assert not [s for s in statuses if s[1] == "RUNNING"], statuses  # a SIGKILLed run is ended by the rerun
    assert sorted(s for _, s in statuses).count("FINISHED") == 1, statuses
    if stage.startswith("teacher"):
        assert lock_md5(root, stage) == before  # retrained from the same inputs: the same bytes
    print(f"fault: {case} ({stage}) | next dvc repro {rerun:.1f} s, from the stage's start | "
          f"outputs lost 0 (dvc status clean) | runs left RUNNING 0")
