"""Ray: the only module of the library that imports it.

- `connect` joins the cluster at `address` or starts a local one.
- `fit` runs `training.run_training` as a Ray Train `TorchTrainer` job: DDP
  over `num_workers` (gloo on CPU, NCCL on GPU), checkpoints through
  `ray.train.report`, and a restart from the latest checkpoint when a worker
  dies (`FailureConfig`).
- `parallel_map` fans independent jobs (data shards, evaluation shards) out
  as Ray tasks.
"""
import os
import tempfile
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch

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
        if state is not None and rank == 0:
            with tempfile.TemporaryDirectory() as d:
                torch.save(state, Path(d) / "state.pt")
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)  # a barrier: every rank reports at the same steps

    hooks = LoopHooks(rank=rank, world_size=ctx.get_world_size(),
                      device=ray.train.torch.get_device(), wrap=ray.train.torch.prepare_model,
                      report=report, resume=resume, log=config["log"] if rank == 0 else None)
    if resume is not None and hooks.log is not None:
        hooks.log({"train/resumed_from_step": resume["step"]}, resume["step"])
    run_training(config["task"], config["load_data"](), config["train"], config["seed"], hooks)


def fit(task, load_data, train, seed, scaling: RayParams, storage_path, name, log=None,
        crash_at_step=None):
    """Train `task` under a TorchTrainer; return the final training state (plain tensors).

    `load_data` is a picklable zero-argument callable run on each worker (data
    are read there, not shipped from the driver). `log(metrics, step)` runs on
    rank 0 only. `crash_at_step` kills rank 0 once, to test recovery.
    """
    trainer = ray.train.torch.TorchTrainer(
        _worker,
        train_loop_config={"task": task, "load_data": load_data, "train": train, "seed": seed,
                           "threads": scaling.threads_per_worker, "log": log,
                           "crash_at_step": crash_at_step},
        scaling_config=ray.train.ScalingConfig(num_workers=scaling.num_workers,
                                               use_gpu=scaling.use_gpu),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(Path(storage_path).resolve()),
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=scaling.checkpoints_to_keep)),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        return torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)


def parallel_map(fn, jobs, cpus_per_job=1):
    """[fn(*job) for job in jobs], each job a Ray task; results in job order."""
    remote = ray.remote(num_cpus=cpus_per_job)(fn)
    return ray.get([remote.remote(*job) for job in jobs])


def cluster_cpus():
    """CPUs of the connected cluster (how many single-thread jobs run at once)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))
