"""How the networks run on their device: bf16 autocast, TF32, channels_last, torch.compile.

All four are off by default (`compute` in params.yaml), so a CPU run computes exactly what
it did without them; on a GPU they are the usual speed settings. One object,
`settings.ComputeParams`, reaches both the training loop (pipeline.training.loop) and sampling
(pipeline.evaluation.sampling):

- `precision: bf16` runs the forward passes (and the losses) under `torch.autocast` with
  bfloat16; parameters, optimiser state and EMA stay float32 (mixed precision, Micikevicius
  et al. 2018), so no loss scaling is needed (bf16 has float32's exponent range).
- `tf32: true` lets float32 matmuls and convolutions use TF32 tensor cores (Ampere and later).
- `channels_last: true` stores the networks' weights and the image batches NHWC, the layout
  cuDNN's convolutions prefer on tensor cores.
- `compile: true` wraps each trained network in `torch.compile` (after DDP wrapping).

`for_training` composes them for one network in the order that works: memory format first
(the weights DDP broadcasts), then DDP, then autocast around the forward, then compile.
Frozen networks (a teacher inside a distillation) keep running in float32. docs/gpu.md.
"""
import contextlib

import torch
from torch import nn


def configure_backends(compute, device):
    """Process-wide switches (TF32) for `device`; call once per process before training."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = compute.tf32
        torch.backends.cudnn.allow_tf32 = compute.tf32


def autocast(compute, device):
    """The autocast context of `compute` on `device` (a no-op context for float32)."""
    if compute.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def memory_format(compute):
    return torch.channels_last if compute.channels_last else torch.contiguous_format


def prepare_net(net, compute):
    """The network in the memory format of `compute` (weights of 4-D convolutions move)."""
    return net.to(memory_format=memory_format(compute)) if compute.channels_last else net


def prepare_batch(batch, compute):
    """Image tensors (4-D) of a batch dict in the memory format of `compute`."""
    if not compute.channels_last:
        return batch
    return {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for k, v in batch.items()}


def compile_net(net, compute):
    """torch.compile(net) when `compute.compile`, else the network itself."""
    return torch.compile(net) if compute.compile else net


class Autocast(nn.Module):
    """`net` whose forward runs under bf16 autocast and returns float32 tensors, so losses,
    targets and the backward pass's accumulation stay in float32 (only the wrapped
    network's own ops run in bf16)."""

    def __init__(self, net, device_type):
        super().__init__()
        self.net, self.device_type = net, device_type

    def forward(self, *args, **kwargs):
        with torch.autocast(device_type=self.device_type, dtype=torch.bfloat16):
            out = self.net(*args, **kwargs)
        return _to_float(out)

    def __getattr__(self, name):
        # Attributes of the wrapped network (e.g. a denoiser's sigma_data) stay reachable.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.net, name)


def _to_float(out):
    if torch.is_tensor(out):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, (tuple, list)):
        return type(out)(_to_float(o) for o in out)
    if isinstance(out, dict):
        return {k: _to_float(v) for k, v in out.items()}
    return out


def for_training(net, compute, device, wrap=lambda n: n):
    """The network the loop trains through: `wrap` (DDP) applied between the memory format
    and the autocast/compile wrappers; `net` itself stays the module that is checkpointed."""
    net = wrap(prepare_net(net, compute))
    if compute.precision == "bf16":
        net = Autocast(net, torch.device(device).type)
    return compile_net(net, compute)
