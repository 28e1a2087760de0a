"""Built-in fast solvers, plugin API 2: dpmpp-2m, unipc, heun and euler-a.

Each is a linear combination of x, the model's x̂_0 / ε and its carried state, with coefficients
computed once per run in float64 (``plan``): the step reads them by index, so the torch loop and the
exported ONNX Loop run the same arithmetic. α = √ᾱ, σ = √(1-ᾱ), λ = log(α/σ); σ̃ = σ/α is the noise
level of the variance-exploding form x̃ = x/α used by Karras et al. and k-diffusion.
"""

from __future__ import annotations

import numpy as np
import torch
from attrs import define, field
from torch import Tensor

from toolkit.errors import ToolkitError
from toolkit.hookspecs import hookimpl
from toolkit.protocols import ModelFn, Schedule
from toolkit.plugins.samplers import choice, clip_range_field, flag, threshold_field, unit_interval
from toolkit.sampling import Plan, check_steps, grid, spacing_field, split_output, x0_and_eps


def _model_x0_eps(sampler, model_fn: ModelFn, x: Tensor, i: Tensor, plan: Plan) -> tuple[Tensor, Tensor]:
    eps, _ = split_output(model_fn(x, plan.t[i]), x)
    return x0_and_eps(x, eps, plan["alpha"][i], plan["sigma"][i], sampler.clip_x0, sampler.threshold,
                      sampler.clip_range)


def _check_order(sampler, schedule: Schedule, steps: int) -> int:
    """Multistep solvers: order k needs k+1 steps to take a single k-th order step."""
    need = 1 if sampler.order == 1 else sampler.order + 1
    if isinstance(steps, int) and not isinstance(steps, bool) and 1 <= steps < need:
        raise ToolkitError(f"{sampler.name} of order {sampler.order} needs at least {need} steps, got {steps} "
                           f"(use more steps or order=1)")
    return check_steps(schedule, steps)


@define(frozen=True)
class DPMSolverPP2M:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2; k-diffusion's sample_dpmpp_2m), in x̂_0 form:

    x_{k+1} = (σ_{k+1}/σ_k) x_k − α_{k+1}(e^{−h} − 1) D_k,  h = λ_{k+1} − λ_k,
    D_k = (1 + 1/(2r)) x̂_0(k) − 1/(2r) x̂_0(k−1),  r = h_{k−1}/h_k;
    first order (D = x̂_0, which is DDIM) at the first step and into the clean end. State: (x̂_0(k−1),).
    """

    order: int = field(default=2, converter=int, validator=choice(1, 2))
    clip_x0: bool = field(default=True, converter=flag)
    threshold: float = threshold_field()
    clip_range: float = clip_range_field()
    spacing: str = spacing_field("logsnr")
    default_steps: int | None = 20
    name: str = field(default="dpmpp-2m", init=False)

    def plan(self, schedule: Schedule, steps: int) -> Plan:
        g = grid(schedule, _check_order(self, schedule, steps), self.spacing)
        S, al, si, lam = g.steps, g.alpha, g.sigma, g.lam  # only ratios of h enter: log-SNR or log(α/σ) alike
        w0, w1 = np.ones(S), np.zeros(S)
        for k in range(1, S):
            if g.t[k + 1] >= 0 and self.order == 2:
                r = (lam[k] - lam[k - 1]) / (lam[k + 1] - lam[k])
                w0[k], w1[k] = 1 + 1 / (2 * r), -1 / (2 * r)
        return Plan(t=g.model_t[:-1], t_x=g.t[:-1], steps=S, tables={
            "alpha": al[:-1], "sigma": si[:-1],
            "c_x": si[1:] / si[:-1],
            "c_d": al[1:] - si[1:] * al[:-1] / si[:-1],  # = −α_{k+1}(e^{−h} − 1), finite at the end
            "w0": w0, "w1": w1})

    def init_state(self, x_T: Tensor, plan: Plan) -> tuple[Tensor, ...]:
        return (torch.zeros_like(x_T),)

    def step(self, model_fn: ModelFn, x: Tensor, state: tuple, i: Tensor, plan: Plan, noise: Tensor | None):
        (x0_prev,) = state
        x0, _ = _model_x0_eps(self, model_fn, x, i, plan)
        d = plan["w0"][i] * x0 + plan["w1"][i] * x0_prev
        return plan["c_x"][i] * x + plan["c_d"][i] * d, (x0,)


def _unipc_B(h: float, variant: str) -> float:
    """B(h) of UniPC (x̂_0 form, hh = −h): bh1 B = hh, bh2 B = e^{hh} − 1 (Zhao et al. 2023, §3.2)."""
    return -h if variant == "bh1" else float(np.expm1(-h))


def _unipc_rhos_c(rk: float, h: float, variant: str = "bh2") -> np.ndarray:
    """ρ of the order-2 UniC corrector (Zhao et al. 2023, x̂_0 form)."""
    hh = -h
    h_phi_1 = np.expm1(hh)
    B_h = _unipc_B(h, variant)
    h_phi_2 = h_phi_1 / hh - 1
    h_phi_3 = h_phi_2 / hh - 1 / 2
    R = np.array([[1.0, 1.0], [rk, 1.0]])
    b = np.array([h_phi_2 * 1 / B_h, h_phi_3 * 2 / B_h])
    return np.linalg.solve(R, b)


@define(frozen=True)
class UniPC:
    """UniPC (Zhao et al. 2023), x̂_0 form, order 2 (as diffusers' UniPCMultistepScheduler); ``variant``
    bh2 (B(h) = e^{−h} − 1, the default) or bh1 (B(h) = −h, the paper's choice for unconditional sampling
    with few steps).

    Each iteration calls the model once at the predicted x_k, corrects x_k with that call (UniC, free:
    the call is reused by the next predictor), then predicts x_{k+1} (UniP). First order at the first
    step and into the clean end. State: (corrected x_{k−1}, x̂_0(k−1), x̂_0(k−2)).
    """

    order: int = field(default=2, converter=int, validator=choice(1, 2))
    clip_x0: bool = field(default=True, converter=flag)
    threshold: float = threshold_field()
    clip_range: float = clip_range_field()
    spacing: str = spacing_field("logsnr")
    default_steps: int | None = 10
    variant: str = field(default="bh2", validator=choice("bh1", "bh2"))
    # its corrector rebuilds x_k from its own history, so an x changed between steps (inpainting) would be lost
    rebuilds_x_from_history = True
    name: str = field(default="unipc", init=False)

    def plan(self, schedule: Schedule, steps: int) -> Plan:
        g = grid(schedule, _check_order(self, schedule, steps), self.spacing)
        S, al, si, lam = g.steps, g.alpha, g.sigma, g.lam / 2  # UniPC's λ = log(α/σ), half the log-SNR
        z = lambda: np.zeros(S)  # noqa: E731
        cc_self, cc_xl, cc_ml, cc_mp, cc_m = z(), z(), z(), z(), z()
        pp_x, pp_m, pp_ml = z(), z(), z()
        cc_self[0] = 1.0
        p_order = [1 if (k == 0 or g.t[k + 1] < 0 or self.order == 1) else 2 for k in range(S)]
        for k in range(1, S):  # UniC: corrects x_k with the call at x_k, using the step k−1 → k
            h = lam[k] - lam[k - 1]
            h_phi_1 = np.expm1(-h)
            K = al[k] * _unipc_B(h, self.variant)  # α_k·B(h)
            cc_xl[k] = si[k] / si[k - 1]
            base_m = -al[k] * h_phi_1
            if p_order[k - 1] == 1:  # ρ = 1/2
                cc_m[k], cc_ml[k] = -K * 0.5, base_m + K * 0.5
            else:
                rk = (lam[k - 2] - lam[k - 1]) / h
                rho = _unipc_rhos_c(rk, h, self.variant)  # x_c = base − K(ρ0·D1 + ρ1·(m − m_last)), D1 = (m_prev − m_last)/rk
                cc_m[k] = -K * rho[1]
                cc_ml[k] = base_m + K * rho[0] / rk + K * rho[1]
                cc_mp[k] = -K * rho[0] / rk
        for k in range(S):  # UniP: x_{k+1} from the corrected x_k
            pp_x[k] = si[k + 1] / si[k]
            pp_m[k] = al[k + 1] - si[k + 1] * al[k] / si[k]  # = −α_{k+1}(e^{−h} − 1)
            if p_order[k] == 2:
                h = lam[k + 1] - lam[k]
                rk = (lam[k - 1] - lam[k]) / h
                c = al[k + 1] * _unipc_B(h, self.variant) * 0.5 / rk  # − α B(h)·½·D1, D1 = (m_last − m)/rk
                pp_m[k] += c
                pp_ml[k] = -c
        return Plan(t=g.model_t[:-1], t_x=g.t[:-1], steps=S, tables={
            "alpha": al[:-1], "sigma": si[:-1], "cc_self": cc_self, "cc_xl": cc_xl, "cc_ml": cc_ml, "cc_mp": cc_mp,
            "cc_m": cc_m, "pp_x": pp_x, "pp_m": pp_m, "pp_ml": pp_ml})

    def init_state(self, x_T: Tensor, plan: Plan) -> tuple[Tensor, ...]:
        return (torch.zeros_like(x_T), torch.zeros_like(x_T), torch.zeros_like(x_T))

    def step(self, model_fn: ModelFn, x: Tensor, state: tuple, i: Tensor, plan: Plan, noise: Tensor | None):
        x_last, m_last, m_prev = state
        m, _ = _model_x0_eps(self, model_fn, x, i, plan)
        x_c = (plan["cc_self"][i] * x + plan["cc_xl"][i] * x_last + plan["cc_ml"][i] * m_last
               + plan["cc_mp"][i] * m_prev + plan["cc_m"][i] * m)
        x_next = plan["pp_x"][i] * x_c + plan["pp_m"][i] * m + plan["pp_ml"][i] * m_last
        return x_next, (x_c, m, m_last)


@define(frozen=True)
class Heun:
    """Heun's method on the probability-flow ODE dx̃/dσ̃ = ε (Karras et al. 2022, Algorithm 1, deterministic).

    Staged: each loop iteration makes one network call — an Euler stage to σ̃_{k+1}, then a
    trapezoidal correction at σ̃_{k+1} — so S steps take 2S − 1 calls (no correction into σ̃ = 0).
    State: (x̂_0, ε) of the last Euler stage.
    """

    clip_x0: bool = field(default=True, converter=flag)
    threshold: float = threshold_field()
    clip_range: float = clip_range_field()
    spacing: str = spacing_field("karras")
    default_steps: int | None = 10
    name: str = field(default="heun", init=False)
    iterations_per_step = 2  # Euler stage + correction: inpainting's resampling blocks must start at a step

    def plan(self, schedule: Schedule, steps: int) -> Plan:
        g = grid(schedule, check_steps(schedule, steps), self.spacing)
        al, si = g.alpha, g.sigma
        st = si / al  # σ̃
        rows = []  # (t, α, σ, a0, ae, b0, be, keep, t_x): out = a0·x̂_0 + ae·ε + b0·x̂_0(k) + be·ε_k
        for k in range(g.steps):
            # Euler: x̃' = x̃_k + Δσ̃·ε = x̂_0 + σ̃_{k+1}ε (written with x̂_0, so a huge σ̃_k cancels exactly)
            rows.append((g.model_t[k], al[k], si[k], al[k + 1], si[k + 1], 0.0, 0.0, 1.0, g.t[k]))
            if g.t[k + 1] >= 0:  # x̃_{k+1} = x̃_k + Δσ̃·(ε_k + ε')/2
                half = al[k + 1] * (st[k + 1] - st[k]) / 2
                rows.append((g.model_t[k + 1], al[k + 1], si[k + 1], 0.0, half, al[k + 1],
                             al[k + 1] * (st[k] + st[k + 1]) / 2, 0.0, g.t[k + 1]))
        cols = np.array(rows, dtype=np.float64).T
        names = ("alpha", "sigma", "a0", "ae", "b0", "be", "keep")
        return Plan(t=cols[0], t_x=cols[-1], steps=g.steps, tables=dict(zip(names, cols[1:-1])))

    def init_state(self, x_T: Tensor, plan: Plan) -> tuple[Tensor, ...]:
        return (torch.zeros_like(x_T), torch.zeros_like(x_T))

    def step(self, model_fn: ModelFn, x: Tensor, state: tuple, i: Tensor, plan: Plan, noise: Tensor | None):
        base_x0, base_e = state
        x0, eps = _model_x0_eps(self, model_fn, x, i, plan)
        out = plan["a0"][i] * x0 + plan["ae"][i] * eps + plan["b0"][i] * base_x0 + plan["be"][i] * base_e
        keep = plan["keep"][i]
        return out, (keep * x0 + (1 - keep) * base_x0, keep * eps + (1 - keep) * base_e)


@define(frozen=True)
class EulerAncestral:
    """Euler ancestral (k-diffusion's sample_euler_ancestral): an Euler step down to σ̃_down, then fresh
    noise σ̃_up, with σ̃_up = min(σ̃', η·σ̃'·√(σ̃² − σ̃'²)/σ̃) and σ̃_down = √(σ̃'² − σ̃_up²); one draw per step."""

    eta: float = field(default=1.0, converter=float, validator=unit_interval)
    clip_x0: bool = field(default=True, converter=flag)
    threshold: float = threshold_field()
    clip_range: float = clip_range_field()
    spacing: str = spacing_field("karras")
    default_steps: int | None = 30
    name: str = field(default="euler-a", init=False)

    def plan(self, schedule: Schedule, steps: int) -> Plan:
        g = grid(schedule, check_steps(schedule, steps), self.spacing)
        al, si = g.alpha, g.sigma
        st = si / al
        s, s_to = st[:-1], st[1:]
        up = np.minimum(s_to, self.eta * np.sqrt(np.clip(s_to**2 * (s**2 - s_to**2) / s**2, 0, None)))
        down = np.sqrt(np.clip(s_to**2 - up**2, 0, None))
        # x̃' = x̃ + (σ̃_down − σ̃)ε + σ̃_up z = x̂_0 + σ̃_down ε + σ̃_up z, then x = α' x̃'
        return Plan(t=g.model_t[:-1], t_x=g.t[:-1], steps=g.steps, draws_per_step=1 if self.eta > 0 else 0, tables={
            "alpha": al[:-1], "sigma": si[:-1], "c_0": al[1:], "c_e": al[1:] * down, "c_z": al[1:] * up})

    def init_state(self, x_T: Tensor, plan: Plan) -> tuple[Tensor, ...]:
        return ()

    def step(self, model_fn: ModelFn, x: Tensor, state: tuple, i: Tensor, plan: Plan, noise: Tensor | None):
        x0, eps = _model_x0_eps(self, model_fn, x, i, plan)
        out = plan["c_0"][i] * x0 + plan["c_e"][i] * eps
        if noise is not None:
            out = out + plan["c_z"][i] * noise[0]
        return out, ()


@hookimpl
def register_samplers(register):
    register("dpmpp-2m", DPMSolverPP2M, aliases=("dpm++2m", "dpmsolver++"))
    register("unipc", UniPC)
    register("heun", Heun)
    register("euler-a", EulerAncestral, aliases=("euler-ancestral",))
