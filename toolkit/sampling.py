"""What samplers share: timestep sub-sequences τ and the loop that calls the model and ``step``."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor

from toolkit.errors import ToolkitError
from toolkit.protocols import ModelFn, NoiseFn, Sampler, Schedule

SPACINGS = ("uniform", "quadratic", "trailing", "linspace")


def check_steps(schedule: Schedule, steps: int) -> int:
    T = schedule.num_timesteps
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= T:
        raise ToolkitError(f"steps must be an integer in 1..{T} (the schedule's T), got {steps!r}")
    return int(steps)


def spaced_timesteps(num_timesteps: int, steps: int, spacing: str = "uniform") -> Tensor:
    """τ: ``steps`` 0-based timesteps, descending.

    uniform: τ_i = ⌊i·T/S⌋ (DDIM's "uniform"; diffusers' "leading" when S divides T); quadratic: τ_i = ⌊(i·√(0.8T)/(S-1))²⌋
    (DDIM's CIFAR-10 choice); trailing: T-1 down in steps of T/S (Lin et al. 2024, starts at t=T-1);
    linspace: evenly from 0 to T-1 inclusive (guided-diffusion's respacing).
    """
    T, S = num_timesteps, steps
    if not 1 <= S <= T:
        raise ToolkitError(f"steps must be in 1..{T}, got {S}")
    if spacing == "uniform":
        seq = np.floor(np.arange(S) * (T / S)).astype(np.int64)
    elif spacing == "quadratic":
        seq = (np.linspace(0, np.sqrt(T * 0.8), S) ** 2).astype(np.int64)
        if len(np.unique(seq)) < S:
            raise ToolkitError(f"quadratic spacing repeats timesteps for {S} of {T} steps; use uniform")
    elif spacing == "trailing":
        seq = np.round(np.arange(T, 0, -T / S)).astype(np.int64)[:S] - 1
    elif spacing == "linspace":
        seq = np.round(np.linspace(0, T - 1, S)).astype(np.int64)
    else:
        raise ToolkitError(f"unknown spacing {spacing!r}; choose from {', '.join(SPACINGS)}")
    seq = np.unique(np.clip(seq, 0, T - 1))
    if len(seq) != S:
        raise ToolkitError(f"{spacing} spacing gives {len(seq)} distinct timesteps, not {S}")
    return torch.from_numpy(seq[::-1].copy())


def sample_loop(
    sampler: Sampler,
    model_fn: ModelFn,
    schedule: Schedule,
    x_T: Tensor,
    *,
    steps: int,
    noise_fn: NoiseFn,
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    """x_T → x_0: at each τ_i call the model, then the sampler's pure ``step`` (no noise after the last)."""
    ts = sampler.timesteps(schedule, steps).tolist()
    x = x_T
    B = x.shape[0]
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        tt = torch.full((B,), t, dtype=torch.long, device=x.device)
        tp = torch.full((B,), t_prev, dtype=torch.long, device=x.device)
        out = model_fn(x, tt)
        noise = noise_fn(i) if sampler.stochastic and t_prev >= 0 else None
        x = sampler.step(out, x, tt, tp, schedule, noise)
        if progress is not None:
            progress(1)
    return x


class MeanShifted:
    """A sampler whose step adds Σ·g to the mean: x_{t-1} ~ N(μ + Σ·s∇log p(y|x_t), Σ) (Dhariwal & Nichol, Algorithm 1).

    ``gradient_fn(x_t, t) -> s∇log p(y|x_t)``; Σ comes from the wrapped sampler's ``log_variance``.
    The wrapped sampler does not know it is guided.
    """

    def __init__(self, base: Sampler, gradient_fn: Callable[[Tensor, Tensor], Tensor]):
        self.base = base
        self.gradient_fn = gradient_fn
        self.name = base.name
        self.stochastic = base.stochastic

    def timesteps(self, schedule: Schedule, steps: int) -> Tensor:
        return self.base.timesteps(schedule, steps)

    def step(self, out: Tensor, x_t: Tensor, t: Tensor, t_prev: Tensor, schedule: Schedule,
             noise: Tensor | None) -> Tensor:
        x_prev = self.base.step(out, x_t, t, t_prev, schedule, noise)
        variance = torch.exp(self.base.log_variance(out, x_t, t, t_prev, schedule))
        return x_prev + variance * self.gradient_fn(x_t, t)

    def sample(self, model_fn: ModelFn, schedule: Schedule, x_T: Tensor, *, steps: int, noise_fn: NoiseFn,
               progress: Callable[[int], None] | None = None) -> Tensor:
        return sample_loop(self, model_fn, schedule, x_T, steps=steps, noise_fn=noise_fn, progress=progress)
