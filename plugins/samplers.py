"""Built-in samplers: ddpm (Ho et al. Algorithm 2) and ddim (Song et al., η and τ sub-sequences)."""

from __future__ import annotations

from typing import Callable

import torch
from attrs import define, field, validators
from torch import Tensor

from toolkit.diffusion import alpha_bar, predict_eps, predict_x0, q_posterior
from toolkit.errors import ToolkitError
from toolkit.hookspecs import hookimpl
from toolkit.protocols import ModelFn, NoiseFn, Schedule
from toolkit.sampling import SPACINGS, check_steps, sample_loop, spaced_timesteps


def _split(out: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor | None]:
    """ε and, for a learned-variance model (2C channels), the raw interpolation output."""
    C = x_t.shape[1]
    if out.shape[1] == C:
        return out, None
    if out.shape[1] == 2 * C:
        return out[:, :C], out[:, C:]
    raise ToolkitError(f"model output has {out.shape[1]} channels; expected {C} or {2 * C}")


def _x0_eps(schedule: Schedule, x_t: Tensor, t: Tensor, eps: Tensor, clip: bool) -> tuple[Tensor, Tensor]:
    x0 = predict_x0(schedule, x_t, t, eps)
    if clip:  # clip the predicted x_0 to the data range, then re-derive ε (guided-diffusion)
        x0 = x0.clamp(-1, 1)
        eps = predict_eps(schedule, x_t, t, x0)
    return x0, eps


def _in(*choices):
    return validators.in_(choices)


@define(frozen=True)
class DDPM:
    """Ancestral sampling, Algorithm 2 of Ho et al.: x_{t-1} = μ̃(x_t, x̂_0) + σ_t z, z = 0 at the last step.

    variance: "posterior" σ² = β̃_t (fixed small), "beta" σ² = β_t (fixed large), or "learned"
    (Improved DDPM: exp(v log β_t + (1-v) log β̃_t), from a model with 2C output channels; "auto"
    picks learned for such a model and β̃ otherwise). With fewer steps than T the step's β is
    1 - ᾱ_t/ᾱ_{t_prev} over the visited τ (respacing).
    """

    variance: str = field(default="auto", validator=_in("auto", "posterior", "beta", "learned"))
    clip_x0: bool = True
    spacing: str = field(default="uniform", validator=_in(*SPACINGS))
    default_steps: int | None = None
    name: str = field(default="ddpm", init=False)
    stochastic: bool = field(default=True, init=False)

    def timesteps(self, schedule: Schedule, steps: int) -> Tensor:
        return spaced_timesteps(schedule.num_timesteps, check_steps(schedule, steps), self.spacing)

    def log_variance(self, out: Tensor, x_t: Tensor, t: Tensor, t_prev: Tensor, schedule: Schedule) -> Tensor:
        """log σ² of p(x_{t_prev} | x_t): the Σ that Algorithm 2 and classifier guidance use.

        At the final step (t_prev = -1) β̃ is 0; as in guided-diffusion, log β̃ there is clipped to the
        β̃ of the step t+1 → t, so the guidance mean shift Σ·s∇ does not vanish (no noise is added).
        """
        _, v = _split(out, x_t)
        f64 = torch.float64
        a_t, a_prev = alpha_bar(schedule, t, x_t, f64), alpha_bar(schedule, t_prev, x_t, f64)
        beta = 1 - a_t / a_prev
        beta_tilde = (1 - a_prev) / (1 - a_t) * beta
        t_next = (t + 1).clamp(max=schedule.num_timesteps - 1)
        a_next = alpha_bar(schedule, t_next, x_t, f64)
        beta_tilde_next = (1 - a_t) / (1 - a_next).clamp(min=1e-20) * (1 - a_next / a_t)
        final = (t_prev < 0).reshape(beta.shape)
        log_tilde = torch.log(torch.where(final, beta_tilde_next, beta_tilde).clamp(min=1e-20))
        log_beta = torch.log(beta)
        mode = self.variance
        if mode == "auto":
            mode = "learned" if v is not None else "posterior"
        if mode == "learned":
            if v is None:
                raise ToolkitError("ddpm variance='learned' needs a model with learned variance (2C outputs)")
            frac = (v + 1) / 2  # network output in [-1, 1] → v in [0, 1]
            return frac * log_beta.to(x_t.dtype) + (1 - frac) * log_tilde.to(x_t.dtype)
        if mode == "beta":
            return log_beta.to(x_t.dtype).expand_as(x_t)
        return log_tilde.to(x_t.dtype).expand_as(x_t)

    def step(self, out: Tensor, x_t: Tensor, t: Tensor, t_prev: Tensor, schedule: Schedule,
             noise: Tensor | None) -> Tensor:
        eps, _ = _split(out, x_t)
        x0, _ = _x0_eps(schedule, x_t, t, eps, self.clip_x0)
        mean, _ = q_posterior(schedule, x0, x_t, t, t_prev)  # μ̃(x_t, x̂_0), eq. 7
        if noise is None:
            return mean
        std = torch.exp(0.5 * self.log_variance(out, x_t, t, t_prev, schedule))
        nonzero = (t_prev >= 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))  # no noise at the last step
        return mean + nonzero * std * noise

    def sample(self, model_fn: ModelFn, schedule: Schedule, x_T: Tensor, *, steps: int,
               noise_fn: NoiseFn, progress: Callable[[int], None] | None = None) -> Tensor:
        return sample_loop(self, model_fn, schedule, x_T, steps=steps, noise_fn=noise_fn, progress=progress)


@define(frozen=True)
class DDIM:
    """Generalized DDPM sampling (Song et al. eq. 12) over a τ sub-sequence of S steps.

    x_{τ_{i-1}} = √ᾱ_{τ_{i-1}} x̂_0 + √(1-ᾱ_{τ_{i-1}}-σ²) ε_θ + σ ε, with
    σ_{τ_i}(η) = η √((1-ᾱ_{τ_{i-1}})/(1-ᾱ_{τ_i})) √(1-ᾱ_{τ_i}/ᾱ_{τ_{i-1}}); η = 0 is deterministic DDIM,
    η = 1 over all T steps is DDPM with σ² = β̃.
    """

    eta: float = field(default=0.0, converter=float)
    clip_x0: bool = True
    spacing: str = field(default="uniform", validator=_in(*SPACINGS))
    default_steps: int | None = 50
    name: str = field(default="ddim", init=False)

    def __attrs_post_init__(self) -> None:
        if not 0.0 <= self.eta <= 1.0:
            raise ToolkitError(f"ddim: eta must lie in [0, 1], got {self.eta}")

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    def timesteps(self, schedule: Schedule, steps: int) -> Tensor:
        return spaced_timesteps(schedule.num_timesteps, check_steps(schedule, steps), self.spacing)

    def sigma(self, t: Tensor, t_prev: Tensor, schedule: Schedule, like: Tensor) -> Tensor:
        """σ_{τ_i}(η), in float64."""
        a_t, a_prev = alpha_bar(schedule, t, like, torch.float64), alpha_bar(schedule, t_prev, like, torch.float64)
        return self.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()

    def step(self, out: Tensor, x_t: Tensor, t: Tensor, t_prev: Tensor, schedule: Schedule,
             noise: Tensor | None) -> Tensor:
        eps, _ = _split(out, x_t)
        x0, eps = _x0_eps(schedule, x_t, t, eps, self.clip_x0)
        a_prev = alpha_bar(schedule, t_prev, x_t, torch.float64)
        sigma = self.sigma(t, t_prev, schedule, x_t)
        dir_coef = (1 - a_prev - sigma**2).clamp(min=0).sqrt()  # "direction pointing to x_t"
        x_prev = a_prev.sqrt().to(x_t.dtype) * x0 + dir_coef.to(x_t.dtype) * eps
        if noise is not None and self.eta > 0:
            x_prev = x_prev + sigma.to(x_t.dtype) * noise
        return x_prev

    def sample(self, model_fn: ModelFn, schedule: Schedule, x_T: Tensor, *, steps: int,
               noise_fn: NoiseFn, progress: Callable[[int], None] | None = None) -> Tensor:
        return sample_loop(self, model_fn, schedule, x_T, steps=steps, noise_fn=noise_fn, progress=progress)


@hookimpl
def register_samplers(register):
    register("ddpm", DDPM)
    register("ddim", DDIM)
