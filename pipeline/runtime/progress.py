"""Progress bars for the long phases (training steps, sampling, FID features): tqdm, on stderr.

Whether a bar shows is the caller's decision (`enabled`): the stages decide it from the
terminal and CI; nothing here reads the environment. A disabled bar is a tqdm that
writes nothing, so code updates it unconditionally.
"""
from tqdm import tqdm


def bar(total, desc, enabled, unit="it", file=None):
    """One bar for one phase; use it as a context manager (or `close()` it)."""
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=file,
                dynamic_ncols=True)


def show_training(bar_, step, metrics):
    """Move a training bar to optimiser step `step` (back, after a resume from a checkpoint),
    with the loss and throughput (samples/s over all workers) of the report `metrics`."""
    postfix = {"loss": f"{metrics['loss']:.4g}"} if "loss" in metrics else {}
    if "samples_per_sec" in metrics:
        postfix["samples/s"] = f"{metrics['samples_per_sec']:.0f}"
    bar_.set_postfix(postfix, refresh=False)
    bar_.update(step - bar_.n)  # redraws, with the new postfix
