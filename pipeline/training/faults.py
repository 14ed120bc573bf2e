"""Failure injection for the fault tests and benchmarks: report hooks composed into a
`TrainRun` from outside the Ray adapter (ray_train.ReportContext)."""
import json
import os
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class CrashOnce:
    """Kill rank `rank`'s process hard (no cleanup, as a lost machine) at its first report at or
    after optimiser step `step`, in the first attempt only: the restarted attempt runs on."""
    step: int
    rank: int = 0

    def __call__(self, metrics, state, context):
        if context.resumed_from is None and context.rank == self.rank and metrics["step"] >= self.step:
            os._exit(1)


@dataclass(frozen=True)
class StepJournal:
    """Append one JSON line per report to `path` (a file every node can reach): the rank, the
    step, the step this attempt resumed from, the node and the time. A test reads it back to
    measure the work a failure cost."""
    path: str

    def __call__(self, metrics, state, context):
        import ray
        entry = {"rank": context.rank, "step": int(metrics["step"]), "resumed_from": context.resumed_from,
                 "node": ray.get_runtime_context().get_node_id(), "time": time.time()}
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")


@dataclass(frozen=True)
class Pace:
    """Sleep `seconds` at every report: a tiny training run lasts long enough to be hit."""
    seconds: float

    def __call__(self, metrics, state, context):
        time.sleep(self.seconds)
