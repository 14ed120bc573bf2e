"""Failure injection for the fault tests and benchmarks: report hooks composed into a
`TrainRun` from outside the Ray adapter (distributed.ReportContext)."""
import os
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
