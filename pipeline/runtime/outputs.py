"""Writing outputs so that a crash never leaves a plausible-looking one.

Files go to a temporary sibling and are renamed onto their path; directories
are built in a temporary sibling and swapped in whole (the old one is removed
only after the new one is in place). DVC deletes a failed stage's outputs
but not what the failed command wrote, so this is what keeps outputs honest.
"""
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path):
    """A temporary sibling path to write; renamed onto `path` when the block succeeds,
    removed when it fails (the suffix is kept, so writers that infer a format still can)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.tmp-", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the output is an ordinary file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_atomic(obj, path):
    """torch.save `obj` to `path` via a temporary file in the same folder. Saved through a file
    object, so the archive inside is not named after the temporary file: the same object
    gives the same bytes (the FID cache is keyed by the digest of the classifier's file)."""
    import torch  # here, not at the top: the report and the JSON writers need no torch
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def write_json(path, obj):
    """JSON to `path` via a temporary file (sorted keys, indented)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def replace_dir(tmp, out_dir):
    """Move the finished tmp onto out_dir; an old out_dir is removed only afterwards."""
    if not os.path.lexists(out_dir):
        os.rename(tmp, out_dir)
        return
    holder = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    old = holder / out_dir.name
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)  # put the previous output back
        holder.rmdir()
        raise
    shutil.rmtree(holder)


@contextmanager
def staging_dir(out_dir):
    """A temporary sibling of out_dir, renamed onto it on success, deleted on failure."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; the output is an ordinary folder
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
