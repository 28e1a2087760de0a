"""A discrete variance-preserving schedule built from β alone; every derived array in float64."""

from __future__ import annotations

import torch
from attrs import define, field
from torch import Tensor

from toolkit.errors import ToolkitError


def _float64(x) -> Tensor:
    return torch.as_tensor(x, dtype=torch.float64).detach().clone()


@define(frozen=True)
class BetaSchedule:
    """q(x_t|x_{t-1}) = N(√(1-β_t) x_{t-1}, β_t I) for t = 0..T-1 (the papers' t = 1..T)."""

    name: str
    betas: Tensor = field(converter=_float64)

    _alphas_cumprod: Tensor = field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        b = self.betas
        if b.ndim != 1 or b.numel() < 1:
            raise ToolkitError(f"schedule {self.name!r}: betas must be a non-empty 1-D array")
        if not bool(torch.isfinite(b).all()) or bool((b <= 0).any()) or bool((b >= 1).any()):
            raise ToolkitError(f"schedule {self.name!r}: betas must lie in (0, 1)")
        # computed once: a constant for tracing, not a cumprod inside every exported step
        object.__setattr__(self, "_alphas_cumprod", torch.cumprod(1.0 - b, dim=0))

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.numel())

    @property
    def alphas(self) -> Tensor:
        return 1.0 - self.betas

    @property
    def alphas_cumprod(self) -> Tensor:  # ᾱ_t = Π_{s≤t} α_s
        return self._alphas_cumprod

    @property
    def alphas_cumprod_prev(self) -> Tensor:  # ᾱ_{t-1}, with ᾱ_{-1} = 1
        return torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])

    @property
    def sqrt_alphas_cumprod(self) -> Tensor:
        return self.alphas_cumprod.sqrt()

    @property
    def sqrt_one_minus_alphas_cumprod(self) -> Tensor:
        return (1.0 - self.alphas_cumprod).sqrt()

    @property
    def posterior_variance(self) -> Tensor:  # β̃_t = (1-ᾱ_{t-1}) / (1-ᾱ_t) · β_t  (Ho et al. eq. 7)
        return (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod) * self.betas

    @property
    def log_snr(self) -> Tensor:  # λ_t = log(ᾱ_t / (1-ᾱ_t)), strictly decreasing
        a = self.alphas_cumprod
        return torch.log(a) - torch.log1p(-a)


def schedule_from_betas(name: str, betas) -> BetaSchedule:
    """Build a Schedule from β_t (t = 0..T-1); plugin authors use this for their own schedules."""
    return BetaSchedule(name=name, betas=betas)


def schedule_from_alphas_cumprod(name: str, alphas_cumprod, max_beta: float = 0.999) -> BetaSchedule:
    """β_t = 1 - ᾱ_t / ᾱ_{t-1}, clipped at ``max_beta`` (Nichol & Dhariwal, eq. 17's β)."""
    a = _float64(alphas_cumprod)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), a[:-1]])
    return BetaSchedule(name=name, betas=torch.clamp(1.0 - a / prev, max=max_beta))
