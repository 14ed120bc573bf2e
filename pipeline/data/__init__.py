"""Data for the pipeline: sources, corruptions, sharded splits on disk.

Conventions shared by every module here:
- images are tensors (N, C, H, W);
- clean images `x0` are uint8 0..255 on disk and float in [-1, 1] in memory;
- the corrupted observation `y` has x0's shape (so it can be concatenated as
  input channels), float32, roughly [-1, 1] (additive noise may leave it);
- `label` is int64, the class index (0 when the source has no classes).

Modules: `sources` (loaders), `corruptions` (x0 -> y), `shards` (the on-disk
format with its manifest and checksums), `prepare` (the whole `prepare` stage
as one function). This file holds only what they all share, so importing any
of them never pulls in the others.
"""
import torch

from pipeline.errors import PipelineError


class DataError(PipelineError):
    """Bad or missing data on disk; the message names the offending path."""


def to_float(x_uint8):
    """uint8 0..255 -> float32 in [-1, 1]."""
    return x_uint8.to(torch.float32) / 127.5 - 1.0


def to_uint8(x):
    """float in [-1, 1] -> uint8 0..255 (clamped, rounded to nearest)."""
    return ((x.to(torch.float32) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
