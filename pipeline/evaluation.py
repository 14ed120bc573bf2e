"""Evaluation: sample the test split with every sampler at every NFE, then score it.

Protocol (docs/evaluation.md): sample i of the test split always gets the same
seed, whatever sampler, NFE, batch or worker, so curves are compared on
common random numbers and do not move with the worker count. Outputs are
clipped to [-1, 1] for every model alike. FID/KID come from torch-fidelity
with the registered feature extractor against the cached statistics of the
clean test split; PSNR/SSIM and classifier accuracy compare each sample with
its own ground truth. `seconds` is the wall time of sampling alone, on one
worker, so `sec_per_sample` compares models fairly.

`score_points` is the one place samples become metrics: the evaluate stage and a
sweep trial's quick evaluation both call it.
"""
import csv
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from pipeline.checkpoint import load_checkpoint
from pipeline.classifier import accuracy
from pipeline.data.shards import load_split
from pipeline.distill import METHODS
from pipeline.distill.base import Student, load_student
from pipeline.fid import fidelity_metrics
from pipeline.metrics import psnr, ssim
from pipeline.noise import SeededNoise, sample_seeds
from pipeline.outputs import staging_dir, write_json
from pipeline.progress import bar
from pipeline.results import COLUMNS, METRICS, FeatureSpace
from pipeline.samplers import get_sampler, steps_for_nfe
from pipeline.teachers import TEACHERS, load_teacher



def model_kind(name):
    """The checkpoint kind of the model `name` of evaluate.models."""
    return f"teacher_{name}" if name in TEACHERS else f"student_{name}"


def load_model(path, name=None):
    """A `Teacher` or a `Student`, by the kind its checkpoint records (both `sample` alike);
    with `name`, the checkpoint must be that model's (CheckpointError naming its stage)."""
    kinds = ({model_kind(name)} if name else
             {f"teacher_{n}" for n in TEACHERS} | {f"student_{m}" for m in METHODS})
    kind = load_checkpoint(path, kinds)["kind"]
    return load_student(path) if kind.startswith("student_") else load_teacher(path)


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
    return plan(model.family, getattr(ev.samplers, model.family), ev.nfe, guidance), guidance


def plan(family, samplers, nfes, guidance=0.0):
    """[(sampler, nfe)] with each NFE one the sampler can hit exactly (the most it can
    spend without exceeding the request); duplicates dropped, unreachable NFEs skipped."""
    jobs = []
    for name in samplers:
        sampler, seen = get_sampler(f"{family}/{name}"), set()
        for nfe in nfes:
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
    """One worker's share: test samples [start, stop) under every (sampler, nfe) of `plan`."""
    model_path: str
    data_dir: str
    start: int
    stop: int
    plan: tuple
    seed: int
    guidance: float
    batch_size: int
    threads: int = 1


def sample_shard(job: ShardJob):
    """{(sampler, nfe): (samples (n, C, H, W) clipped, seconds)} for one shard."""
    torch.set_num_threads(job.threads)
    model = load_model(job.model_path)
    y_all = load_split(job.data_dir, "test").y[job.start:job.stop]
    out = {}
    for name, nfe in job.plan:
        chunks, seconds = [], 0.0
        for lo in range(0, len(y_all), job.batch_size):
            y = y_all[lo:lo + job.batch_size]
            first = job.start + lo
            noise = SeededNoise(sample_seeds(job.seed, range(first, first + len(y))), y.shape[1:])
            tick = time.perf_counter()
            with torch.no_grad():
                x, used = model.sample(name, y, noise, nfe, job.guidance)
            seconds += time.perf_counter() - tick
            assert used == nfe, f"{name}: planned {nfe} NFE, the sampler spent {used}"
            chunks.append(x.clamp(-1, 1))
        out[(name, nfe)] = (torch.cat(chunks), seconds)
    return out


def shard_jobs(model_path, data_dir, n_samples, n_shards, plan_, seed, guidance, batch_size, threads=1):
    bounds = [round(i * n_samples / n_shards) for i in range(n_shards + 1)]
    return [ShardJob(str(model_path), str(data_dir), lo, hi, tuple(plan_), seed, guidance,
                     batch_size, threads) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]


def split_by_plan(shards):
    """One job per (plan item, shard), item by item: the bounds and batches of `shards` are
    kept, so the samples are the same values in smaller pieces (progress moves per NFE)."""
    return [replace(job, plan=(item,)) for item in (shards[0].plan if shards else ()) for job in shards]


def merge_shards(results):
    """{(sampler, nfe): (samples, seconds)} from shard outputs, whole or split by plan item,
    given in sample order for each item: samples are concatenated, seconds add up."""
    parts = {}
    for result in results:
        for key, value in result.items():
            parts.setdefault(key, []).append(value)
    return {key: (torch.cat([x for x, _ in p]), sum(secs for _, secs in p)) for key, p in parts.items()}


def score_points(results, truth, features: FeatureSpace, kid_subset_size, show=False):
    """{(sampler, nfe): metrics} for `results` {(sampler, nfe): (samples, seconds)}: FID/KID
    against the reference statistics, and for a conditional task PSNR/SSIM and classifier
    accuracy against `truth` (the evaluated inputs' Split), seconds per sample.
    Samples and truth are (n, C, H, W) in [-1, 1]; an "FID features" bar when `show`."""
    classifier, nan = features.classifier(), float("nan")
    fid_kwargs = features.fid_kwargs(kid_subset_size)
    scores = {}
    with bar(len(results), "FID features", show, unit="point") as scoring:
        for (sampler, nfe), (x, seconds) in sorted(results.items()):
            scoring.set_postfix(sampler=sampler, nfe=nfe)
            fidelity = fidelity_metrics(x, **fid_kwargs)
            scores[(sampler, nfe)] = {
                "fid": fidelity["fid"], "kid": fidelity["kid"],
                "psnr": psnr(x, truth.x0).mean().item() if truth.conditional else nan,
                "ssim": ssim(x, truth.x0).mean().item() if truth.conditional else nan,
                "accuracy": accuracy(classifier, x, truth.label) if truth.conditional else nan,
                "sec_per_sample": seconds / len(x),
            }
            scoring.update()
    return scores


def sample_points(shards, map_fn, show=False):
    """Every shard x (sampler, nfe) as its own job through `map_fn(fn, jobs, on_done)` (e.g.
    `distributed.parallel_map`), merged; a "sampling" bar advancing as jobs finish."""
    jobs = split_by_plan(shards)
    with bar(len(jobs), "sampling", show, unit="job") as sampling:
        def done(i):
            (sampler, nfe), = jobs[i].plan
            sampling.set_postfix(sampler=sampler, nfe=nfe, refresh=False)
            sampling.update()
        return merge_shards(map_fn(sample_shard, [(j,) for j in jobs], on_done=done))


def write_evaluation(out, rows, results, truth, grid_n):
    """`out/`: metrics.json ({sampler: {nfe_NNN: metrics}}), metrics.csv (one row per point),
    grids/nfe_NNN.png (rows: y, the truth x0, then one per sampler; grids/rows.json names
    them); built in a staging folder and swapped in whole."""
    with staging_dir(Path(out)) as tmp:
        nested = {}
        for r in rows:
            nested.setdefault(r["sampler"], {})[f"nfe_{r['nfe']:03d}"] = {m: r[m] for m in METRICS}
        write_json(tmp / "metrics.json", nested)
        with open(tmp / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        (tmp / "grids").mkdir()
        index = {}
        for nfe in sorted({n for _, n in results}):
            keys = [k for k in sorted(results) if k[1] == nfe]
            name = f"nfe_{nfe:03d}.png"
            index[name] = ["y (input)", "x0 (truth)", *[sampler for sampler, _ in keys]]
            sample_grid(tmp / "grids" / name,
                        [truth.y[:grid_n], truth.x0[:grid_n], *[results[k][0][:grid_n] for k in keys]])
        write_json(tmp / "grids" / "rows.json", index)  # which row of each grid is what


def evaluate_model(name, model_path, data_dir, features: FeatureSpace, ev, n_shards, map_fn, show=False):
    """(rows, results, truth) of `evaluate@<name>`: every (sampler, nfe) of the model's plan
    sampled over `n_shards` jobs through `map_fn`, scored; one row per point (COLUMNS)."""
    model = load_model(model_path, name)
    method, teacher = describe(model)
    points, guidance = model_plan(model, ev)
    shards = shard_jobs(model_path, data_dir, ev.n_samples, n_shards, points, ev.seed, guidance,
                        ev.batch_size)
    results = sample_points(shards, map_fn, show)
    truth = load_split(data_dir, "test").head(ev.n_samples)
    scores = score_points(results, truth, features, ev.kid_subset_size, show)
    rows = [{"model": name, "method": method, "teacher": teacher, "sampler": s, "nfe": n, **m}
            for (s, n), m in scores.items()]
    return rows, results, truth


def sample_grid(path, rows):
    """Save a PNG with one row per tensor (n, C, H, W) in [-1, 1] (e.g. y, x0, then samplers)."""
    from torchvision.utils import save_image
    n = min(len(r) for r in rows)
    images = torch.cat([r[:n] for r in rows])
    save_image((images + 1) / 2, str(path), nrow=n, padding=1, pad_value=1.0)
