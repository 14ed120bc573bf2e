"""Shared fixtures: the smoke profile and a Ray cluster owned by this process.

The cluster is started with `ray.init` here (not `ray start`), so tearing it
down never touches Ray processes that belong to anyone else on the host.
Stage subprocesses join it through RAY_ADDRESS, which saves a Ray start per
stage.
"""
import os
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
# Whether any selected test uses the `project` fixture (its worker then builds the smoke
# project for the copies; tests/integration/conftest.py), set once the selection is final.
SMOKE_BUILDER_SELECTED = pytest.StashKey[bool]()


# The students the smoke chain trains and evaluates through their DVC stages; the others
# (mm, pd, dmd2, scm) run through theirs in the profile chain
# (tests/integration/test_profile_chain.py), so every method's stage runs in one of the two
# chains, and every method runs in-process in tests/contract and tests/unit. The smoke chain
# keeps the bridge's students (ibmd; cdbm needs its DDBM-style bridge, which the profile's
# class-conditional task has no use for) and the two that its tests break or sweep (tdd, cd).
SMOKE_METHODS = {"ibmd": "bridge", "cdbm": "bridge", "tdd": "diffusion", "cd": "diffusion"}


def keep_students(params, methods):
    """`params` training and evaluating only the students of `methods` (the others' blocks stay)."""
    params["distill"]["methods"] = {m: t for m, t in params["distill"]["methods"].items() if m in methods}
    params["evaluate"]["models"] = [m for m in params["evaluate"]["models"]
                                    if m not in params["distill"] or m in methods]
    return params


def smoke_params():
    """The real params.yaml shrunk to seconds: 8x8 digits, tiny nets, a few steps, the students
    of SMOKE_METHODS."""
    params = keep_students(yaml.safe_load((ROOT / "params.yaml").read_text()), SMOKE_METHODS)
    params["data"].update(source={"kind": "digits"}, n_test=100, n_reference=200, shard_size=400)
    params["corruption"] = {"kind": "super_resolution", "factor": 2, "mode": "pool"}
    params["features"]["train"].update(steps=60, log_every=20, checkpoint_every=60)
    params["features"]["classifier"].update(channels=[16, 32], feature_dim=32)
    for name in ("diffusion", "bridge"):
        teacher = params["teacher"][name]
        teacher["net"].update(patch=2, channels=[16, 16], emb_dim=32)
        teacher["train"].update(steps=30, batch_size=32, log_every=10, checkpoint_every=30,
                                warmup_steps=5)
    for method in params["distill"]["methods"]:
        params["distill"][method]["train"].update(steps=4, batch_size=16, log_every=2, checkpoint_every=4)
    params["distill"]["pd"].update(start_steps=16, rounds=2)  # 16 -> 8 -> 4: two rounds of two steps
    params["evaluate"].update(nfe=[1, 2, 4], n_samples=48, batch_size=24, grid_samples=8, seeds=[1, 2],
                              groups=8)
    return params


@pytest.fixture(scope="session")
def ray_address():
    import ray

    from pipeline.runtime.cluster import RAY_ENV
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": dict(RAY_ENV)})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def release_placement_groups_of_ended_jobs():
    """Remove the placement groups that jobs (stage processes) which have ended left on the
    session's cluster. Ray Train keeps a run's placement group for a detached cleaner actor to
    remove once the run's controller is gone; that cleaner asks Ray's state API whether the
    controller lives, and with two test clusters on one host (two pytest-xdist workers) the
    query fails ("Found multiple active Ray instances") and the cleaner stops watching, so a
    run whose controller did not remove its group itself leaves it behind, holding CPUs for
    good (seen in CI: a 1-CPU group of a training stage that ended with its tracking server
    down). The cluster is this process's own: nothing else's groups are removed. Returns how
    many were removed."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    ended = {job["JobID"] for job in ray._private.state.jobs() if job["IsDead"]}
    leaked = [pg_id for pg_id, pg in ray.util.placement_group_table().items()
              if pg["state"] != "REMOVED" and pg_id[-8:] in ended]  # a group's id ends with its job's
    for pg_id in leaked:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
    return len(leaked)


@pytest.fixture
def idle_cluster(ray_address):
    """The session's cluster once every CPU is free again. Stage processes of earlier tests
    joined it, and their workers and placement groups go away shortly after those processes
    end; a Ray Train job started before then would wait for CPUs. Groups that ended jobs left
    for good are removed (release_placement_groups_of_ended_jobs). Waits at most 120 s, then
    fails naming the placement groups that still hold resources."""
    import ray

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        release_placement_groups_of_ended_jobs()
        if ray.available_resources().get("CPU", 0) >= ray.cluster_resources().get("CPU", 0):
            return ray_address
        time.sleep(0.5)
    held = {pg_id: (pg["state"], pg["bundles"]) for pg_id, pg in ray.util.placement_group_table().items()
            if pg["state"] != "REMOVED"}
    pytest.fail(f"the test cluster still has {ray.available_resources().get('CPU', 0)} of "
                f"{ray.cluster_resources().get('CPU', 0)} CPUs free after 120 s; placement groups: {held}")


def one_torch_thread():
    """One torch thread for a test (a module opts in as an autouse fixture), then back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    _group_for_xdist(items)
    if getattr(config.option, "loadgroup", False):  # on an xdist worker
        _longest_first(items)
    _skip_gpu_tests_without_cuda(items)


def pytest_collection_finish(session):
    session.config.stash[SMOKE_BUILDER_SELECTED] = any("project" in item.fixturenames for item in session.items)


@pytest.hookimpl(optionalhook=True)  # an xdist hook, called on the controller per worker
def pytest_xdist_node_collection_finished(node, ids):
    """Stop when xdist did not write the groups into the test ids its scheduler reads: the
    run would build a shared fixture on both workers instead of failing anything."""
    if node.config.getvalue("dist") == "loadgroup" and not all("@" in i for i in ids):
        pytest.exit("pytest-xdist did not apply the test groups: this pytest keeps test ids where the installed "
                    "pytest-xdist cannot extend them; install the versions pyproject.toml's dev extra allows "
                    "(`pip install -e '.[dev]'`), or run without workers (`pytest -n 0`)", returncode=4)


def _group_for_xdist(items):
    """Groups for pytest-xdist (`--dist loadgroup`, pyproject.toml): a group runs on one worker,
    so a costly shared fixture is built once. Every test of the smoke project (it needs the
    session fixture `project`, ~4 min to build) is one group (tests that change or break the
    project take copies of it on any worker, `project_copy`); a test with a module- or
    class-scoped fixture is grouped with its module; any other test is a group of its own. The
    largest groups start first; each goes to whichever worker is free."""
    for item in items:
        fixtures = getattr(item, "_fixtureinfo", None)
        defs = fixtures.name2fixturedefs if fixtures else {}
        if "project" in defs:
            item.add_marker(pytest.mark.xdist_group("smoke-project"))
        elif any(d.scope in ("module", "class") for ds in defs.values() for d in ds):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
        else:  # a group of its own, so that every id carries one (checked above)
            item.add_marker(pytest.mark.xdist_group(item.nodeid))


def _longest_first(items):
    """xdist hands out groups in collection order (`--no-loadscope-reorder`): the smoke
    project's group first (it builds the project), then the other integration tests (each
    builds or runs a chain), then the tests on copies of the smoke project (they wait for its
    build, so they come once the other worker has had other work), then the unit and contract
    tests, which fill in at the end on whichever worker is free."""
    def rank(item):
        if any(m.args == ("smoke-project",) for m in item.iter_markers("xdist_group")):
            return 0
        if "smoke_build" in item.fixturenames:
            return 2
        return 1 if item.nodeid.startswith("tests/integration/") else 3
    items.sort(key=rank)  # stable: the order within a rank is the collection's


def _skip_gpu_tests_without_cuda(items):
    """`gpu` tests need a CUDA device; without one they are skipped with that reason (shown
    in the summary), never silently passed. On a GPU machine: `bash bench/gpu_check.sh`."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: torch sees no CUDA device (run bash bench/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
