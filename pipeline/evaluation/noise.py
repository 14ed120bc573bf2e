"""Per-sample seeded Gaussian noise.

Every sample owns a generator seeded from its own integer seed, so the noise a
sample sees (initial and per step) does not depend on the batch it lands in,
the batch size or the number of workers.
"""
import torch


class SeededNoise:
    """Draws standard normal tensors of shape (B, *shape); row i comes from seeds[i]."""

    def __init__(self, seeds, shape, device="cpu", dtype=torch.float32):
        self.shape = tuple(shape)
        self.device = torch.device(device)
        self.dtype = dtype
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __len__(self):
        return len(self.generators)

    def randn(self):
        """One fresh draw per sample: (B, *shape)."""
        rows = [torch.randn(self.shape, generator=g) for g in self.generators]
        return torch.stack(rows).to(self.device, self.dtype)

    def randn_like(self, x):
        assert tuple(x.shape[1:]) == self.shape and x.shape[0] == len(self), (
            f"noise shape {(len(self),) + self.shape} does not match {tuple(x.shape)}")
        return self.randn()


def sample_seeds(base_seed, indices):
    """Seeds for samples `indices` (global test-set positions) under `base_seed`."""
    return [int(base_seed) * 1_000_003 + int(i) for i in indices]
