"""The base of every error a user can act on.

A `PipelineError` means bad input (params, data on disk, a checkpoint, a tracking server):
its message is one line naming the key or file, what is wrong and what to do. The stage
scripts print that line and exit with status 1, without a traceback (docs/errors.md);
anything else is a bug and keeps its traceback.
"""


class PipelineError(Exception):
    """Bad input, explained in one line (the stage that makes a missing file, etc.)."""
