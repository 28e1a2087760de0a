"""A time grid tuned to one model: the step times, and the times the network is told, that bring a
deterministic sampler's few-step output closest to the exact probability-flow ODE solution.

Few-step quality is decided by where the steps fall (Sabour et al. 2024, "Align Your Steps"; Chen et al.
2024, GITS) and is helped by telling the network a slightly shifted time (Li et al. 2024, the time-shift
sampler). ``tune_grid`` searches both by coordinate descent on the RMS distance to a many-step DPM-Solver++
solution from the same x_T (``evaluate.ode_reference``); the result is a listed spacing
("999,908.2@914.6,...") that any sampler with a ``spacing`` option takes, exports and evaluates.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np
import torch
from attrs import define

from toolkit import optional
from toolkit.errors import ToolkitError


@define(frozen=True)
class TunedGrid:
    """A tuned grid: ``spacing`` is the listed spacing to give the sampler (``--spacing``)."""

    sampler: str
    steps: int
    spacing: str
    start_spacing: str
    error: float  # RMS distance to the ODE reference on the tuning noise, tuned grid
    start_error: float  # the same on the sampler's own grid
    n: int
    seed: int
    reference_nfe: int


def listed_spacing(times: np.ndarray, model_times: np.ndarray) -> str:
    """"999,908.2@914.6,...": step times and the network's times, to one decimal."""
    from toolkit.sampling import format_listed

    return format_listed(np.round(times, 1), np.round(model_times, 1))


@torch.no_grad()
def tune_grid(model: str | os.PathLike | None = None, sampler: str = "unipc", steps: int | None = 5, *,
              schedule: str | None = None, num_timesteps: int | None = None, guidance: str | None = None,
              guidance_options: dict[str, Any] | None = None, n: int = 256, seed: int = 1000, sweeps: int = 8,
              shift: bool = True, reference_nfe: int = 500, device: str | torch.device = "cpu",
              on_sweep: Callable[[int, float], None] | None = None, **sampler_options: Any) -> TunedGrid:
    """Tune ``sampler``'s grid of ``steps`` steps on ``model`` (coordinate descent, ``sweeps`` passes);
    the pipeline is composed as ``compose`` does, ``sampler_options`` (spacing: the grid to start from) included
    (steps None: compose's default, the length of a listed spacing).

    The first time stays where the sampler's own spacing starts; each later step time moves in log-SNR
    between its neighbours, and with ``shift`` each network time moves around its step time. The error is
    measured on n draws of x_T from ``seed`` (keep it apart from the seeds you evaluate with).
    """
    from toolkit.evaluate import ode_reference, rms_distance
    from toolkit.noise import NoiseStreams
    from toolkit.pipeline import compose
    from toolkit.registry import create, option_names
    from toolkit.sampling import as_v2, listed_grid, log_snr_at, run_plan, time_grid, time_of_log_snr

    if n < 1 or sweeps < 0 or reference_nfe < 2:
        raise ToolkitError(f"-n must be positive, --sweeps >= 0 and the reference NFE >= 2; got {n}, {sweeps}, "
                           f"{reference_nfe}")
    options = dict(sampler_options)
    takes = option_names("sampler", sampler)
    if takes is not None and "spacing" not in takes:
        raise ToolkitError(f"sampler {sampler!r} takes no spacing option, so its grid cannot be tuned")
    pipe = compose(schedule=schedule, sampler=sampler, guidance=guidance, model=model, steps=steps,
                   num_timesteps=num_timesteps, guidance_options=guidance_options, device=device, **options)
    base = as_v2(pipe.sampler)
    plan = base.plan(pipe.schedule, pipe.steps)
    if plan.draws_per_step or pipe.mean_shift or optional.stochastic(pipe.sampler):
        raise ToolkitError(f"tune-grid tunes deterministic samplers against the ODE solution; {sampler!r} as "
                           "configured draws noise (or is classifier-guided on the mean): use a deterministic one")
    sched, S, T = pipe.schedule, pipe.steps, pipe.schedule.num_timesteps
    spacing = optional.option(pipe.sampler, "spacing", "uniform")
    times = time_grid(sched, S, spacing)
    listed = listed_grid(spacing)
    shifts = np.zeros(S) if listed is None else listed[1] - listed[0]
    K = pipe.num_classes
    labels = None if K is None else (torch.arange(n) % K).to(pipe.device)
    x_T = NoiseStreams(seed, range(n), pipe.sample_shape, pipe.device).draw()
    clip = optional.clip_x0(pipe.sampler)
    times = np.round(times, 1)  # the grid as it will be printed, from the first time on
    reference = ode_reference(pipe, x_T, labels, float(times[0]), clip, reference_nfe)
    fn = pipe.model_fn(labels)

    def error(t: np.ndarray, s: np.ndarray) -> float:
        text = listed_spacing(t, np.clip(t + s, 0, T - 1))
        smp = as_v2(create("sampler", sampler, **{**options, "spacing": text}))
        x = run_plan(smp, fn, smp.plan(sched, S), x_T)
        return rms_distance(x, reference)

    def valid(t: np.ndarray) -> bool:
        r = np.round(t, 1)
        return bool(np.all(np.diff(r) < 0) and r[-1] >= 0)

    start = listed_spacing(times, np.clip(times + shifts, 0, T - 1))
    best = start_error = error(times, shifts)
    lam_end = float(log_snr_at(sched, 0.0))
    lam = log_snr_at(sched, times)
    lam_step, shift_step = 1.0, 0.04 * T
    for sweep in range(sweeps):
        for k in range(S):
            if k > 0:  # the step time, in λ between its neighbours
                hi = lam[k + 1] if k + 1 < S else lam_end
                for c in np.linspace(max(lam[k - 1], lam[k] - lam_step), min(hi, lam[k] + lam_step), 9)[1:-1]:
                    trial = times.copy()
                    trial[k] = np.round(time_of_log_snr(sched, c), 1)
                    if valid(trial) and trial[k] != times[k] and (e := error(trial, shifts)) < best:
                        best, times, lam = e, trial, log_snr_at(sched, trial)
            if shift:  # the network's time around it
                for c in np.linspace(-shift_step, shift_step, 9):
                    trial = shifts.copy()
                    trial[k] = np.round(trial[k] + c, 1)
                    if c != 0 and (e := error(times, trial)) < best:
                        best, shifts = e, trial
        lam_step, shift_step = lam_step * 0.6, shift_step * 0.6
        if on_sweep is not None:
            on_sweep(sweep, best)
    return TunedGrid(sampler=sampler, steps=S, spacing=listed_spacing(times, np.clip(times + shifts, 0, T - 1)),
                     start_spacing=start, error=best, start_error=start_error, n=n, seed=seed,
                     reference_nfe=reference_nfe)
