"""Self-describing checkpoints: weights plus the resolved config that built them.

A checkpoint is a plain dict of tensors and JSON-like values, saved atomically
(temp file, then rename) and loaded with `weights_only=True`, so loading it
needs nothing but this file and cannot execute code.
"""
from pathlib import Path

import torch

from pipeline.errors import PipelineError
from pipeline.runtime.outputs import save_atomic

FORMAT_VERSION = 1


class CheckpointError(PipelineError, ValueError):
    """A checkpoint file is missing, unreadable or of the wrong kind."""


def writer_of(kind):
    """The DVC stage that writes checkpoints of `kind`: teacher_<name> -> teacher@<name>,
    student_<method> -> distill@<method>."""
    family, _, name = kind.partition("_")
    return f"{'distill' if family == 'student' else family}@{name}"


def _remedy(kinds):
    stages = sorted(writer_of(k) for k in kinds)
    return f"run `dvc repro {stages[0]}`" if len(stages) == 1 else f"it is written by one of {', '.join(stages)}"


def save_checkpoint(path, kind, config, state_dicts):
    """Write {kind, config, state} to `path` atomically; `config` must be JSON-like."""
    payload = {"format_version": FORMAT_VERSION, "kind": kind, "config": config,
               "state": dict(state_dicts)}
    save_atomic(payload, path)


def load_checkpoint(path, kinds):
    """Load a checkpoint whose `kind` is one of `kinds`; raise CheckpointError naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: {_remedy(kinds)}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, or holds arbitrary objects
        raise CheckpointError(f"checkpoint {path} {_unreadable(path, err)}; {_remedy(kinds)} again") from None
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a pipeline checkpoint (format_version {FORMAT_VERSION}); "
                              f"{_remedy(kinds)}")
    if payload.get("kind") not in kinds:
        raise CheckpointError(
            f"checkpoint {path} is of kind {payload.get('kind')!r}; expected one of {sorted(kinds)} "
            f"({', '.join(sorted(writer_of(k) for k in kinds))} writes it)")
    return payload


def _unreadable(path, err):
    """Why torch.load(weights_only=True) refused `path`, in words a user can act on."""
    import pickle
    import zipfile
    if not zipfile.is_zipfile(path):
        return "is not a torch checkpoint (truncated, or another kind of file)"
    if isinstance(err, pickle.UnpicklingError):
        # torch's own message suggests weights_only=False, which would run the file's code.
        return "holds pickled Python objects, which weights_only loading refuses (never load it with weights_only=False)"
    reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"cannot be read ({type(err).__name__}: {reason})"
