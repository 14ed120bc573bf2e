"""Training data that need not fit in memory: each worker streams its share of the shards.

`TrainData` is what a training job hands to its workers (picklable, read on the worker).
With `ray.buffer_shards: null` (the default) it loads the whole split, as the loop always
did. With `ray.buffer_shards: K`, rank r of W workers owns the shards r, r + W, r + 2W, ...
of the manifest and holds K of them in memory at a time (`ShardStream`): peak memory per
worker is K shards, whatever the split's size.

Why per-worker shard iteration rather than Ray Data: the shards are already the unit of
storage, each verified by its checksum, and the loop draws minibatches with replacement
from a per-rank generator seeded by (seed, rank, resume step). Keeping that draw and adding
only which shards are resident keeps every run reproducible and resumable from the step
number alone, with no pipeline state to checkpoint (docs/architecture.md).

The schedule is a function of the step: buffer b (K shards) serves `steps_per_buffer`
steps, enough minibatches for about one pass over its samples; the buffers of one pass over
the share come from a permutation of the share seeded by (seed, rank, pass). A resumed run
loads the buffer its step falls in (its draws restart from a generator seeded by the resume
step, as with in-memory data). When K covers the whole share
nothing is ever swapped and the shards stay in manifest order, so one worker's draws equal
the in-memory loader's exactly (tested).
"""
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from pipeline.data import DataError, to_float
from pipeline.data.shards import MANIFEST, load_shard, load_tensors, read_manifest


@dataclass(frozen=True)
class TrainData:
    """A split's fields for training: `TrainData(...)()` on a worker gives the whole split in
    memory (a dict of tensors) or, with `buffer_shards`, a `ShardStream`."""
    data_dir: str
    split: str
    keys: tuple
    buffer_shards: Optional[int] = None
    seed: int = 0

    def __call__(self):
        if self.buffer_shards is None:
            return load_tensors(self.data_dir, self.split, self.keys)
        return ShardStream(self.data_dir, self.split, self.keys, self.buffer_shards, self.seed)


def _as_training_tensor(key, tensor):
    """A shard's stored tensor as `load_split` returns it (x0 in [-1, 1], y float, label int64)."""
    if key == "x0":
        return to_float(tensor)
    return tensor.to(torch.float32) if key == "y" else tensor.to(torch.int64)


class ShardStream:
    """One worker's share of a split's shards, `buffer_shards` of them resident at a time.
    `for_rank(rank, world)` picks the share; `batch(step, size, generator, device)` is the
    loop's minibatch at `step`."""

    def __init__(self, data_dir, split, keys, buffer_shards, seed=0):
        manifest = read_manifest(data_dir)
        entry = manifest["splits"].get(split)
        if entry is None:
            raise DataError(f"manifest {Path(data_dir) / MANIFEST} has no split {split!r}")
        self.data_dir, self.keys, self.buffer_shards, self.seed = Path(data_dir), tuple(keys), buffer_shards, seed
        self.entries = entry["shards"]
        self.shapes = {"x0": tuple(manifest["x0_shape"]), "y": tuple(manifest["y_shape"])}
        self.rank, self.world = 0, 1
        self.share = list(range(len(self.entries)))
        self._resident, self._tensors = None, None

    def for_rank(self, rank, world):
        if len(self.entries) < world:
            raise DataError(f"{self.data_dir / MANIFEST}: {len(self.entries)} shard(s) for {world} workers; "
                            "streaming needs at least one shard per worker (lower data.shard_size)")
        self.rank, self.world = rank, world
        self.share = list(range(rank, len(self.entries), world))
        self._resident = None
        return self

    @property
    def buffers_per_pass(self):
        return math.ceil(len(self.share) / self.buffer_shards)

    def steps_per_buffer(self, size):
        """Minibatches of `size` per buffer: about one pass over a buffer's samples."""
        mean_buffer = sum(self.entries[i]["count"] for i in self.share) / self.buffers_per_pass
        return max(1, math.ceil(mean_buffer / size))

    def shards_at(self, step, size):
        """The shard indices resident at `step` (manifest indices)."""
        if self.buffers_per_pass == 1:
            return tuple(self.share)  # the whole share, in manifest order, never swapped
        buffer = step // self.steps_per_buffer(size)
        passed, position = divmod(buffer, self.buffers_per_pass)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 7_919 + passed)
        order = [self.share[i] for i in torch.randperm(len(self.share), generator=g).tolist()]
        return tuple(order[position * self.buffer_shards:(position + 1) * self.buffer_shards])

    def _load(self, shards):
        if shards != self._resident:
            self._tensors = None  # free the old buffer before reading the new one
            loaded = [load_shard(self.data_dir / self.entries[i]["file"], self.entries[i], self.shapes)
                      for i in shards]
            self._tensors = {k: _as_training_tensor(k, torch.cat([s[k] for s in loaded])) for k in self.keys}
            self._resident = shards
        return self._tensors

    def batch(self, step, size, generator, device):
        """The minibatch at `step`: `size` samples drawn with replacement from the resident
        buffer with the loop's generator (the same draw as `training.sample_batch`)."""
        data = self._load(self.shards_at(step, size))
        n = len(next(iter(data.values())))
        idx = torch.randint(0, n, (size,), generator=generator)
        return {k: v[idx].to(device) for k, v in data.items()}
