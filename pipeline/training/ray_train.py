"""The Ray Train adapter: `fit(TrainRun)` runs `training.loop.run_training` as a Ray Train
`TorchTrainer` job: DDP over `num_workers` (gloo on CPU, NCCL on GPU), checkpoints through
`ray.train.report`, and a restart from the latest checkpoint when a worker dies
(`FailureConfig`). What else happens at a report (a sweep's scoring, failure injection,
progress) is a report hook composed by the caller, not a branch here.

Progress: worker output never reaches the user (`log_to_driver=False`), so the training bar
lives in the driver; rank 0 sends its reports there through a `ray.util.queue.Queue`
(`ProgressRelay`). Measured notes on Ray Train: docs/stack.md.
"""
import tempfile
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import ray
import ray.train
import ray.train.torch
import torch
from ray.util.queue import Empty, Queue

from pipeline.runtime import progress
from pipeline.training.loop import LoopHooks, TrainRun, run_training


@dataclass(frozen=True)
class ReportContext:
    """What a report hook knows besides the report: `hook(metrics, state, context)` returns
    metrics to add to the report (or None). `state` is the training state at a checkpoint
    step, else None; `resumed_from` the step this attempt restarted from (None at first)."""
    rank: int
    world_size: int
    resumed_from: Optional[int]


class ProgressRelay:
    """Report hook: rank 0 sends (step, metrics) to the driver's progress bar queue."""

    def __init__(self, queue):
        self.queue = queue

    def __call__(self, metrics, state, context):
        if context.rank == 0:
            self.queue.put((metrics["step"], metrics))


def _worker(config):
    """The Ray Train worker: the plain loop plus DDP wrapping and Ray reports."""
    run: TrainRun = config["run"]
    torch.set_num_threads(run.scaling.threads_per_worker)
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
    context = ReportContext(rank, ctx.get_world_size(), resume["step"] if resume else None)

    def report(metrics, state):
        for hook in run.hooks:
            metrics = {**metrics, **(hook(metrics, state, context) or {})}
        if state is not None and rank == 0:
            with tempfile.TemporaryDirectory() as d:
                torch.save(state, Path(d) / "state.pt")
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)  # a barrier: every rank reports at the same steps

    log = run.log if rank == 0 else None
    hooks = LoopHooks(rank=rank, world_size=context.world_size,
                      device=ray.train.torch.get_device(), wrap=ray.train.torch.prepare_model,
                      report=report, resume=resume, log=log, compute=run.scaling.compute)
    if resume is not None and log is not None:
        log({"train/resumed_from_step": resume["step"]}, resume["step"])
    try:
        run_training(run.task, run.load_data(), run.train, run.seed, hooks)
    finally:  # a logger that sends in the background (tracking.MetricLogger) delivers what it holds
        flush = getattr(log, "flush", None)
        if flush is not None:
            flush()


def fit(run: TrainRun, storage_path, name, progress=False, callbacks=(), partial_ok=False):
    """Train `run` under a TorchTrainer (DDP over `run.scaling.num_workers`, checkpoints in
    `storage_path/name`, restarts from the latest one after a failure); return the final
    training state (plain tensors). `progress` shows a bar of optimiser steps (loss,
    samples/s) on the driver's stderr and changes nothing in the training; `callbacks` are
    Ray Train callbacks run in the driver (a sweep's reports to Tune). A run that ends before
    its last step (aborted by Ctrl-C) raises TrainingStopped, unless `partial_ok` (a sweep
    trial that its scheduler stopped early)."""
    # num_cpus=0: the queue's actor must not take a CPU from the workers.
    queue = Queue(actor_options={"num_cpus": 0}) if progress else None
    if queue is not None:
        run = replace(run, hooks=(*run.hooks, ProgressRelay(queue)))
    trainer = ray.train.torch.TorchTrainer(
        _worker,
        train_loop_config={"run": run},
        scaling_config=ray.train.ScalingConfig(num_workers=run.scaling.num_workers,
                                               use_gpu=run.scaling.use_gpu),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(Path(storage_path).resolve()),
            callbacks=list(callbacks),
            failure_config=ray.train.FailureConfig(max_failures=run.scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=run.scaling.checkpoints_to_keep)),
    )
    result = trainer.fit() if queue is None else _fit_showing(trainer, queue, run.train.steps)
    # Ray Train's own SIGINT handler aborts the run, and fit() then returns the latest
    # checkpoint as if it were the result: never hand a partial training on as finished.
    if result.checkpoint is None and not partial_ok:
        raise TrainingStopped(f"training {name} stopped before its first checkpoint")
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
    if int(state["step"]) != run.train.steps and not partial_ok:
        raise TrainingStopped(f"training {name} stopped at step {state['step']} of {run.train.steps}")
    return state


class TrainingStopped(KeyboardInterrupt):
    """A training run aborted (Ctrl-C) before its last step: the stage must not write it."""


def _fit_showing(trainer, queue, steps):
    """`trainer.fit()` while a driver thread moves rank 0's reports from `queue` into a bar.
    fit stays in the main thread: Ray Train's Ctrl-C handler (graceful abort) needs it."""
    stop = threading.Event()
    with progress.bar(steps, "training", True, unit="step") as bar:
        pump = threading.Thread(target=_pump, args=(queue, bar, stop), daemon=True)
        pump.start()
        try:
            return trainer.fit()
        finally:
            stop.set()
            pump.join()  # takes what rank 0 put before fit returned
            queue.shutdown(force=True)


def _pump(queue, bar, stop):
    """Show each (step, metrics) from `queue` in `bar` until `stop` is set and the queue is empty."""
    while True:
        stopping = stop.is_set()
        try:
            step, metrics = queue.get(timeout=0.2)
        except Empty:
            if stopping:
                return
            continue
        progress.show_training(bar, step, metrics)
