"""A discrete variance-preserving schedule built from β alone; every derived array in float64."""

from __future__ import annotations

import torch
from attrs import define, field
from torch import Tensor

from toolkit import limits
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


# ᾱ_T after the zero-terminal-SNR rescale: diffusers' floor 2⁻²⁴ (or half of ᾱ_(T-1) where that is lower, as on a
# rescaled linear schedule), so λ_T stays finite and float32 can still form x̂_0 = (x − σε)/α. The SNR at T is then
# at most 6·10⁻⁸ (cosine's own, after its β clip, is 2.4·10⁻⁹; linear's 4·10⁻⁵).
ZERO_SNR_ALPHA_BAR = 2.0**-24
SCHEDULE_WRAPPER_OPTIONS = ("zero_terminal_snr",)


def rescale_zero_terminal_snr(schedule) -> BetaSchedule:
    """Any schedule with zero terminal SNR (Lin et al. 2024, Algorithm 1): √ᾱ shifted and scaled so that
    √ᾱ_T = 0 while √ᾱ_0 is kept; ᾱ_T is then set to min(``ZERO_SNR_ALPHA_BAR``, ᾱ_(T-1)/2). Train it with v-prediction:
    at SNR 0 the model's input holds no signal, so ε is x_T itself and an ε-model cannot give x̂_0."""
    T = int(schedule.num_timesteps)
    if T < 2:
        raise ToolkitError("zero_terminal_snr needs a schedule of at least 2 timesteps")
    s = _float64(schedule.alphas_cumprod).sqrt()
    s0, sT = s[0].item(), s[-1].item()
    s = (s - sT) * (s0 / (s0 - sT))
    a = s**2
    a[-1] = min(ZERO_SNR_ALPHA_BAR, a[-2].item() / 2)
    if not bool((a[1:] < a[:-1]).all()) or not a[-1].item() > 0:
        raise ToolkitError(f"schedule {schedule.name!r} cannot be rescaled to zero terminal SNR: its ᾱ is not "
                           "strictly decreasing after rescaling")
    return schedule_from_alphas_cumprod(schedule.name, a, max_beta=1.0)  # no β clip: ᾱ_T is the floor above


def has_zero_terminal_snr(options: dict | None) -> bool:
    """Whether schedule options ask for the zero-terminal-SNR rescale."""
    return limits.flag("zero_terminal_snr", (options or {}).get("zero_terminal_snr", False))
