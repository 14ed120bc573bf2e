"""scripts/with_ray.py: one Ray cluster for every process of a command (e.g. the stages of a
`dvc repro`), left clean between them and stopped after."""
import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

# What a stage does with RAY_ADDRESS (stages/common.connect_ray): join, run tasks, leave.
PROBE = ("import os, ray; ray.init(address=os.environ['RAY_ADDRESS'], log_to_driver=False); "
         "free = ray.available_resources().get('CPU', 0); ray.get(ray.remote(lambda: 0).remote()); "
         "print('joined', os.environ['RAY_ADDRESS'], free, ray.cluster_resources()['CPU'])")


def test_every_process_joins_one_cluster_that_is_clean_between_them_and_stopped_after():
    """Two processes in a row, as two stages of `dvc repro`; the command ends with status 3."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    probe = f"{sys.executable} -c \"{PROBE}\""
    out = subprocess.run([sys.executable, "scripts/with_ray.py", "--num-cpus", "2", "bash", "-c",
                          f"{probe} && {probe} && exit 3"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 3, out.stderr[-3000:]                  # the command's own exit status
    joined = [line.split() for line in out.stdout.splitlines() if line.startswith("joined")]
    assert len(joined) == 2 and joined[0][1] == joined[1][1]       # the same cluster
    assert all(float(free) == float(total) == 2 for _, _, free, total in joined)  # all CPUs free at each start
    host, port = joined[0][1].rsplit(":", 1)
    with socket.socket() as s:                                       # its GCS is gone: the cluster stopped
        assert s.connect_ex((host, int(port))) != 0

