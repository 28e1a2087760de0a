"""Example toolkit plugin: the `euler` sampler and the `sigmoid` schedule, through the public API only."""

from __future__ import annotations

from typing import Callable

import torch
from attrs import define, field
from torch import Tensor

import toolkit
from toolkit import ToolkitError, hookimpl, schedule_from_betas
from toolkit.diffusion import alpha_bar
from toolkit.sampling import check_steps, sample_loop, spaced_timesteps

# Refuse to load into a toolkit whose plugin API this plugin was not written for.
if toolkit.PLUGIN_API_VERSION != 1:
    raise ImportError(f"toolkit-plugin-example needs toolkit plugin API 1, found {toolkit.PLUGIN_API_VERSION}")


def sigmoid(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
            start: float = -6.0, end: float = 6.0) -> toolkit.Schedule:
    """β_t = β_start + (β_end − β_start)·sigmoid(linspace(start, end, T)) (the GeoDiff sigmoid schedule)."""
    if num_timesteps < 1:
        raise ToolkitError(f"num_timesteps must be positive, got {num_timesteps}")
    s = torch.sigmoid(torch.linspace(start, end, num_timesteps, dtype=torch.float64))
    return schedule_from_betas("sigmoid", beta_start + (beta_end - beta_start) * s)


@define(frozen=True)
class Euler:
    """Euler steps on the probability-flow ODE dx/dσ = ε(x, σ) in the variables x̃ = x/√ᾱ, σ = √((1-ᾱ)/ᾱ)
    (Karras et al. 2022, eq. 3 with the variance-preserving scaling); deterministic."""

    spacing: str = "trailing"
    default_steps: int = 25
    name: str = field(default="euler", init=False)
    stochastic: bool = field(default=False, init=False)

    def timesteps(self, schedule: toolkit.Schedule, steps: int) -> Tensor:
        return spaced_timesteps(schedule.num_timesteps, check_steps(schedule, steps), self.spacing)

    def step(self, out: Tensor, x_t: Tensor, t: Tensor, t_prev: Tensor, schedule: toolkit.Schedule,
             noise: Tensor | None) -> Tensor:
        a_t, a_prev = alpha_bar(schedule, t, x_t), alpha_bar(schedule, t_prev, x_t)
        sigma, sigma_prev = ((1 - a_t) / a_t).sqrt(), ((1 - a_prev) / a_prev).sqrt()
        x_tilde = x_t / a_t.sqrt()
        x_tilde_prev = x_tilde + (sigma_prev - sigma) * out[:, : x_t.shape[1]]  # dx̃/dσ = ε
        return x_tilde_prev * a_prev.sqrt()

    def sample(self, model_fn: Callable, schedule: toolkit.Schedule, x_T: Tensor, *, steps: int,
               noise_fn: Callable, progress: Callable[[int], None] | None = None) -> Tensor:
        return sample_loop(self, model_fn, schedule, x_T, steps=steps, noise_fn=noise_fn, progress=progress)


@hookimpl
def register_samplers(register):
    register("euler", Euler, aliases=("euler-ode",))


@hookimpl
def register_schedules(register):
    register("sigmoid", sigmoid)


__all__ = ["Euler", "sigmoid"]
