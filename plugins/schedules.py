"""Built-in noise schedules: linear (Ho et al. 2020) and cosine (Nichol & Dhariwal 2021)."""

from __future__ import annotations

import math

import torch

from toolkit import limits
from toolkit.hookspecs import hookimpl
from toolkit.schedule import BetaSchedule, schedule_from_alphas_cumprod, schedule_from_betas


def _check_t(num_timesteps: int) -> int:
    return limits.integer("num_timesteps", num_timesteps, 1, limits.MAX_TIMESTEPS)


def linear(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> BetaSchedule:
    """β_t linear from 1e-4 to 0.02 at T = 1000; scaled by 1000/T so other T keep the same ᾱ_T."""
    T = _check_t(num_timesteps)
    scale = 1000.0 / T
    betas = torch.linspace(beta_start * scale, min(beta_end * scale, 0.999), T, dtype=torch.float64)
    return schedule_from_betas("linear", betas)


def cosine(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> BetaSchedule:
    """ᾱ_t = f(t)/f(0), f(t) = cos²(((t/T + s)/(1 + s))·π/2); β clipped at 0.999 (Improved DDPM eq. 17)."""
    T = _check_t(num_timesteps)
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return schedule_from_alphas_cumprod("cosine", (f / f[0])[1:], max_beta=max_beta)


@hookimpl
def register_schedules(register):
    register("linear", linear)
    register("cosine", cosine, aliases=("squaredcos_cap_v2",))
