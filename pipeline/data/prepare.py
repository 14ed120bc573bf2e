"""The `prepare` stage as one function: load, split, corrupt, write shards atomically.

Corruption runs one job per output shard through a caller-supplied `map_fn`
(the built-in `map` here, a Ray-based parallel map in the stage), with
per-sample seeds derived from (seed, split, index in split), so the result
does not depend on how many workers ran the jobs. Everything is written into
a temporary sibling of `out_dir` and renamed onto it only after success: a
crash never leaves a plausible-looking output, and an existing `out_dir` is
replaced only once its successor is complete.
"""
import hashlib
from pathlib import Path

import torch

from pipeline.data import to_float
from pipeline.data.corruptions import corrupt
from pipeline.data.shards import FORMAT_VERSION, write_manifest, write_split
from pipeline.data.sources import load_source, split
from pipeline.runtime.outputs import staging_dir


def check_combination(source, corruption):
    """Cheap checks before any loading: source/corruption fit, image size fits."""
    if corruption.uses_source_y != (source.kind == "paired"):
        raise ValueError(f"corruption.kind={corruption.kind!r} and source.kind={source.kind!r} do not fit: "
                         "the 'paired' corruption goes with the 'paired' source and only with it")
    corruption.check(source.image_shape)


def sample_seed(seed, split_name, index):
    """A 63-bit seed for one sample, stable across runs, platforms and shardings."""
    digest = hashlib.blake2b(f"{seed}/{split_name}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def corrupt_shard(job):
    """One map_fn job: (x0 uint8, source y uint8 or None, corruption, seeds) -> y float32."""
    x0, y_source, corruption, seeds = job
    if corruption.uses_source_y:
        return to_float(y_source)
    return corrupt(to_float(x0), corruption, seeds)


def shard_jobs(name, data, corruption, shard_size, seed):
    jobs = []
    for start in range(0, len(data), shard_size):
        part = slice(start, start + shard_size)
        y = None if data.y is None else data.y[part].clone()
        seeds = [sample_seed(seed, name, i) for i in range(start, min(start + shard_size, len(data)))]
        jobs.append((data.x0[part].clone(), y, corruption, seeds))
    return jobs


def corrupt_splits(splits, corruption, shard_size, seed, map_fn):
    """{name: RawData} -> {name: y float32}, all shards of all splits in one map_fn call."""
    jobs, owners = [], []
    for name, data in splits.items():
        mine = shard_jobs(name, data, corruption, shard_size, seed)
        jobs += mine
        owners += [name] * len(mine)
    ys = list(map_fn(corrupt_shard, jobs))  # map_fn must keep the order of jobs
    return {name: torch.cat([y for y, o in zip(ys, owners) if o == name]) for name in splits}


def describe(source, corruption, raw, n_test, n_reference, shard_size, seed, entries):
    """The manifest: enough to check the shards and to know how they were made."""
    shape = list(raw.x0.shape[1:])
    labelled = {"class_conditional": True} if corruption.class_conditional else {}  # absent: False
    return {
        "format": FORMAT_VERSION,
        "source": source.model_dump(mode="json"),
        "corruption": corruption.model_dump(mode="json"),
        "conditional": corruption.conditional,
        "num_classes": raw.num_classes, **labelled,
        "x0_shape": shape, "y_shape": shape, "x0_dtype": "uint8", "y_dtype": "float32",
        "n_test": n_test, "n_reference": n_reference, "shard_size": shard_size, "seed": seed,
        "splits": entries,
    }


def prepare_dataset(source, corruption, n_test, shard_size, seed, out_dir, map_fn=map, n_reference=2):
    """Build out_dir (manifest.json + train/test shards); returns the manifest.

    map_fn(function, list_of_jobs) must return the results in job order;
    `function` is the picklable top-level `corrupt_shard`.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size} must be at least 1")
    check_combination(source, corruption)
    raw = load_source(source)
    if corruption.class_conditional and raw.num_classes < 2:
        raise ValueError(f"corruption.labels: true needs a source with at least 2 classes; data.source "
                         f"({source.kind}) has {raw.num_classes} (a folder source's classes are its sub-folders)")
    train, test, reference = split(raw, n_test, seed, n_reference)
    splits = {"train": train, "test": test, "reference": reference}
    ys = corrupt_splits(splits, corruption, shard_size, seed, map_fn)
    out_dir = Path(out_dir)
    with staging_dir(out_dir) as tmp:
        entries = {name: write_split(tmp, name, data.x0, ys[name], data.label, shard_size)
                   for name, data in splits.items()}
        manifest = describe(source, corruption, raw, n_test, n_reference, shard_size, seed, entries)
        write_manifest(tmp, manifest)
    return manifest
