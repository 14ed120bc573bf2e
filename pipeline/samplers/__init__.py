"""Sampler registry and the NFE-budgeted entry point `sample`.

Every sampler shares `run(denoise, y, noise, steps, schedule, guidance=0.0, grid="fair")` and
states its exact cost `nfe_of_steps(steps, guidance)`; `sample` turns an NFE
budget into steps, counts the network calls and checks them against that cost.

Names are unique within a family; diffusion and bridge both have `euler` and
`heun`, so the flat `SAMPLERS` dict is keyed "family/name" ("bridge/heun").
Nothing outside this registry branches on a sampler's name.
"""
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from pipeline.samplers import bridge, diffusion
from pipeline.samplers.nfe import CountingDenoiser


@dataclass(frozen=True)
class Sampler:
    """A sampler: `run` with the shared signature and its exact NFE cost."""

    name: str
    family: Literal["diffusion", "bridge"]
    run: Callable
    nfe_of_steps: Callable[[int, float], int]

    @property
    def key(self):
        return f"{self.family}/{self.name}"


DIFFUSION_SAMPLERS = {s.name: s for s in [
    Sampler("ddim", "diffusion", diffusion.ddim, diffusion.one_eval_per_step_nfe),
    Sampler("ddpm", "diffusion", diffusion.ddpm, diffusion.one_eval_per_step_nfe),
    Sampler("euler", "diffusion", diffusion.euler, diffusion.one_eval_per_step_nfe),
    Sampler("heun", "diffusion", diffusion.heun, diffusion.heun_nfe),
    Sampler("dpmpp_2m", "diffusion", diffusion.dpmpp_2m, diffusion.one_eval_per_step_nfe),
]}

BRIDGE_SAMPLERS = {s.name: s for s in [
    Sampler("posterior", "bridge", bridge.posterior, bridge.one_eval_per_step_nfe),
    Sampler("posterior_ode", "bridge", bridge.posterior_ode, bridge.one_eval_per_step_nfe),
    Sampler("euler", "bridge", bridge.euler, bridge.one_eval_per_step_nfe),
    Sampler("heun", "bridge", bridge.heun, bridge.heun_nfe),
]}

SAMPLERS = {s.key: s for s in [*DIFFUSION_SAMPLERS.values(), *BRIDGE_SAMPLERS.values()]}


def get_sampler(sampler):
    """A `Sampler`, or its "family/name" key in SAMPLERS."""
    if isinstance(sampler, Sampler):
        return sampler
    if sampler not in SAMPLERS:
        raise KeyError(f"unknown sampler {sampler!r}; known: {sorted(SAMPLERS)}")
    return SAMPLERS[sampler]


def steps_for_nfe(sampler, nfe, guidance=0.0):
    """The most steps whose cost is <= nfe, or None if even 1 step costs more."""
    cost = get_sampler(sampler).nfe_of_steps
    if cost(1, guidance) > nfe:
        return None
    steps = 1
    while cost(steps + 1, guidance) <= nfe:      # costs strictly increase with steps
        steps += 1
    return steps


@torch.no_grad()
def sample(sampler, denoise, y, noise, nfe, schedule, guidance=0.0, grid="fair"):
    """Sample within an NFE budget: (x, nfe_used), nfe_used <= nfe the largest achievable.

    Raises ValueError when the budget buys no step, RuntimeError when the counted
    network calls differ from the sampler's stated cost. Runs without autograd.
    """
    sampler = get_sampler(sampler)
    steps = steps_for_nfe(sampler, nfe, guidance)
    if steps is None:
        raise ValueError(f"{sampler.key}: nfe={nfe} buys no step at guidance={guidance}")
    counted = CountingDenoiser(denoise)
    x = sampler.run(counted, y, noise, steps, schedule, guidance=guidance, grid=grid)
    expected = sampler.nfe_of_steps(steps, guidance)
    if counted.calls != expected:
        raise RuntimeError(f"{sampler.key}: {steps} steps made {counted.calls} calls, expected {expected}")
    return x, counted.calls
