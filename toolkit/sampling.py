"""What samplers share: time grids, the Plan of one run, and the one loop that drives a sampler.

Plugin API 2: a sampler is ``plan`` (per-step constants), ``init_state`` and a pure ``step``; the
toolkit owns the loop (here, for the torch backend) and the exporter builds the same loop as an ONNX
``Loop``, so what is exported is exactly what runs in torch. Version-1 samplers (``timesteps`` and
``step(out, x_t, t, t_prev, schedule, noise)``) run through ``V1Adapter``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
from attrs import define, field
from torch import Tensor

from toolkit import optional
from toolkit.diffusion import log_snr
from toolkit.errors import ToolkitError
from toolkit.noise import NoiseStreams
from toolkit.protocols import ModelFn, NoiseFn, Sampler, SamplerV1, Schedule

INTEGER_SPACINGS = ("uniform", "quadratic", "trailing", "linspace")
SPACINGS = (*INTEGER_SPACINGS, "logsnr", "karras")
KARRAS_RHO = 7.0
SIGMA_MAX = 80.0  # Karras et al. 2022's σ_max: the continuous grids start at σ̃ = min(80, σ̃_{T-1})


def listed_grid(spacing: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """A listed spacing ("999,908.2,636.5,309.7,85.9", a tuned grid as ``toolkit tune-grid`` prints) as
    (step times, network times), float64; an entry "t@s" steps at t but calls the network at time s (a
    shifted call, Li et al. 2024's time-shift sampler), a bare "t" calls it at t. None for a named spacing."""
    if not isinstance(spacing, str) or spacing in SPACINGS:
        return None
    try:
        pairs = [(float(t), float(s or t)) for t, _, s in (p.partition("@") for p in spacing.split(","))]
    except ValueError:
        return None
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def listed_times(spacing: Any) -> np.ndarray | None:
    """The step times of a listed spacing; None for a named spacing."""
    listed = listed_grid(spacing)
    return None if listed is None else listed[0]


def _number(v: float) -> str:
    v = float(v)
    return str(int(v)) if v.is_integer() else repr(v)


def format_listed(times: Any, model_times: Any = None) -> str:
    """A listed spacing from step times (and the network's times: "t@s" where they differ)."""
    told = times if model_times is None else model_times
    return ",".join(_number(t) + ("" if float(s) == float(t) else "@" + _number(s)) for t, s in zip(times, told))


def _spacing_text(value: Any) -> Any:
    """A spacing option as text: a name, or listed times (a number or a list of them from JSON) joined by commas."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, (list, tuple, np.ndarray)):
        return format_listed(value)
    return value


def _check_spacing(instance: Any, attribute: Any, value: Any) -> None:
    who = getattr(instance, "name", type(instance).__name__)
    if value in SPACINGS:
        return
    listed = listed_grid(value)
    if listed is None:
        raise ToolkitError(f"{who}: spacing must be one of {', '.join(SPACINGS)}, or the sampling times listed "
                           f"(e.g. 999,900,640,310,86 or with network times 999@991,900@906,...), not {value!r}")
    both = np.stack(listed)
    if not (np.all(np.isfinite(both)) and both.min() >= 0 and np.all(np.diff(listed[0]) < 0)):
        raise ToolkitError(f"{who}: the listed spacing's times must be numbers >= 0, the step times in strictly "
                           f"descending order; got {value!r}")


def spacing_field(default: str) -> Any:
    """A sampler's ``spacing`` option: a named spacing (SPACINGS) or the times listed ("999,900,640,310,86")."""
    return field(default=default, converter=_spacing_text, validator=_check_spacing)


def check_steps(schedule: Schedule, steps: int) -> int:
    T = schedule.num_timesteps
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= T:
        raise ToolkitError(f"steps must be an integer in 1..{T} (the schedule's T), got {steps!r}")
    return int(steps)


def spaced_timesteps(num_timesteps: int, steps: int, spacing: str = "uniform") -> Tensor:
    """τ: ``steps`` 0-based integer timesteps, descending.

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
        raise ToolkitError(f"unknown spacing {spacing!r}; choose from {', '.join(INTEGER_SPACINGS)}")
    seq = np.unique(np.clip(seq, 0, T - 1))
    if len(seq) != S:
        raise ToolkitError(f"{spacing} spacing gives {len(seq)} distinct timesteps, not {S}")
    return torch.from_numpy(seq[::-1].copy())


# ---------------------------------------------------------------- continuous time on a discrete schedule


def log_snr_table(schedule: Schedule) -> np.ndarray:
    """λ_t = log(ᾱ_t / (1-ᾱ_t)) at t = 0..T-1, float64, strictly decreasing (``diffusion.log_snr`` as numpy)."""
    return log_snr(schedule).numpy()


def log_snr_at(schedule: Schedule, t) -> np.ndarray:
    """λ at (fractional) t in [0, T-1], linear in t between the schedule's integer times; t = -1 gives +inf."""
    lam = log_snr_table(schedule)
    t = np.asarray(t, dtype=np.float64)
    out = np.interp(np.clip(t, 0, len(lam) - 1), np.arange(len(lam)), lam)
    return np.where(t < 0, np.inf, out)


def time_of_log_snr(schedule: Schedule, lam) -> np.ndarray:
    """The fractional t whose λ (linear interpolation) equals ``lam``; the inverse of ``log_snr_at``."""
    table = log_snr_table(schedule)
    return np.interp(np.asarray(lam, dtype=np.float64), table[::-1], np.arange(len(table))[::-1].astype(np.float64))


def alpha_sigma(lam) -> tuple[np.ndarray, np.ndarray]:
    """α = √ᾱ and σ = √(1-ᾱ) from λ (λ = +inf: the clean data, α = 1, σ = 0)."""
    lam = np.asarray(lam, dtype=np.float64)
    alpha = np.sqrt(1.0 / (1.0 + np.exp(-lam)))
    sigma = np.sqrt(1.0 / (1.0 + np.exp(lam)))
    return alpha, sigma


def time_grid(schedule: Schedule, steps: int, spacing: str = "uniform") -> np.ndarray:
    """``steps`` sampling times, descending (float64; fractional for logsnr, karras and listed times).

    The integer spacings are those of ``spaced_timesteps``. logsnr: even in λ (Lu et al. 2022's
    choice for DPM-Solver); karras: σ̃ = √((1-ᾱ)/ᾱ) on Karras et al.'s ρ = 7 grid. Both lay S + 1
    points from σ̃ = min(80, σ̃_{T-1}) (Karras et al.'s σ_max: a cosine schedule's σ̃_{T-1} is 2·10⁴,
    where x̂_0 is ε's error times 2·10⁴) to t = 0 and visit the first S, as "trailing" does: no network
    call is spent at t = 0, where the data is all but clean. Their times are fractional. A listed spacing
    ("999,908.2,636.5") gives its own times. The run ends after the last time with one step to the clean
    data (t = -1).
    """
    T = schedule.num_timesteps
    steps = check_steps(schedule, steps)
    both = listed_grid(spacing)
    if both is not None:
        listed, told = both
        if len(listed) != steps:
            raise ToolkitError(f"the spacing lists {len(listed)} times but {steps} steps were asked for: ask for "
                               f"{len(listed)} steps")
        ok = np.all(np.isfinite(both)) and np.all((np.stack(both) >= 0) & (np.stack(both) <= T - 1))
        if not ok or np.any(np.diff(listed) >= 0):
            raise ToolkitError(f"the listed times must lie within [0, {T - 1}] (the schedule's t), the step times "
                               f"descending strictly; got {spacing}")
        return listed
    if spacing in INTEGER_SPACINGS:
        return spaced_timesteps(T, steps, spacing).numpy().astype(np.float64)
    lam = log_snr_table(schedule)
    lam_start = max(lam[-1], -2 * math.log(SIGMA_MAX))
    if spacing == "logsnr":
        points = np.linspace(lam_start, lam[0], steps + 1)
    elif spacing == "karras":
        s_max, s_min = math.exp(-lam_start / 2), math.exp(-lam[0] / 2)
        ramp = np.linspace(0, 1, steps + 1)
        sig = (s_max ** (1 / KARRAS_RHO) + ramp * (s_min ** (1 / KARRAS_RHO) - s_max ** (1 / KARRAS_RHO))) ** KARRAS_RHO
        points = -2 * np.log(sig)
    else:
        raise ToolkitError(f"unknown spacing {spacing!r}; choose from {', '.join(SPACINGS)}")
    t = time_of_log_snr(schedule, points[:-1])  # as "trailing": the last step goes from here to the clean data
    if steps > 1 and not bool(np.all(np.diff(t) < 0)):
        raise ToolkitError(f"{spacing} spacing does not give {steps} distinct times on this schedule")
    return t


# ---------------------------------------------------------------- the plan of one run


def _table(value: Any) -> Tensor:
    t = torch.as_tensor(np.asarray(value) if not isinstance(value, Tensor) else value)
    return t.to(torch.float64) if t.is_floating_point() else t.to(torch.long)


@define(frozen=True)
class Plan:
    """The constants of one sampling run: loop iteration i calls the model at sampling time ``t[i]``
    (fractional allowed; other calls of the same step read their times from the tables) and reads its
    coefficients from ``tables`` by i. Float tables are float64 until ``cast``.

    ``steps`` is what the user asked for; ``len(plan)`` is the number of loop iterations (a staged
    solver such as heun takes 2·steps - 1). ``draws_per_step`` standard normals of x's shape feed each
    iteration (noise [D, B, ...]); ``nfe_per_step`` network calls are made in each iteration.
    """

    t: Tensor = field(converter=_table)
    steps: int
    tables: dict[str, Tensor] = field(factory=dict, converter=lambda d: {k: _table(v) for k, v in d.items()})
    nfe_per_step: int = 1
    draws_per_step: int = 0
    schedule: Any = field(default=None, eq=False, repr=False)  # the schedule it was made for (optional)
    # the time x stands at when iteration i starts (its noise level): t itself unless the network is told
    # shifted times (a listed spacing's "t@s"); what img2img, inpainting and the ODE reference start from
    t_x: Tensor | None = field(default=None, converter=lambda v: None if v is None else _table(v))

    def __attrs_post_init__(self) -> None:
        if self.t_x is None:
            object.__setattr__(self, "t_x", self.t)
        elif self.t_x.shape != self.t.shape:
            raise ToolkitError(f"plan t_x has shape {tuple(self.t_x.shape)}, not t's {tuple(self.t.shape)}")
        n = self.t.shape[0]
        for key, value in self.tables.items():
            if value.ndim < 1 or value.shape[0] != n:
                raise ToolkitError(f"plan table {key!r} has {value.shape[0] if value.ndim else 0} rows, "
                                   f"not one per iteration ({n})")

    def __len__(self) -> int:
        return int(self.t.shape[0])

    def __getitem__(self, name: str) -> Tensor:
        return self.tables[name]

    @property
    def nfe(self) -> int:
        """Network calls of the whole run."""
        return len(self) * self.nfe_per_step

    @property
    def noise_slots(self) -> int:
        """Standard-normal draws of x's shape over the whole run, in the order the steps consume them."""
        return len(self) * self.draws_per_step

    def cast(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "Plan":
        """The same plan with float tables (and t) in ``dtype`` on ``device``: cast once, not at every step."""
        def conv(v: Tensor) -> Tensor:
            return v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)

        new = object.__new__(Plan)
        for name, value in (("t", conv(self.t)), ("steps", self.steps), ("tables", {k: conv(v) for k, v in self.tables.items()}),
                            ("nfe_per_step", self.nfe_per_step), ("draws_per_step", self.draws_per_step),
                            ("schedule", self.schedule), ("t_x", conv(self.t_x))):
            object.__setattr__(new, name, value)
        return new


def is_v2(sampler: Any) -> bool:
    return optional.has_methods(sampler, "plan", "init_state", "step")


def as_v2(sampler: Any) -> Sampler:
    """The sampler itself (plugin API 2), or a version-1 sampler behind ``V1Adapter``."""
    if is_v2(sampler):
        return sampler
    if optional.has_methods(sampler, "timesteps", "step"):
        return V1Adapter(sampler)
    raise ToolkitError(f"{optional.name(sampler)!r} is not a sampler: it has neither "
                       "plan/init_state/step (plugin API 2) nor timesteps/step (plugin API 1)")


def sampler_plan(sampler: Any, schedule: Schedule, steps: int) -> Plan:
    return as_v2(sampler).plan(schedule, steps)


def run_plan(sampler: Sampler, model_fn: ModelFn, plan: Plan, x_T: Tensor, *, noise_fn: NoiseFn | None = None,
             progress: Callable[[int], None] | None = None) -> Tensor:
    """The one sampling loop: state from ``init_state``, then ``step`` for i = 0..len(plan)-1.

    ``noise_fn(i)`` returns iteration i's draws [draws_per_step, B, ...]; it is called only when the
    plan draws noise, once per iteration, in order (the exported graph consumes the same slots).
    """
    plan = plan.cast(x_T.dtype, x_T.device)
    D = plan.draws_per_step
    name = optional.name(sampler)
    if D and noise_fn is None:
        raise ToolkitError(f"sampler {name!r} draws noise: give a noise_fn")
    x = x_T
    state = tuple(sampler.init_state(x_T, plan))
    for i in range(len(plan)):
        noise = None
        if D:
            noise = noise_fn(i)
            if tuple(noise.shape) != (D, *x.shape):
                raise ToolkitError(f"noise_fn({i}) returned shape {tuple(noise.shape)}, expected {(D, *x.shape)}")
        try:
            result = sampler.step(model_fn, x, state, torch.tensor(i), plan, noise)
        except ToolkitError:
            raise
        except Exception as exc:  # noqa: BLE001 - a plugin's step: name it and the step, not a traceback
            raise ToolkitError(f"sampler {name!r} failed in step {i}: {type(exc).__name__}: {exc}") from exc
        if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], Tensor)):
            raise ToolkitError(f"sampler {name!r}: step must return (x, state), got {type(result).__name__}")
        x, state = result[0], tuple(result[1])
        if x.shape != x_T.shape or x.dtype != x_T.dtype:
            raise ToolkitError(f"sampler {name!r}: step {i} returned x of shape {tuple(x.shape)} and {x.dtype}, "
                               f"expected {tuple(x_T.shape)} and {x_T.dtype}")
        if progress is not None:
            progress(1)
    return x


def stream_noise_fn(draw: Callable[[], Tensor], draws_per_step: int) -> NoiseFn:
    """noise_fn over a per-sample stream: iteration i takes the next ``draws_per_step`` draws."""
    return lambda i: torch.stack([draw() for _ in range(draws_per_step)])


# ---------------------------------------------------------------- plugin API 1


def sample_loop(
    sampler: SamplerV1,
    model_fn: ModelFn,
    schedule: Schedule,
    x_T: Tensor,
    *,
    steps: int,
    noise_fn: Callable[[int], Tensor],
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    """The standard loop of plugin API 1 (kept for version-1 plugins): at each τ_i call the model, then
    the sampler's ``step`` (no noise after the last step)."""
    ts = sampler.timesteps(schedule, steps).tolist()
    x = x_T
    B = x.shape[0]
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        tt = torch.full((B,), t, dtype=torch.long, device=x.device)
        tp = torch.full((B,), t_prev, dtype=torch.long, device=x.device)
        out = model_fn(x, tt)
        noise = noise_fn(i) if optional.stochastic(sampler) and t_prev >= 0 else None
        x = sampler.step(out, x, tt, tp, schedule, noise)
        if progress is not None:
            progress(1)
    return x


class V1Adapter:
    """A version-1 sampler (``timesteps`` + ``step(out, x_t, t, t_prev, schedule, noise)``) as a v2 one:
    one model call per step at integer t, the noise of step i in slot i (none after the last step)."""

    def __init__(self, sampler: SamplerV1):
        self.base = sampler
        self.name = sampler.name

    def plan(self, schedule: Schedule, steps: int) -> Plan:
        ts = self.base.timesteps(schedule, steps).to(torch.long)
        prev = torch.cat([ts[1:], torch.tensor([-1])])
        return Plan(t=ts.double(), steps=int(steps), tables={"t": ts, "t_prev": prev},
                    draws_per_step=1 if optional.stochastic(self.base) else 0, schedule=schedule)

    def init_state(self, x_T: Tensor, plan: Plan) -> tuple[Tensor, ...]:
        return ()

    def step(self, model_fn: ModelFn, x: Tensor, state: tuple, i: Tensor, plan: Plan, noise: Tensor | None):
        B = x.shape[0]
        t, t_prev = plan["t"][i].expand(B), plan["t_prev"][i].expand(B)
        out = model_fn(x, t)
        z = None
        if noise is not None:
            z = noise[0] * (plan["t_prev"][i] >= 0).to(noise.dtype)
        return self.base.step(out, x, t, t_prev, plan.schedule, z), ()


def check_standard_loop(sampler: SamplerV1, schedule: Schedule, steps: int, shape: tuple[int, ...]) -> None:
    """Refuse a version-1 sampler whose own ``sample`` is not the standard loop (the exporter could not see it)."""
    if not optional.has_methods(sampler, "sample"):
        return
    name = optional.name(sampler)

    def model(x: Tensor, t: Tensor) -> Tensor:
        return torch.tanh(0.5 * x + t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))) / schedule.num_timesteps)

    streams = NoiseStreams(7919, range(2), shape)
    x_T = streams.draw()
    try:
        theirs = sampler.sample(model, schedule, x_T, steps=steps, noise_fn=lambda i: streams.draw())
    except Exception as exc:  # noqa: BLE001
        raise ToolkitError(f"sampler {name!r} (plugin API 1) cannot be exported: its sample() failed on a probe "
                           f"({exc})") from exc
    streams = NoiseStreams(7919, range(2), shape)
    x_T = streams.draw()
    adapter = V1Adapter(sampler)
    plan = adapter.plan(schedule, steps)
    ours = run_plan(adapter, model, plan, x_T, noise_fn=stream_noise_fn(streams.draw, plan.draws_per_step))
    if theirs.shape != ours.shape or not torch.allclose(theirs, ours, atol=1e-5, rtol=1e-5):
        raise ToolkitError(f"sampler {name!r} (plugin API 1) has its own sample() loop, which the exporter cannot "
                           "reproduce (its graph would run a different sampler); port it to plugin API 2 "
                           "(plan, init_state, step) to export it")


# ---------------------------------------------------------------- classifier guidance on the mean


class MeanShifted:
    """A sampler whose step adds Σ·g to the mean: x_{t-1} ~ N(μ + Σ·s∇log p(y|x_t), Σ) (Dhariwal & Nichol, Algorithm 1).

    ``gradient_fn(x_t, t) -> s∇log p(y|x_t)``; Σ comes from the wrapped sampler's
    ``log_variance(out, x, i, plan)``. The wrapped sampler does not know it is guided.
    """

    def __init__(self, base: Sampler, gradient_fn: Callable[[Tensor, Tensor], Tensor]):
        self.base = base
        self.gradient_fn = gradient_fn
        self.name = base.name

    def plan(self, schedule: Schedule, steps: int) -> Plan:
        return self.base.plan(schedule, steps)

    def init_state(self, x_T: Tensor, plan: Plan) -> tuple[Tensor, ...]:
        return tuple(self.base.init_state(x_T, plan))

    def step(self, model_fn: ModelFn, x: Tensor, state: tuple, i: Tensor, plan: Plan, noise: Tensor | None):
        seen: list[Tensor] = []

        def fn(x_t: Tensor, t: Tensor) -> Tensor:
            out = model_fn(x_t, t)
            seen.append(out)
            return out

        x_prev, state = self.base.step(fn, x, state, i, plan, noise)
        variance = torch.exp(self.base.log_variance(seen[0], x, i, plan))
        return x_prev + variance * self.gradient_fn(x, plan.t_x[i].expand(x.shape[0])), state


# ---------------------------------------------------------------- helpers for writing samplers


@define(frozen=True)
class Grid:
    """A run's times with their log-SNR λ, α = √ᾱ and σ = √(1-ᾱ), each [S + 1] float64: the S times a
    sampler visits, then the clean end (t = -1: λ = +inf, α = 1, σ = 0)."""

    t: np.ndarray
    lam: np.ndarray
    alpha: np.ndarray
    sigma: np.ndarray
    model_t: np.ndarray  # the times the network is told: t, or a listed spacing's network times ("t@s")

    @property
    def steps(self) -> int:
        return len(self.t) - 1


def grid(schedule: Schedule, steps: int, spacing: str) -> Grid:
    """The ``time_grid`` of ``spacing`` with the end appended, each time's λ, α, σ (float64), and the
    times the network is called at (``model_t``: t itself unless the spacing lists shifted calls).

    At integer t, α² and σ² are the schedule's ᾱ_t and 1 - ᾱ_t exactly (not interpolated).
    """
    t = np.append(time_grid(schedule, steps, spacing), -1.0)
    a = schedule.alphas_cumprod.detach().cpu().double().numpy()
    lam = log_snr_at(schedule, t)
    alpha, sigma = alpha_sigma(lam)
    whole = (t >= 0) & (t == np.round(t))
    idx = t[whole].astype(np.int64)
    alpha[whole], sigma[whole] = np.sqrt(a[idx]), np.sqrt(1 - a[idx])
    listed = listed_grid(spacing)
    model_t = t if listed is None else np.append(listed[1], -1.0)
    return Grid(t=t, lam=lam, alpha=alpha, sigma=sigma, model_t=model_t)


def split_output(out: Tensor, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """ε and, for a learned-variance model (2C channels), the raw variance output v."""
    C = x.shape[1]
    if out.shape[1] == C:
        return out, None
    if out.shape[1] == 2 * C:
        return out[:, :C], out[:, C:]
    raise ToolkitError(f"model output has {out.shape[1]} channels; expected {C} or {2 * C}")


def abs_quantile(x: Tensor, p: float) -> Tensor:
    """The p-quantile of |x| over each sample's values, [B] (torch.quantile's linear interpolation), from one TopK:
    traceable and exportable, the number of values being fixed by the shape."""
    flat = x.abs().flatten(1)
    D = flat.shape[1]
    q = p * (D - 1)
    lo = min(int(math.floor(q)), D - 1)
    frac = q - lo
    top = torch.topk(flat, D - lo, dim=1).values  # descending: ascending index j is top[:, D - 1 - j]
    below = top[:, D - 1 - lo]
    above = top[:, max(D - 2 - lo, 0)]
    return below * (1 - frac) + above * frac


def guard_x0(x0: Tensor, clip: bool, threshold: float = 0.0, clip_range: float = 1.0) -> Tensor:
    """x̂_0 kept in the data's range ±r (r = ``clip_range``, 1 for pixels in [-1, 1]): dynamic thresholding
    (Saharia et al. 2022) when ``threshold`` = p > 0, s = max(p-quantile of |x̂_0|, r) per sample and
    x̂_0 ← clip(x̂_0, −s, s)·r/s, else a static clip to ±r when ``clip``, else unchanged."""
    if threshold > 0:
        s = abs_quantile(x0, threshold).clamp(min=clip_range).reshape(-1, *([1] * (x0.ndim - 1)))
        return torch.maximum(torch.minimum(x0, s), -s) * (clip_range / s)
    if clip:
        return x0.clamp(-clip_range, clip_range)
    return x0


def x0_and_eps(x: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor, clip: bool, threshold: float = 0.0,
               clip_range: float = 1.0) -> tuple[Tensor, Tensor]:
    """x̂_0 = (x - σ ε)/α (Ho et al. eq. 4 inverted); guarded (``guard_x0``: clipped to ±r, or dynamically
    thresholded) with ε re-derived from it (guided-diffusion), so every solver sees a consistent pair."""
    x0 = (x - sigma * eps) / alpha
    if clip or threshold > 0:
        x0 = guard_x0(x0, clip, threshold, clip_range)
        eps = (x - alpha * x0) / sigma
    return x0, eps
