"""The training loop shared by every stage that trains a network.

A `Task` says what to build and what to minimise; `run_training` owns the
loop (batches, optimiser, EMA, periodic reports and checkpoints). Nothing
here knows about Ray: `pipeline.training.ray_train` passes `LoopHooks` that wrap the
networks in DDP and turn reports into `ray.train.report` calls, and a bare
`LoopHooks()` runs the same loop in-process (tests, benchmarks).
"""
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from pipeline.config.settings import ComputeParams, RayParams, TrainParams
from pipeline.training import compute as device_settings


class Task:
    """What to train. Subclasses give `build` and `loss`; multi-network methods override
    `train_step`. Networks returned by `build` are checkpointed; those with no trainable
    parameter (a frozen target) are moved to the device but not wrapped in DDP. Frozen
    networks a task holds itself (a teacher) move with `to`."""

    def build(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def to(self, device):
        """Move whatever the task holds outside `build` (e.g. a frozen teacher) to `device`."""
        return self

    def after_step(self, nets, step):
        """Called with the unwrapped networks after optimiser step number `step` (1-based)."""

    def loss(self, nets, batch, generator) -> torch.Tensor:
        """Per-sample loss, shape (B,)."""
        raise NotImplementedError

    def optimizers(self, nets, params: TrainParams):
        trainable = [p for net in nets.values() for p in net.parameters() if p.requires_grad]
        return {"main": torch.optim.Adam(trainable, lr=params.lr, betas=params.adam_betas)}

    def train_step(self, nets, optimizers, batch, generator, params: TrainParams):
        """One optimisation step; returns scalar metrics."""
        loss = self.loss(nets, batch, generator).mean()
        return {"loss": optimizer_step(optimizers.values(), loss, params.grad_clip)}


def optimizer_step(optimizers, loss, grad_clip):
    """One update on the scalar `loss`: zero_grad, backward, clip each optimiser's gradients
    to norm `grad_clip`, step each. The only place the loop and the methods that alternate
    updates (IBMD, MM) take a step. Returns the loss detached, a 0-d tensor on the loss's
    device: reading it (`float`) waits for the device, so the loop reads its metrics only
    when it reports, not every step."""
    optimizers = list(optimizers)
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    loss.backward()
    for opt in optimizers:
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], grad_clip)
        opt.step()
    return loss.detach()


@dataclass
class LoopHooks:
    """How the loop talks to its surroundings; the defaults run it bare, in-process."""
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    wrap: Callable[[nn.Module], nn.Module] = lambda net: net
    report: Callable[[dict, dict | None], None] = lambda metrics, state: None
    resume: dict | None = None
    log: Callable[[dict, int], None] | None = None  # rank 0 only: e.g. MLflow
    history: list = field(default_factory=list)
    compute: ComputeParams = field(default_factory=ComputeParams)  # pipeline.training.compute


@dataclass(frozen=True)
class TrainRun:
    """One training run as `ray_train.fit` runs it, in one picklable object (it travels to
    every Ray worker): the task, its data, its settings and seed, the resources (`scaling`),
    rank-0 logging and report hooks.

    `load_data` is a zero-argument callable run on each worker (data are read there, not
    shipped from the driver). `log(metrics, step)` runs on rank 0 only. `hooks` run in order
    on every rank at every report, before it is sent (`ray_train.ReportContext`)."""
    task: Task
    load_data: Callable[[], dict]
    train: TrainParams
    seed: int
    scaling: RayParams
    log: Optional[Callable[[dict, int], None]] = None
    hooks: tuple = ()


def sample_batch(data, batch_size, generator, device):
    """A random minibatch (with replacement) from in-memory tensors."""
    n = len(next(iter(data.values())))
    idx = torch.randint(0, n, (batch_size,), generator=generator)
    return {k: v[idx].to(device) for k, v in data.items()}


@torch.no_grad()
def update_ema(ema, net, decay):
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p.detach(), 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b)


def lr_scale(params, step):
    """Linear warm-up, then constant or a cosine decay to 0 at the last step."""
    if step < params.warmup_steps:
        return (step + 1) / params.warmup_steps
    if params.lr_schedule == "constant":
        return 1.0
    progress = (step - params.warmup_steps) / max(1, params.steps - params.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _set_lr(optimizers, params, step):
    scale = lr_scale(params, step)
    for opt in optimizers.values():
        for group in opt.param_groups:
            group["lr"] = params.lr * scale


def training_state(step, nets, ema, optimizers):
    """Everything needed to resume: plain tensors and ints only (weights_only-loadable)."""
    return {"step": step,
            "nets": {k: v.state_dict() for k, v in nets.items()},
            "ema": {k: v.state_dict() for k, v in ema.items()},
            "optimizers": {k: v.state_dict() for k, v in optimizers.items()}}


def _restore(state, nets, ema, optimizers):
    for k in nets:
        nets[k].load_state_dict(state["nets"][k])
        ema[k].load_state_dict(state["ema"][k])
    for k in optimizers:
        optimizers[k].load_state_dict(state["optimizers"][k])
    return state["step"]


def _trainable(net):
    return any(p.requires_grad for p in net.parameters())


def run_training(task: Task, data, params: TrainParams, seed, hooks: LoopHooks = None):
    """Train `task` on `data` (a dict of tensors, or a `data.stream.ShardStream`) for
    params.steps; return the final training state."""
    hooks = hooks or LoopHooks()
    torch.manual_seed(seed)  # identical initial weights on every rank
    device_settings.configure_backends(hooks.compute, hooks.device)
    task.to(hooks.device)
    nets = {k: device_settings.prepare_net(v.to(hooks.device), hooks.compute) for k, v in task.build().items()}
    ema = {k: copy.deepcopy(v).requires_grad_(False) for k, v in nets.items()}
    optimizers = task.optimizers(nets, params)
    start = _restore(hooks.resume, nets, ema, optimizers) if hooks.resume else 0
    wrapped = {k: device_settings.for_training(v, hooks.compute, hooks.device, hooks.wrap) if _trainable(v) else v
               for k, v in nets.items()}
    # A distinct stream per rank (data parallelism) and per resume point.
    generator = torch.Generator().manual_seed(seed * 7919 + hooks.rank * 104_729 + start)
    per_worker = max(1, params.batch_size // hooks.world_size)
    if hasattr(data, "for_rank"):  # a data.stream.ShardStream: this rank's share of the shards
        data = data.for_rank(hooks.rank, hooks.world_size)
    draw = data.batch if hasattr(data, "batch") else (lambda step, *a: sample_batch(data, *a))
    window, tick = [], time.perf_counter()
    for step in range(start, params.steps):
        _set_lr(optimizers, params, step)
        batch = device_settings.prepare_batch(draw(step, per_worker, generator, hooks.device), hooks.compute)
        window.append(task.train_step(wrapped, optimizers, batch, generator, params))
        done = step + 1
        task.after_step(nets, done)
        for k in nets:
            update_ema(ema[k], nets[k], params.ema_decay)
        if done % params.log_every == 0 or done == params.steps:
            # A window runs from the end of one report to the end of the next step
            # batch: the report's own cost (a Ray barrier) lands in the next window.
            now = time.perf_counter()
            seconds, tick = now - tick, now
            metrics = {k: float(sum(m[k] for m in window)) / len(window) for k in window[0]}  # one sync
            metrics["step"] = done
            metrics["samples_per_sec"] = len(window) * per_worker * hooks.world_size / seconds
            checkpoint = done % params.checkpoint_every == 0 or done == params.steps
            state = training_state(done, nets, ema, optimizers) if checkpoint else None
            hooks.history.append(metrics)
            if hooks.log is not None and hooks.rank == 0:
                hooks.log({f"train/{k}": v for k, v in metrics.items() if k != "step"}, done)
            hooks.report(metrics, state)
            window = []
    return training_state(params.steps, nets, ema, optimizers)
