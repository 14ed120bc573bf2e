"""Counting network evaluations (NFE), the cost unit every result is reported in.

One call of the wrapped denoiser is one NFE whatever the batch size; so a
classifier-free-guided evaluation costs 2 (conditional and unconditional calls
are made separately, never concatenated into one batch).
"""


class CountingDenoiser:
    """Wraps `denoise(x, t, y, ...)`; `.calls` counts the calls made through it."""

    def __init__(self, denoise):
        self.denoise = denoise
        self.calls = 0

    def __call__(self, x, t, y, *args, **kwargs):
        self.calls += 1
        return self.denoise(x, t, y, *args, **kwargs)
