"""The smoke project shared by the integration modules: one `dvc repro` of the smoke
profile in a temporary copy of the project (a git repo with dvc.lock committed, so
`dvc exp` has a baseline), on the session's Ray cluster through RAY_ADDRESS, tracked by a
real `mlflow server` (SQLite backend, 127.0.0.1) through MLFLOW_TRACKING_URI."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, smoke_params
from tests.mlflow_server import MlflowServer

COPIED = ["pipeline", "stages", "scripts", "sweeps", "notebooks", "pretrained", "dvc.yaml", ".dvc/config", ".dvc/.gitignore",
          ".dvc/plots", ".dvcignore", "pyproject.toml"]


def sh(cmd, cwd, env, check=True):
    out = subprocess.run(cmd, cwd=cwd, env=env, shell=True, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise AssertionError(f"{cmd} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return out


def copy_project(source, dest):
    """A copy of the smoke project (git, DVC cache and outputs) that a test may break,
    without Ray's results or DVC's scratch folder (locks, queue state)."""
    shutil.copytree(source, dest, symlinks=True, ignore=lambda d, names: [
        n for n in names if n == "ray_results" or (Path(d).name == ".dvc" and n == "tmp")])
    return dest


def copy_code(root):
    """The project's code, dvc.yaml and DVC config (COPIED) into `root`, as a fresh clone has them."""
    for name in COPIED:
        src, dst = ROOT / name, root / name
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    (root / ".gitignore").write_text((ROOT / ".gitignore").read_text())


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    with MlflowServer(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server


@pytest.fixture(scope="session")
def project(tmp_path_factory, ray_address, mlflow_server):
    root = tmp_path_factory.mktemp("project")
    copy_code(root)
    (root / "params.yaml").write_text(yaml.safe_dump(smoke_params(), sort_keys=False))
    env = {**os.environ, "RAY_ADDRESS": ray_address, "PIPELINE_RUN_GROUP": "smoke",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    env["MLFLOW_TRACKING_URI"] = mlflow_server.uri
    env["PIPELINE_IMPORTS_LOG"] = str(tmp_path_factory.mktemp("imports") / "imports.jsonl")  # what each stage loaded
    sh("git init -q && git add -A && git commit -qm smoke", root, env)
    tick = time.perf_counter()
    sh("dvc repro", root, env)
    print(f"smoke dvc repro: {time.perf_counter() - tick:.1f} s")
    sh("git add dvc.lock && git commit -qm 'smoke: dvc.lock'", root, env)  # the baseline of `dvc exp`
    return root, env
