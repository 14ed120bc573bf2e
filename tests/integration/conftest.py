"""The smoke project shared by the integration modules: one `dvc repro` of the smoke
profile in a temporary copy of the project (a git repo with dvc.lock committed, so
`dvc exp` has a baseline), on the session's Ray cluster through RAY_ADDRESS, tracked by a
real `mlflow server` (SQLite backend, 127.0.0.1) through MLFLOW_TRACKING_URI."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, SMOKE_BUILDER_SELECTED, smoke_params
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


def loaded_modules_outside_deps(root, imports_log):
    """Fails naming each stage of the project at `root` that loaded a library module (as
    PIPELINE_IMPORTS_LOG recorded it) lying under none of its dvc.yaml deps, or that never
    ran; returns the log's entries."""
    from dvc.repo import Repo

    from tests.unit.test_dvc_yaml import PLUMBING
    deps = {s.name: [d.def_path for d in s.deps] for s in Repo(str(root)).index.stages}  # name: no path prefix
    logged = [json.loads(line) for line in Path(imports_log).read_text().splitlines()]
    assert {entry["stage"] for entry in logged} == set(deps)  # every stage ran and logged
    missing = {}
    for entry in logged:
        uncovered = [m for m in entry["modules"] if not m.startswith(PLUMBING)
                     and not any(m == d or m.startswith(d.rstrip("/") + "/") for d in deps[entry["stage"]])]
        if uncovered:
            missing[entry["stage"]] = uncovered
    assert not missing, f"stages loaded library modules their dvc.yaml entry does not list: {missing}"
    return logged


def project_env(ray_address, tracking_uri, group):
    """The environment a stage of a test project runs in: the session's Ray cluster, an MLflow
    store, a run group, git's identity and this interpreter's scripts (dvc) on PATH."""
    return {**os.environ, "RAY_ADDRESS": ray_address, "MLFLOW_TRACKING_URI": tracking_uri,
            "PIPELINE_RUN_GROUP": group, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
            "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}


def build_smoke_project(root, env):
    """The smoke profile's whole chain in `root`: code, params, git, `dvc repro`, and dvc.lock
    committed (the baseline of `dvc exp`)."""
    copy_code(root)
    (root / "params.yaml").write_text(yaml.safe_dump(smoke_params(), sort_keys=False))
    sh("git init -q && git add -A && git commit -qm smoke", root, env)
    tick = time.perf_counter()
    sh("dvc repro", root, env)
    print(f"smoke dvc repro: {time.perf_counter() - tick:.1f} s")
    sh("git add dvc.lock && git commit -qm 'smoke: dvc.lock'", root, env)


class SharedBuild:
    """The smoke project, built once per pytest run and shared by the pytest-xdist workers.

    The worker that runs the smoke project's own tests (the group of the `project` fixture,
    tests/conftest.py) builds it in a folder every worker sees (the parent of the workers'
    temporary folders), copies it once, untouched, to `pristine`, then writes `done`. Tests
    that change or break a project (`project_copy`) take a copy of `pristine` on whichever
    worker runs them, so they no longer wait in line behind the builder's group. The build is
    claimed with an atomic hard link, so two workers never build it; a failed build writes
    `failed` with its error, which every waiting test reports."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.root, self.pristine = self.folder / "project", self.folder / "pristine"

    def claim(self):
        """True for the first caller of this pytest run, False for every later one."""
        mine = self.folder / f"claim-{os.getpid()}"
        mine.write_text(os.environ.get("PYTEST_XDIST_WORKER", "main"))
        try:
            os.link(mine, self.folder / "claim")
            return True
        except FileExistsError:
            return False
        finally:
            mine.unlink()

    def build(self, env):
        try:
            build_smoke_project(self.root, env)
            copy_project(self.root, self.pristine)
        except BaseException as error:
            (self.folder / "failed").write_text(f"{type(error).__name__}: {error}"[-5000:])
            raise
        (self.folder / "done").touch()

    def wait(self, timeout_s=2000):
        """The pristine copy, once the builder has made it; fails with the builder's error."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if (self.folder / "failed").exists():
                pytest.fail(f"the smoke project's build failed on another worker:\n"
                            f"{(self.folder / 'failed').read_text()}")
            if (self.folder / "done").exists():
                return self.pristine
            time.sleep(2)
        pytest.fail(f"the smoke project was not built within {timeout_s} s ({self.folder})")


@pytest.fixture(scope="session")
def shared_build(tmp_path_factory, worker_id):
    base = tmp_path_factory.getbasetemp()
    return SharedBuild((base.parent if worker_id != "master" else base) / "smoke-build")


@pytest.fixture(scope="session")
def project(shared_build, ray_address, mlflow_server, tmp_path_factory):
    """The smoke project, built by this worker (see SharedBuild), tracked by the session's
    MLflow server; its tests may read it and change it in ways they undo."""
    if not shared_build.claim():
        pytest.fail("another pytest-xdist worker claimed the smoke project's build: the tests of the "
                    "`project` fixture must be one xdist group (tests/conftest.py)")
    env = project_env(ray_address, mlflow_server.uri, "smoke")
    env["PIPELINE_IMPORTS_LOG"] = str(tmp_path_factory.mktemp("imports") / "imports.jsonl")  # what each stage loaded
    shared_build.build(env)
    return shared_build.root, env


@pytest.fixture(scope="session")
def smoke_build(request, shared_build, worker_id):
    """The pristine smoke project, as soon as it is built. When tests of `project` are
    selected, their worker builds it and this waits; without xdist it is built right here
    (through `project`); when none is selected, the first worker to need it builds it."""
    builder_selected = request.config.stash.get(SMOKE_BUILDER_SELECTED, False)
    if builder_selected and worker_id == "master":
        request.getfixturevalue("project")
        return shared_build.pristine
    if not builder_selected and shared_build.claim():
        server = request.getfixturevalue("mlflow_server")
        shared_build.build(project_env(request.getfixturevalue("ray_address"), server.uri, "smoke"))
        return shared_build.pristine
    return shared_build.wait()


@pytest.fixture
def project_copy(smoke_build, idle_cluster, tmp_path, request):
    """A copy of the pristine smoke project that the test may change or break, on this worker's
    Ray cluster (once idle) and tracked in its own SQLite store (the test's runs never become a
    group of the smoke chain's server); its run group is named after the test."""
    root = copy_project(smoke_build, tmp_path / "project")
    group = "copy-" + "".join(c if c.isalnum() else "-" for c in request.node.name)[:60]
    return root, project_env(idle_cluster, f"sqlite:///{root / 'mlflow.db'}", group)
