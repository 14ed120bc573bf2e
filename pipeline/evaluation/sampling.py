"""Evaluation: sample the test split with every sampler at every NFE, once per sampling
seed, then score it (docs/evaluation.md).

Sample i of the test split under sampling seed s always gets the same noise, whatever
sampler, NFE, batch or worker, so every point is computed on common random numbers (the
same inputs and seeds for every model) and nothing moves with the worker count. Outputs are
clipped to [-1, 1] for every model alike. `pipeline.evaluation.scoring` turns samples into metrics with
intervals. `seconds` is the wall time of sampling alone, on one worker and one thread after
a warm-up batch, so `sec_per_sample` compares models fairly.
"""
import time
from dataclasses import dataclass, replace

import torch

from pipeline.data.shards import load_split
from pipeline.evaluation.noise import SeededNoise, sample_seeds
from pipeline.evaluation.results import point_key
from pipeline.models.loading import load_model
from pipeline.models.students import Student
from pipeline.runtime.progress import bar
from pipeline.samplers import get_sampler, steps_for_nfe

WARMUP = 2  # samples sampled, untimed, before each timed (sampler, nfe) of a job


def describe(model):
    """(method, teacher) tags of a model: ("teacher", its name) for a teacher."""
    if isinstance(model, Student):
        return model.name, model.teacher_name
    return "teacher", model.name


def model_plan(model, ev):
    """([(sampler, nfe)], guidance) to evaluate: a teacher runs every sampler of its family
    at every reachable NFE of `ev.nfe`; a student its one sampler at each NFE it was
    distilled for (students take no guidance here)."""
    if isinstance(model, Student):
        return [("student", nfe) for nfe in model.method.nfe_choices()], 0.0
    guidance = ev.guidance if model.family == "diffusion" else 0.0
    caps = getattr(ev.max_nfe, model.family)
    return plan(model.family, getattr(ev.samplers, model.family), ev.nfe, guidance, caps), guidance


def plan(family, samplers, nfes, guidance=0.0, max_nfe=None):
    """[(sampler, nfe)] with each NFE one the sampler can hit exactly (the most it can
    spend without exceeding the request); duplicates dropped, unreachable NFEs skipped.
    `max_nfe`: {sampler: the most NFE it is evaluated at} (`evaluate.max_nfe`)."""
    jobs, max_nfe = [], max_nfe or {}
    for name in samplers:
        sampler, seen = get_sampler(f"{family}/{name}"), set()
        for nfe in (n for n in nfes if n <= max_nfe.get(name, n)):
            steps = steps_for_nfe(sampler, nfe, guidance)
            if steps is None:
                continue
            used = sampler.nfe_of_steps(steps, guidance)
            if used not in seen:
                seen.add(used)
                jobs.append((name, used))
    return jobs


@dataclass(frozen=True)
class ShardJob:
    """One worker's share: test samples [start, stop) under every (sampler, nfe) of `plan`,
    with sampling seed `seed`."""
    model_path: str
    data_dir: str
    start: int
    stop: int
    plan: tuple
    seed: int
    guidance: float
    batch_size: int
    threads: int = 1
    grid: str = "fair"  # the teachers' step grid (schedules.step_sigmas)
    device: str = "cpu"  # "cuda": the job's GPU (Ray makes the one it holds the only visible one)


def to_device(model, device):
    """A loaded Teacher or Student with every network it calls on `device`."""
    if isinstance(model, Student):
        model.method.to(device)
        model.net.to(device)
    else:
        model.denoiser.to(device)
    return model


def sample_shard(job: ShardJob):
    """{(sampler, nfe, seed): (samples (n, C, H, W) clipped, on the CPU, seconds)} for one shard.
    On a GPU the noise is still drawn from the samples' CPU generators, so the samples are those
    of the CPU up to floating-point differences."""
    torch.set_num_threads(job.threads)
    device = torch.device(job.device)
    model = to_device(load_model(job.model_path), device)
    test = load_split(job.data_dir, "test")
    # The condition: y (image-conditional), the requested labels (class-conditional: the labels
    # of the evaluated inputs), or None; the sample shape is x0's.
    cond = None if test.condition is None else test.condition[job.start:job.stop].to(device)
    shape, n = test.x0.shape[1:], job.stop - job.start

    def synchronize():  # CUDA runs asynchronously: the clock stops when the samples exist
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def part(lo, hi):
        return None if cond is None else cond[lo:hi]

    out = {}
    for name, nfe in job.plan:
        warm = min(WARMUP, n)  # first calls pay one-off costs (allocations, kernels): untimed
        with torch.no_grad():
            model.sample(name, part(0, warm), SeededNoise([0] * warm, shape, device), nfe, job.guidance, job.grid)
        synchronize()
        chunks, seconds = [], 0.0
        for lo in range(0, n, job.batch_size):
            hi = min(lo + job.batch_size, n)
            first = job.start + lo
            noise = SeededNoise(sample_seeds(job.seed, range(first, job.start + hi)), shape, device)
            tick = time.perf_counter()
            with torch.no_grad():
                x, used = model.sample(name, part(lo, hi), noise, nfe, job.guidance, job.grid)
            synchronize()
            seconds += time.perf_counter() - tick
            assert used == nfe, f"{name}: planned {nfe} NFE, the sampler spent {used}"
            chunks.append(x.clamp(-1, 1).cpu())
        out[(name, nfe, job.seed)] = (torch.cat(chunks), seconds)
    return out


def shard_jobs(model_path, data_dir, n_samples, n_shards, plan_, seeds, guidance, batch_size, threads=1,
               grid="fair", device="cpu"):
    """One job per (shard, seed): `n_shards` contiguous shards of the first n_samples inputs."""
    bounds = [round(i * n_samples / n_shards) for i in range(n_shards + 1)]
    return [ShardJob(str(model_path), str(data_dir), lo, hi, tuple(plan_), seed, guidance, batch_size,
                     threads, grid, device) for seed in seeds for lo, hi in zip(bounds, bounds[1:]) if hi > lo]


def split_by_plan(shards):
    """One job per (plan item, shard), item by item: the bounds and batches of `shards` are
    kept, so the samples are the same values in smaller pieces (progress moves per NFE)."""
    return [replace(job, plan=(item,)) for item in (shards[0].plan if shards else ()) for job in shards]


def merge_shards(results):
    """{(sampler, nfe, seed): (samples, seconds)} from shard outputs, whole or split by plan
    item, given in sample order for each key: samples are concatenated, seconds add up."""
    parts = {}
    for result in results:
        for key, value in result.items():
            parts.setdefault(key, []).append(value)
    return {key: (torch.cat([x for x, _ in p]), sum(secs for _, secs in p)) for key, p in parts.items()}


def by_point(results, seeds):
    """{(sampler, nfe): ([samples per seed, in `seeds` order], seconds per sample)}."""
    points = sorted({(s, n) for s, n, _ in results})
    out = {}
    for s, n in points:
        runs = [results[(s, n, seed)] for seed in seeds]
        out[(s, n)] = ([x for x, _ in runs], sum(t for _, t in runs) / sum(len(x) for x, _ in runs))
    return out


def sample_points(shards, map_fn, seeds, show=False):
    """Every shard x (sampler, nfe) as its own job through `map_fn(fn, jobs, on_done)` (e.g.
    `runtime.cluster.parallel_map`), merged `by_point`; a "sampling" bar advancing as jobs finish."""
    jobs = split_by_plan(shards)
    with bar(len(jobs), "sampling", show, unit="job") as sampling:
        def done(i):
            (sampler, nfe), = jobs[i].plan
            sampling.set_postfix(sampler=sampler, nfe=nfe, refresh=False)
            sampling.update()
        return by_point(merge_shards(map_fn(sample_shard, [(j,) for j in jobs], on_done=done)), seeds)


def score_all(points, truth, scorer, show=False):
    """(rows without the model columns, replicates) for {(sampler, nfe): (samples, sec)}."""
    from pipeline.evaluation.scoring import row_metrics
    rows, replicates = [], {}
    with bar(len(points), "FID features", show, unit="point") as scoring:
        for (sampler, nfe), (samples, sec) in sorted(points.items()):
            scoring.set_postfix(sampler=sampler, nfe=nfe)
            scored = scorer.score(samples, truth)
            rows.append({"sampler": sampler, "nfe": nfe, **row_metrics(scored.points), "sec_per_sample": sec})
            replicates[point_key(sampler, nfe)] = scored.replicates()
            scoring.update()
    return rows, replicates


def evaluate_model(name, model_path, data_dir, scorer, ev, n_shards, map_fn, show=False):
    """(rows, replicates, grids) of `evaluate@<name>`: every (sampler, nfe) of the model's plan
    sampled with every seed of `ev.seeds` over `n_shards` jobs per seed through `map_fn`,
    scored (COLUMNS rows); grids of the first seed's samples, one file per NFE."""
    model = load_model(model_path, name)
    method, teacher = describe(model)
    points, guidance = model_plan(model, ev)
    shards = shard_jobs(model_path, data_dir, ev.n_samples, n_shards, points, ev.seeds, guidance,
                        ev.batch_size, grid=ev.grid, device=ev.device)
    sampled = sample_points(shards, map_fn, ev.seeds, show)
    truth = load_split(data_dir, "test").head(ev.n_samples)
    rows, replicates = score_all(sampled, truth, scorer, show)
    rows = [{"model": name, "method": method, "teacher": teacher, **r} for r in rows]
    grids = {}
    for nfe in sorted({n for _, n in sampled}):
        keys = [k for k in sorted(sampled) if k[1] == nfe]
        n = ev.grid_samples
        grids[f"nfe_{nfe:03d}.png"] = (["y (input)", "x0 (truth)", *[s for s, _ in keys]],
                                       [truth.y[:n], truth.x0[:n], *[sampled[k][0][0][:n] for k in keys]])
    return rows, replicates, grids
