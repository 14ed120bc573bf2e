"""A worker node lost mid-job on a three-node Ray cluster on this machine (the driver,
tests/integration/node_loss.py, runs in its own process: a process joins one cluster).
Training resumes from its last checkpoint and ends at the same final step, having lost at
most one checkpoint interval; an evaluation loses only its shard in flight, rerun by Ray,
and its metrics equal those of an undisturbed run."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.integration.node_loss import RESULT

pytestmark = [pytest.mark.slow, pytest.mark.faults, pytest.mark.timeout(900)]


def drive(*args):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own cluster, not the session's
    out = subprocess.run([sys.executable, "-m", "tests.integration.node_loss", *map(str, args)], cwd=ROOT,
                         env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=800)
    assert out.returncode == 0, out.stderr[-5000:]
    (result,) = [line for line in out.stdout.splitlines() if line.startswith(RESULT)]
    return json.loads(result[len(RESULT):])


def test_training_survives_a_lost_node(tmp_path):
    got = drive("train", tmp_path)
    assert len({node for _, node in got["ranks_on_nodes"]}) == 2  # one DDP worker per node
    assert got["final_step"] == got["steps"]
    assert got["resumed_from"] is not None and got["resumed_from"] % got["checkpoint_every"] == 0
    lost = got["reached"] - got["resumed_from"]
    assert 0 <= lost <= got["checkpoint_every"], got
    print(f"fault: node lost at step {got['removed']['step']} of {got['steps']} (2 DDP workers, one per node) | "
          f"resumed from step {got['resumed_from']} {got['recovered_s']:.1f} s later | steps lost {lost} "
          f"(checkpoint_every {got['checkpoint_every']}) | {got['seconds']:.0f} s in all | outputs lost 0")


def test_evaluation_survives_a_lost_node(smoke_build, tmp_path):
    root = smoke_build  # read only: the pristine smoke project's CD student, data and features
    got = drive("evaluate", tmp_path, root)
    assert got["removed"]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "sec_per_sample"} for r in rows]  # noqa: E731
    assert strip(got["disturbed"]) == strip(got["undisturbed"])  # the same metrics, to the bit
    print(f"fault: node lost during evaluate@cd ({got['jobs']} shards) | metrics equal to the undisturbed run | "
          f"{got['disturbed_s']:.1f} s against {got['undisturbed_s']:.1f} s undisturbed | outputs lost 0")
