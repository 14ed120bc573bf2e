"""Evaluation: sample the test split with every sampler at every NFE, then score it.

Protocol (methods.md Sec. 6): sample i of the test split always gets the same
seed, whatever sampler, NFE, batch or worker, so curves are compared on
common random numbers and do not move with the worker count. Outputs are
clipped to [-1, 1] for every model alike. FID/KID come from torch-fidelity
with the registered feature extractor against the cached statistics of the
clean test split; PSNR/SSIM and classifier accuracy compare each sample with
its own ground truth. `seconds` is the wall time of sampling alone, on one
worker, so `sec_per_sample` compares models fairly.
"""
import time
from dataclasses import dataclass, replace

import torch

from pipeline.checkpoint import load_checkpoint
from pipeline.classifier import accuracy
from pipeline.data.shards import load_split
from pipeline.distill import METHODS, Student, load_student
from pipeline.fid import fidelity_metrics
from pipeline.metrics import psnr, ssim
from pipeline.noise import SeededNoise, sample_seeds
from pipeline.samplers import get_sampler, steps_for_nfe
from pipeline.teachers import TEACHERS, load_teacher

METRICS = ("fid", "kid", "psnr", "ssim", "accuracy", "sec_per_sample")
COLUMNS = ("model", "method", "teacher", "sampler", "nfe") + METRICS


def load_model(path):
    """A `Teacher` or a `Student`, by the kind its checkpoint records (both `sample` alike)."""
    kinds = {f"teacher_{n}" for n in TEACHERS} | {f"student_{m}" for m in METHODS}
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


def score(samples, seconds, truth, classifier, fid_kwargs, conditional):
    """The metrics of one (sampler, nfe): samples and truth are (n, C, H, W) in [-1, 1]."""
    fidelity = fidelity_metrics(samples, **fid_kwargs)
    nan = float("nan")
    return {
        "fid": fidelity["fid"], "kid": fidelity["kid"],
        "psnr": psnr(samples, truth.x0).mean().item() if conditional else nan,
        "ssim": ssim(samples, truth.x0).mean().item() if conditional else nan,
        "accuracy": accuracy(classifier, samples, truth.label) if conditional else nan,
        "sec_per_sample": seconds / len(samples),
    }


def sample_grid(path, rows):
    """Save a PNG with one row per tensor (n, C, H, W) in [-1, 1] (e.g. y, x0, then samplers)."""
    from torchvision.utils import save_image
    n = min(len(r) for r in rows)
    images = torch.cat([r[:n] for r in rows])
    save_image((images + 1) / 2, str(path), nrow=n, padding=1, pad_value=1.0)
