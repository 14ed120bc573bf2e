"""A real `mlflow server` (SQLite backend, 127.0.0.1, a free port) that a test can stop and
start again on the same port: the tracking outages of the `faults` tests."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    def __init__(self, root):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, timeout_s=120):
        mlflow = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or "mlflow"
        self.log = open(self.root / "server.log", "ab")
        # Its own process group: stop() ends the server and its uvicorn workers together.
        self.proc = subprocess.Popen(
            [mlflow, "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--default-artifact-root", (self.root / "artifacts").as_uri(), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            # No job runner: 2 processes (~420 MiB) instead of 10 (~1.8 GiB) on a 2-core machine.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.proc.returncode}); see {self.root / 'server.log'}")
            try:
                urllib.request.urlopen(self.uri + "/health", timeout=2)
                return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer within {timeout_s} s; see {self.root / 'server.log'}")

    def stop(self):
        """Kill the server (SIGKILL: an outage, not a shutdown) and wait until it is gone."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()
            self.log = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False
