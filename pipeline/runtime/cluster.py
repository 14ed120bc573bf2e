"""The Ray cluster a stage runs on: joining it (or starting a local one), the task fan-out
(`parallel_map`) and what the cluster holds. With `pipeline.training.ray_train` (Ray Train)
and `pipeline.tuning.tuner` (Ray Tune), the only modules of the library that import Ray.

Plumbing: a fan-out's results do not depend on the worker count (evaluation draws
per-sample seeds), so no stage lists this module as a dependency (docs/architecture.md).
Measured notes on Ray: docs/stack.md.
"""
import ray

# Ray Train's controller drains each worker's one-slot report queue every 2 s
# by default, so every report could stall a worker that long (docs/stack.md).
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


def parallel_map(fn, jobs, cpus_per_job=1, on_done=None, gpus_per_job=0):
    """[fn(*job) for job in jobs], each job a Ray task (holding `gpus_per_job` GPUs: Ray sets
    its CUDA_VISIBLE_DEVICES); results in job order.

    `on_done(index)` runs in the caller as each job finishes, in the order they finish
    (e.g. to advance a progress bar); a failed job raises as soon as it is seen.
    """
    remote = ray.remote(num_cpus=cpus_per_job, num_gpus=gpus_per_job)(fn)
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


def cluster_gpus():
    """GPUs of the connected cluster (0 when it has none)."""
    return int(ray.cluster_resources().get("GPU", 0))
