"""Ray: the only module of the library that imports it.

- `connect` joins the cluster at `address` or starts a local one.
- `fit` runs `training.run_training` as a Ray Train `TorchTrainer` job: DDP
  over `num_workers` (gloo on CPU, NCCL on GPU), checkpoints through
  `ray.train.report`, and a restart from the latest checkpoint when a worker
  dies (`FailureConfig`).
- `parallel_map` fans independent jobs (data shards, evaluation shards) out
  as Ray tasks.

Progress: worker output never reaches the user (`log_to_driver=False`), so the
training bar lives in the driver; rank 0 sends its reports there through a
`ray.util.queue.Queue`.
"""
import os
import tempfile
import threading
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
from ray.util.queue import Empty, Queue

from pipeline import progress
from pipeline.settings import RayParams
from pipeline.training import LoopHooks, run_training

# Ray Train's controller drains each worker's one-slot report queue every 2 s
# by default, so every report could stall a worker that long (stack.md).
RAY_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def connect(address, num_cpus):
    """Join the Ray cluster at `address` (e.g. from RAY_ADDRESS), else start a local one."""
    if ray.is_initialized():
        return
    env = {"env_vars": dict(RAY_ENV)}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 log_to_driver=False, runtime_env=env)


def _worker(config):
    """The Ray Train worker: the plain loop plus DDP wrapping and Ray reports."""
    torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)

    def report(metrics, state):
        crash = config.get("crash_at_step")
        if crash and metrics["step"] >= crash and resume is None and rank == 0:
            os._exit(1)  # failure injection for the resume test: the process dies hard
        if state is not None and rank == 0 and config.get("score") is not None:
            scores = config["score"](state)  # a sweep's objective, at every checkpoint
            metrics = {**metrics, **scores}
            if config["log"] is not None:
                config["log"]({f"sweep/{k}": v for k, v in scores.items()}, metrics["step"])
        if state is not None and rank == 0:
            with tempfile.TemporaryDirectory() as d:
                torch.save(state, Path(d) / "state.pt")
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)  # a barrier: every rank reports at the same steps
        if config["progress"] is not None and rank == 0:
            config["progress"].put((metrics["step"], metrics))  # to the driver's bar

    hooks = LoopHooks(rank=rank, world_size=ctx.get_world_size(),
                      device=ray.train.torch.get_device(), wrap=ray.train.torch.prepare_model,
                      report=report, resume=resume, log=config["log"] if rank == 0 else None)
    if resume is not None and hooks.log is not None:
        hooks.log({"train/resumed_from_step": resume["step"]}, resume["step"])
    run_training(config["task"], config["load_data"](), config["train"], config["seed"], hooks)


def fit(task, load_data, train, seed, scaling: RayParams, storage_path, name, log=None,
        crash_at_step=None, progress=False, callbacks=None, score=None):
    """Train `task` under a TorchTrainer; return the final training state (plain tensors).

    `load_data` is a picklable zero-argument callable run on each worker (data
    are read there, not shipped from the driver). `log(metrics, step)` runs on
    rank 0 only. `crash_at_step` kills rank 0 once, to test recovery.
    `score(state) -> metrics` runs on rank 0 at each checkpoint and joins its report
    (a sweep's objective); `callbacks` are Ray Train callbacks (a sweep's reports to Tune).
    `progress` shows a bar of optimiser steps (loss, samples/s at each report)
    on the driver's stderr; it changes nothing in the training itself.
    """
    # num_cpus=0: the queue's actor must not take a CPU from the workers.
    queue = Queue(actor_options={"num_cpus": 0}) if progress else None
    trainer = ray.train.torch.TorchTrainer(
        _worker,
        train_loop_config={"task": task, "load_data": load_data, "train": train, "seed": seed,
                           "threads": scaling.threads_per_worker, "log": log,
                           "crash_at_step": crash_at_step, "progress": queue, "score": score},
        scaling_config=ray.train.ScalingConfig(num_workers=scaling.num_workers,
                                               use_gpu=scaling.use_gpu),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(Path(storage_path).resolve()),
            callbacks=list(callbacks or []),
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=scaling.checkpoints_to_keep)),
    )
    result = trainer.fit() if queue is None else _fit_showing(trainer, queue, train.steps)
    with result.checkpoint.as_directory() as d:
        return torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)


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


def parallel_map(fn, jobs, cpus_per_job=1, on_done=None):
    """[fn(*job) for job in jobs], each job a Ray task; results in job order.

    `on_done(index)` runs in the caller as each job finishes, in the order they finish
    (e.g. to advance a progress bar); a failed job raises as soon as it is seen.
    """
    remote = ray.remote(num_cpus=cpus_per_job)(fn)
    refs = [remote.remote(*job) for job in jobs]
    index = {ref: i for i, ref in enumerate(refs)}
    results, pending = [None] * len(refs), refs
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        i = index[done[0]]
        results[i] = ray.get(done[0])
        if on_done is not None:
            on_done(i)
    return results


def cluster_cpus():
    """CPUs of the connected cluster (how many single-thread jobs run at once)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


# --- Ray Tune: sweeps (pipeline.trial runs each trial) ---------------------------------

# A trial's own process only waits on its TorchTrainer, whose workers hold the CPUs/GPUs.
# It reserves memory, which every Ray node has, rather than a slice of a CPU: slices add
# up and leave a worker short of a whole CPU (a 2-CPU machine then deadlocks, stack.md).
SWEEP_DRIVER_RESOURCES = {"memory": 256 * 2**20}


def search_space(space, integers=()):
    """Tune domains from `sweep.Dimension`s; range axes over `integers` keys draw integers."""
    from ray import tune
    out = {}
    for key, dim in space.items():
        values = dim.candidates()
        if dim.kind == "choice":
            out[key] = tune.choice(values)
        elif dim.kind == "grid":
            out[key] = tune.grid_search(values)
        elif key in integers:  # randint's upper bound is exclusive
            sample = tune.lograndint if dim.kind == "loguniform" else tune.randint
            out[key] = sample(int(values[0]), int(values[1]) + 1)
        else:
            out[key] = (tune.loguniform if dim.kind == "loguniform" else tune.uniform)(*values)
    return out


def _reports_with(metric):
    """A Ray Train callback forwarding to Tune only rank 0's reports that carry `metric`
    (the checkpoints, where the objective is computed): ASHA and Tune see a value every time."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ScoredReports(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return ScoredReports()


def tune(trial_fn, param_space, *, metric, mode, num_samples, seed, max_steps, asha,
         max_concurrent, storage_path, name, resume=False):
    """Run `trial_fn(config, trial_id, callbacks)` over `param_space` with Ray Tune; returns
    one dict per trial: trial_id, config, error, and its last reported metrics.

    At most `max_concurrent` trials run at once; their TorchTrainers' workers hold the
    CPUs/GPUs, the trial processes only memory (SWEEP_DRIVER_RESOURCES). `asha`
    (grace_steps, reduction_factor) stops weak trials at their reports, measured in
    training `step`s; None runs every trial to the end.
    `resume` continues the experiment `name` under `storage_path` (Tuner.restore):
    finished trials are kept, unfinished ones restart from their last checkpoint.
    """
    from ray import tune as ray_tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    def trainable(config):
        trial_fn(config, ray_tune.get_context().get_trial_id(), [_reports_with(metric)])

    trainable = ray_tune.with_resources(trainable, SWEEP_DRIVER_RESOURCES)
    path = Path(storage_path).resolve() / name
    if resume:
        tuner = ray_tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
    else:
        scheduler = (ASHAScheduler(time_attr="step", max_t=max_steps, grace_period=asha.grace_steps,
                                   reduction_factor=asha.reduction_factor) if asha else FIFOScheduler())
        tuner = ray_tune.Tuner(
            trainable, param_space=param_space,
            tune_config=ray_tune.TuneConfig(
                metric=metric, mode=mode, scheduler=scheduler, num_samples=num_samples,
                search_alg=BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent)),
            run_config=ray_tune.RunConfig(name=name, storage_path=str(path.parent), verbose=0))
    grid = tuner.fit()
    rows = []
    for i in range(len(grid)):
        result = grid[i]
        metrics = dict(result.metrics or {})
        rows.append({**metrics, "trial_id": metrics.get("trial_id") or Path(result.path).name,
                     "config": dict(result.config or {}), "error": result.error is not None})
    return rows


def can_resume(storage_path, name):
    from ray import tune as ray_tune
    return ray_tune.Tuner.can_restore(str(Path(storage_path).resolve() / name))
