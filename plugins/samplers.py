"""Built-in samplers: ddpm (Ho et al. Algorithm 2) and ddim (Song et al., η, σ̂ and τ sub-sequences), plugin API 2.

Every coefficient of a step is computed once per run in float64 (``plan``) and read by index in
``step``, so the step is a few multiply-adds that trace to ONNX as they run in torch.
"""

from __future__ import annotations

import numpy as np
import torch
from attrs import Converter, define, field
from torch import Tensor

from toolkit import limits
from toolkit.errors import ToolkitError
from toolkit.hookspecs import hookimpl
from toolkit.protocols import ModelFn, Schedule
from toolkit.sampling import Plan, alpha_sigma, grid, log_snr_at, spacing_field, split_output, x0_and_eps


def _flag(value, field) -> bool:
    """A boolean option: True/False, or "true"/"false"/"1"/"0" in any case (a bare "False" is not true)."""
    return limits.flag(field.name, value)


flag = Converter(_flag, takes_field=True)


def choice(*choices):
    """An attrs validator with a one-line message (attrs' own prints a tuple)."""
    def check(instance, attribute, value) -> None:
        if value not in choices:
            raise ToolkitError(f"{getattr(instance, 'name', type(instance).__name__)}: {attribute.name} must be one of "
                               f"{', '.join(map(str, choices))}, not {value!r}")
    return check


def unit_interval(instance, attribute, value) -> None:
    """η-like options: a number in [0, 1] (NaN refused)."""
    if not 0.0 <= value <= 1.0:
        raise ToolkitError(f"{instance.name}: {attribute.name} must lie in [0, 1], got {value}")


def percentile(instance, attribute, value) -> None:
    if not 0 <= value < 1:
        raise ToolkitError(f"{attribute.name} must be a percentile p in (0, 1), or 0 for off; got {value!r}")


def positive(instance, attribute, value) -> None:
    if not value > 0 or value != value or value == float("inf"):
        raise ToolkitError(f"{attribute.name} must be a positive number, got {value!r}")


def threshold_field():
    """Dynamic thresholding of x̂_0 (Saharia et al. 2022): the percentile p (e.g. 0.995); 0 = off."""
    return field(default=0.0, converter=float, validator=percentile)


def clip_range_field():
    """The range ±r x̂_0 is clipped or thresholded to: 1 for data in [-1, 1]."""
    return field(default=1.0, converter=float, validator=positive)


def posterior_coefficients(a_t: np.ndarray, a_prev: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """μ̃ = coef_x0·x̂_0 + coef_xt·x_t of q(x_prev | x_t, x_0) over a visited pair, and the pair's own
    β = 1 - ᾱ_t/ᾱ_prev (Ho et al. eq. 6-7, respaced), in float64."""
    beta = 1 - a_t / a_prev
    return np.sqrt(a_prev) * beta / (1 - a_t), (1 - a_prev) * np.sqrt(a_t / a_prev) / (1 - a_t), beta


@define(frozen=True)
class DDPM:
    """Ancestral sampling, Algorithm 2 of Ho et al.: x_{t-1} = μ̃(x_t, x̂_0) + σ_t z, z = 0 at the last step.

    variance: "posterior" σ² = β̃_t (fixed small), "beta" σ² = β_t (fixed large), or "learned"
    (Improved DDPM: exp(v log β_t + (1-v) log β̃_t), from a model with 2C output channels; "auto"
    picks learned for such a model and β̃ otherwise). With fewer steps than T the step's β is
    1 - ᾱ_t/ᾱ_{t_prev} over the visited τ (respacing).
    """

    variance: str = field(default="auto", validator=choice("auto", "posterior", "beta", "learned"))
    clip_x0: bool = field(default=True, converter=flag)
    threshold: float = threshold_field()
    clip_range: float = clip_range_field()
    spacing: str = spacing_field("uniform")
    default_steps: int | None = None
    name: str = field(default="ddpm", init=False)
    stochastic: bool = field(default=True, init=False)

    def plan(self, schedule: Schedule, steps: int) -> Plan:
        g = grid(schedule, steps, self.spacing)
        a, S = g.alpha**2, g.steps
        a_t, a_prev = a[:-1], a[1:]
        coef_x0, coef_xt, beta = posterior_coefficients(a_t, a_prev)  # the step's own β over the visited pair
        tilde = (1 - a_prev) / (1 - a_t) * beta
        # At the last step β̃ = 0: log β̃ is clipped to the β̃ of t+1 → t, as guided-diffusion does, so the
        # classifier-guidance shift Σ·s∇ does not vanish there (no noise is added at that step).
        T = schedule.num_timesteps
        a_next = alpha_sigma(log_snr_at(schedule, np.minimum(g.t[:-1] + 1, T - 1)))[0] ** 2
        tilde_next = (1 - a_t) / np.maximum(1 - a_next, 1e-20) * (1 - a_next / a_t)
        final = g.t[1:] < 0
        return Plan(t=g.model_t[:-1], t_x=g.t[:-1], steps=S, draws_per_step=1, tables={
            "alpha": g.alpha[:-1], "sigma": g.sigma[:-1],
            "coef_x0": coef_x0, "coef_xt": coef_xt,  # μ̃ = coef_x0·x̂_0 + coef_xt·x_t  (eq. 7)
            "log_beta": np.log(beta),
            "log_tilde": np.log(np.maximum(np.where(final, tilde_next, tilde), 1e-20)),
            "nonzero": (~final).astype(np.float64),
        })

    def init_state(self, x_T: Tensor, plan: Plan) -> tuple[Tensor, ...]:
        return ()

    def log_variance(self, out: Tensor, x: Tensor, i: Tensor, plan: Plan) -> Tensor:
        """log σ² of p(x_{t_prev} | x_t): the Σ that Algorithm 2 and classifier guidance use."""
        _, v = split_output(out, x)
        mode = self.variance
        if mode == "auto":
            mode = "learned" if v is not None else "posterior"
        log_beta, log_tilde = plan["log_beta"][i].to(x.dtype), plan["log_tilde"][i].to(x.dtype)
        if mode == "learned":
            if v is None:
                raise ToolkitError("ddpm variance='learned' needs a model with learned variance (2C outputs)")
            frac = (v + 1) / 2  # network output in [-1, 1] → v in [0, 1]  (Improved DDPM eq. 15)
            return frac * log_beta + (1 - frac) * log_tilde
        return (log_beta if mode == "beta" else log_tilde).expand_as(x)

    def step(self, model_fn: ModelFn, x: Tensor, state: tuple, i: Tensor, plan: Plan, noise: Tensor | None):
        out = model_fn(x, plan.t[i])
        eps, _ = split_output(out, x)
        x0, _ = x0_and_eps(x, eps, plan["alpha"][i], plan["sigma"][i], self.clip_x0, self.threshold,
                                self.clip_range)
        mean = plan["coef_x0"][i] * x0 + plan["coef_xt"][i] * x  # μ̃(x_t, x̂_0), eq. 7
        if noise is None:
            return mean, ()
        std = torch.exp(0.5 * self.log_variance(out, x, i, plan))
        return mean + plan["nonzero"][i] * std * noise[0], ()


@define(frozen=True)
class DDIM:
    """Generalized DDPM sampling (Song et al. eq. 12) over a τ sub-sequence of S steps.

    x_{τ_{i-1}} = √ᾱ_{τ_{i-1}} x̂_0 + √(1-ᾱ_{τ_{i-1}}-σ²) ε_θ + σ ε, with
    σ_{τ_i}(η) = η √((1-ᾱ_{τ_{i-1}})/(1-ᾱ_{τ_i})) √(1-ᾱ_{τ_i}/ᾱ_{τ_{i-1}}); η = 0 is deterministic DDIM
    (the Euler method on the probability-flow ODE), η = 1 over all T steps is DDPM with σ² = β̃.
    sigma="hat": the σ̂_{τ_i} = √(1-ᾱ_{τ_i}/ᾱ_{τ_{i-1}}) row of the DDIM paper's tables (DDPM's larger
    variance over the sub-sequence: x = μ̃(x_t, x̂_0) + σ̂ z); η is then unused.
    """

    eta: float = field(default=0.0, converter=float, validator=unit_interval)
    clip_x0: bool = field(default=True, converter=flag)
    threshold: float = threshold_field()
    clip_range: float = clip_range_field()
    spacing: str = spacing_field("uniform")
    default_steps: int | None = 50
    sigma: str = field(default="eta", validator=choice("eta", "hat"))
    name: str = field(default="ddim", init=False)

    @property
    def stochastic(self) -> bool:
        return self.eta > 0 or self.sigma == "hat"

    def plan(self, schedule: Schedule, steps: int) -> Plan:
        g = grid(schedule, steps, self.spacing)
        a = g.alpha**2
        a_t, a_prev = a[:-1], a[1:]
        tables = {"alpha": g.alpha[:-1], "sigma": g.sigma[:-1]}
        if self.sigma == "hat":  # DDPM's mean μ̃ with σ̂ = √β of the pair
            c_x0, c_x, beta = posterior_coefficients(a_t, a_prev)
            tables |= {"c_x0": c_x0, "c_eps": np.zeros_like(a_t), "c_x": c_x,
                       "s_noise": np.where(g.t[1:] >= 0, np.sqrt(beta), 0.0)}
        else:
            sig = self.eta * np.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))  # σ_τi(η)
            tables |= {"c_x0": np.sqrt(a_prev), "c_eps": np.sqrt(np.clip(1 - a_prev - sig**2, 0, None)),
                       "s_noise": sig}  # "direction pointing to x_t"
        return Plan(t=g.model_t[:-1], t_x=g.t[:-1], steps=g.steps, tables=tables, draws_per_step=1 if self.stochastic else 0)

    def inverse_plan(self, schedule: Schedule, steps: int) -> Plan:
        """The deterministic run backwards, data → x_T (DDIM inversion: the ODE of eq. 14 integrated forward).
        Iteration k goes from the k-th visited time (the data itself for k = 0) up to the next, with ε_θ at
        the point it starts from; ``step`` is the same, with x̂_0 unclipped (clipping is not invertible)."""
        if self.stochastic:
            raise ToolkitError("ddim with eta > 0 (or sigma=hat) is stochastic and cannot be inverted: use eta=0")
        g = grid(schedule, steps, self.spacing)
        t_up, a_up, s_up, x_up = (v[:-1][::-1].copy() for v in (g.model_t, g.alpha, g.sigma, g.t))  # ascending
        return Plan(t=np.concatenate([t_up[:1], t_up[:-1]]), t_x=np.concatenate([x_up[:1], x_up[:-1]]),
                    steps=g.steps, tables={
            "alpha": np.concatenate([[1.0], a_up[:-1]]), "sigma": np.concatenate([[0.0], s_up[:-1]]),
            "c_x0": a_up, "c_eps": s_up, "s_noise": np.zeros_like(a_up)})

    def init_state(self, x_T: Tensor, plan: Plan) -> tuple[Tensor, ...]:
        return ()

    def step(self, model_fn: ModelFn, x: Tensor, state: tuple, i: Tensor, plan: Plan, noise: Tensor | None):
        eps, _ = split_output(model_fn(x, plan.t[i]), x)
        x0, eps = x0_and_eps(x, eps, plan["alpha"][i], plan["sigma"][i], self.clip_x0, self.threshold,
                                self.clip_range)
        x_prev = plan["c_x0"][i] * x0 + plan["c_eps"][i] * eps
        if self.sigma == "hat":
            x_prev = x_prev + plan["c_x"][i] * x
        if noise is not None:
            x_prev = x_prev + plan["s_noise"][i] * noise[0]
        return x_prev, ()


@hookimpl
def register_samplers(register):
    register("ddpm", DDPM)
    register("ddim", DDIM)
