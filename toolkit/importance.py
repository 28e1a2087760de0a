"""Importance sampling of t for L_vlb (Nichol & Dhariwal 2021, §3.3): p_t ∝ √E[L_t²], with E[L_t²] the mean of
the last 10 values of L_t seen for that t; uniform until every t has 10 (as the paper, and guided-diffusion's
LossSecondMomentResampler, do). L_vlb = E_{t~p}[L_t / p_t], so each sample's loss is weighted by 1 / (T p_t)."""

from __future__ import annotations

import torch
from torch import Tensor

from toolkit.errors import ToolkitError

HISTORY = 10  # values of L_t kept per t
UNIFORM_FLOOR = 1e-3  # p ← (1 − 1e-3) p + 1e-3 / T: no t is ever starved


class LossSecondMoment:
    """The per-t loss history and the distribution it gives (state: ``history`` [T, 10], ``count`` [T])."""

    def __init__(self, num_timesteps: int):
        self.T = int(num_timesteps)
        self.history = torch.zeros(self.T, HISTORY, dtype=torch.float64)
        self.count = torch.zeros(self.T, dtype=torch.int64)

    @property
    def warm(self) -> bool:
        """Every t has its 10 values: sampling is by the loss from now on."""
        return bool((self.count >= HISTORY).all())

    def probabilities(self) -> Tensor:
        """p_t [T] (float64): uniform until warm, then √(mean of L_t²) normalized, mixed with 1e-3 of uniform."""
        if not self.warm:
            return torch.full((self.T,), 1.0 / self.T, dtype=torch.float64)
        w = self.history.pow(2).mean(1).sqrt()
        w = w / w.sum()
        return (1 - UNIFORM_FLOOR) * w + UNIFORM_FLOOR / self.T

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """n timesteps and their loss weights 1 / (T p_t). Before warm-up the draw is ``randint(T)``, the same
        numbers a uniform run draws from the same generator."""
        if not self.warm:
            t = torch.randint(self.T, (n,), generator=generator)
            return t, torch.ones(n, dtype=torch.float64)
        p = self.probabilities()
        t = torch.multinomial(p, n, replacement=True, generator=generator)
        return t, 1.0 / (self.T * p[t])

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Append each sample's L_t to its t's history (the oldest value drops out once there are 10)."""
        for ti, li in zip(t.tolist(), losses.detach().double().cpu().tolist()):
            if li != li or li in (float("inf"), float("-inf")):
                continue  # a diverging step: the loop reports it; the history stays a distribution
            if self.count[ti] >= HISTORY:
                self.history[ti, :-1] = self.history[ti, 1:].clone()
                self.history[ti, -1] = li
            else:
                self.history[ti, self.count[ti]] = li
            self.count[ti] += 1

    def state(self) -> dict[str, Tensor]:
        return {"importance.history": self.history.clone(), "importance.count": self.count.clone()}

    def load(self, state: dict[str, Tensor]) -> None:
        history, count = state["importance.history"], state["importance.count"]
        if tuple(history.shape) != (self.T, HISTORY) or tuple(count.shape) != (self.T,):
            raise ToolkitError(f"importance-sampling state has shapes {list(history.shape)}, {list(count.shape)}, "
                             f"expected [{self.T}, {HISTORY}] and [{self.T}]")
        self.history = history.to(torch.float64).clone()
        self.count = count.to(torch.int64).clone()
