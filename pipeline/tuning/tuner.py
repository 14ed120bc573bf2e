"""The Ray Tune adapter: search spaces, the Tuner (ASHA, restore) and trial resources.

With pipeline.runtime.cluster and pipeline.training.ray_train, the only modules of the library that import Ray. A sweep
(pipeline.tuning.sweep: the spec and its results) runs one trial per configuration
(pipeline.tuning.trial: the stage's own training job, scored as it trains); this module only
turns the spec into Tune's objects and Tune's results into plain rows.
"""
from pathlib import Path

import ray

# A trial's own process only waits on its TorchTrainer, whose workers hold the CPUs/GPUs.
# It reserves memory, which every Ray node has, rather than a slice of a CPU: slices add
# up and leave a worker short of a whole CPU (a 2-CPU machine then deadlocks, docs/stack.md).
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


def trials_that_fit(scaling):
    """Concurrent trials the cluster holds at the per-trial resources of `scaling` (RayParams)."""
    resources = ray.cluster_resources()
    if scaling.use_gpu:
        return max(1, int(resources.get("GPU", 0)) // scaling.num_workers)
    per_trial = scaling.num_workers * scaling.threads_per_worker
    return max(1, int(resources.get("CPU", 1)) // per_trial)
