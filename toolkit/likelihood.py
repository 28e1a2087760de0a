"""The exact log-likelihood of the probability-flow ODE (Song et al. 2021, §4.3 and Appendix D.2): log p_0(x) =
log p_T(x_T) + ∫ ∇·f dt along the ODE from the data to the prior, with the divergence exact (every Jacobian
diagonal entry) or estimated by Hutchinson's trace estimator (one Rademacher probe per point, fixed along the path).

The ODE is written in x̃ = x/α and s = log σ̃ (σ̃ = σ/α): dx̃/ds = σ̃ ε_θ(α x̃, t(s)), whose divergence in x̃ is
σ̃ α tr(∂ε_θ/∂x) = σ tr(∂ε_θ/∂x). It runs from the smallest noise level of the schedule (t = 0, where x̃ is the
data) to σ̃_max = min(80, σ̃_{T-1}) (Karras et al.'s σ_max, as the samplers start), where x = α x̃ ~ N(0, I);
fourth-order Runge-Kutta, even in s.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
from attrs import asdict, define
from torch import Tensor

from toolkit.errors import ToolkitError
from toolkit.protocols import ModelFn, Schedule

TRACES = ("exact", "hutchinson")
DEFAULT_STEPS = 50  # RK4 steps: 200 evaluations of ε and its divergence
EXACT_CHUNK = 4096  # rows of the replicated batch the exact trace differentiates at once


def log_sigma_range(schedule: Schedule, sigma_max: float | None = None) -> tuple[float, float]:
    """s = log σ̃ at t = 0 and at the start of the ODE (min(σ_max, σ̃_{T-1}), σ_max = 80 by default)."""
    from toolkit.sampling import SIGMA_MAX, log_snr_table

    lam = log_snr_table(schedule)
    top = -lam[-1] / 2
    limit = math.log(SIGMA_MAX if sigma_max is None else sigma_max)
    return float(-lam[0] / 2), float(min(top, limit))


def _time_of_s(schedule: Schedule, s: np.ndarray) -> np.ndarray:
    from toolkit.sampling import time_of_log_snr

    return time_of_log_snr(schedule, -2 * np.asarray(s, dtype=np.float64))


def _divergence(eps_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: Tensor, trace: str,
                probe: Tensor | None) -> tuple[Tensor, Tensor]:
    """ε_θ(x, t) [B, ...] and tr(∂ε_θ/∂x) [B]: exact (the batch replicated once per dimension, one backward
    pass per chunk) or v·(∂ε/∂x)ᵀv with the Rademacher probe v."""
    B, d = x.shape[0], x[0].numel()
    with torch.enable_grad():
        if trace == "hutchinson":
            xg = x.detach().requires_grad_(True)
            eps = eps_fn(xg, t)
            (g,) = torch.autograd.grad((eps * probe).sum(), xg)
            return eps.detach(), (g * probe).flatten(1).sum(1).double()
        eps = eps_fn(x.detach(), t).detach()
        tr = torch.zeros(B, dtype=torch.float64, device=x.device)
        dims_per_chunk = max(1, EXACT_CHUNK // B)
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        for j0 in range(0, d, dims_per_chunk):
            j1 = min(d, j0 + dims_per_chunk)
            k = j1 - j0
            xr = x.detach().repeat(k, *([1] * (x.ndim - 1))).requires_grad_(True)  # [k·B, ...]: copy j for dim j0+j
            out = eps_fn(xr, t.repeat(k) if t.ndim else t)
            basis = eye[j0:j1].repeat_interleave(B, dim=0).reshape(out.shape)
            (g,) = torch.autograd.grad((out * basis).sum(), xr)
            tr += (g * basis).flatten(1).sum(1).reshape(k, B).sum(0).double()
        return eps, tr


def ode_log_likelihood(eps_fn: Callable[[Tensor, Tensor], Tensor], schedule: Schedule, x: Tensor, *,
                       steps: int = DEFAULT_STEPS, trace: str = "hutchinson", probe: Tensor | None = None,
                       sigma_max: float | None = None, progress: Callable[[int], None] | None = None) -> Tensor:
    """log p(x) [B] in nats under the probability-flow ODE of ``eps_fn(x_t, t) -> ε`` (t fractional, the
    schedule's time); ``probe``: Hutchinson's v [B, ...] (default: Rademacher from a fixed generator)."""
    if trace not in TRACES:
        raise ToolkitError(f"trace must be one of {', '.join(TRACES)}, got {trace!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ToolkitError(f"ODE steps must be a positive integer, got {steps!r}")
    if trace == "hutchinson" and probe is None:
        g = torch.Generator().manual_seed(0)
        probe = (torch.randint(0, 2, x.shape, generator=g) * 2 - 1).to(x.device, x.dtype)
    B, d = x.shape[0], x[0].numel()
    s0, s1 = log_sigma_range(schedule, sigma_max)
    h = (s1 - s0) / steps
    s_all = s0 + h * np.arange(2 * steps + 1) / 2  # the RK4 nodes: every step's start, middle and end
    t_all = _time_of_s(schedule, s_all)

    def f(z: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """(dx̃/ds, d(log-det)/ds) at node k (s = s_all[k])."""
        sig_t = math.exp(s_all[k])
        alpha = 1 / math.sqrt(1 + sig_t ** 2)
        t = torch.full((B,), float(t_all[k]), dtype=x.dtype, device=x.device)
        eps, tr = _divergence(eps_fn, alpha * z, t, trace, probe)
        return sig_t * eps, (sig_t * alpha) * tr  # σ̃ ε and σ̃ α tr(∂ε/∂x) (the divergence in x̃)

    z = x.detach().clone()
    delta = torch.zeros(B, dtype=torch.float64, device=x.device)
    for i in range(steps):
        k = 2 * i
        k1, l1 = f(z, k)
        k2, l2 = f(z + (h / 2) * k1, k + 1)
        k3, l3 = f(z + (h / 2) * k2, k + 1)
        k4, l4 = f(z + h * k3, k + 2)
        z = z + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
        delta = delta + (h / 6) * (l1 + 2 * l2 + 2 * l3 + l4)
        if progress is not None:
            progress(1)
    alpha_T = 1 / math.sqrt(1 + math.exp(2 * s1))
    x_T = (alpha_T * z).double().flatten(1)
    prior = -0.5 * (x_T ** 2).sum(1) - 0.5 * d * math.log(2 * math.pi) + d * math.log(alpha_T)  # log N(αx̃; 0, I) + d log α
    return prior + delta


@define(frozen=True)
class ODELikelihood:
    """−log p(x) of the probability-flow ODE on a data set, in bits/dim (dequantized for discrete data)."""

    bits_per_dim: float
    stderr: float
    n: int
    levels: int | None
    dequantization: str
    trace: str
    steps: int
    nfe: int  # evaluations of ε (with its divergence) per point
    sigma_max: float
    conditioning: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def ode_nll(model: Any, *, dataset: str | None = None, dataset_options: dict[str, Any] | None = None,
            limit: int | None = None, batch_size: int = 100, steps: int = DEFAULT_STEPS, trace: str = "hutchinson",
            seed: int = 0, device: str | torch.device = "cpu", progress: Callable[[int], None] | None = None,
            on_start: Callable[[int], None] | None = None) -> ODELikelihood:
    """The ODE likelihood of a checkpoint on its data set (or ``dataset``), in bits/dim.

    Data with ``levels`` values per dimension (the digits: 17) is dequantized: x + u, u ~ U(-Δ/2, Δ/2) with the bin
    width Δ = 2/(levels-1), and −log P(x) ≤ −E_u log p(x + u) − d log Δ (Theis et al. 2016), so the figure is
    comparable with the variational bound's discretized decoder. A class-conditional model is evaluated on p(x | y).
    """
    from toolkit.evaluate import _model_and_data

    if trace not in TRACES:
        raise ToolkitError(f"--trace must be one of {', '.join(TRACES)}, got {trace!r}")
    if limit is not None and limit < 1:
        raise ToolkitError(f"--limit must be positive, got {limit}")
    if batch_size < 1:
        raise ToolkitError(f"batch size must be positive, got {batch_size}")
    pipe, data = _model_and_data(model, dataset, dataset_options, device)
    n = len(data) if limit is None else min(limit, len(data))
    conditional = pipe.num_classes is not None and data.y is not None
    levels = data.levels
    d = int(np.prod(data.sample_shape))
    if on_start is not None:
        on_start(-(-n // batch_size) * steps)
    g = torch.Generator().manual_seed(int(seed))
    out = []
    from toolkit.sampling import split_output

    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        x = data.x[start:stop].to(torch.float32)
        if levels is not None:
            width = 2 / (levels - 1)
            x = x + (torch.rand(x.shape, generator=g) - 0.5) * width
        probe = (torch.randint(0, 2, x.shape, generator=g) * 2 - 1).to(torch.float32)
        y = data.y[start:stop].to(pipe.device) if conditional else None
        if y is None and pipe.num_classes is not None:
            y = torch.full((stop - start,), pipe.num_classes, dtype=torch.long, device=pipe.device)
        model_fn: ModelFn = pipe.model_fn(y)

        def eps_fn(x_t: Tensor, t: Tensor, model_fn=model_fn, y=y) -> Tensor:
            if y is not None and x_t.shape[0] != y.shape[0]:  # the exact trace's replicated batch
                fn = pipe.model_fn(y.repeat(x_t.shape[0] // y.shape[0]))
                return split_output(fn(x_t, t), x_t)[0]
            return split_output(model_fn(x_t, t), x_t)[0]

        logp = ode_log_likelihood(eps_fn, pipe.schedule, x.to(pipe.device), steps=steps, trace=trace,
                                  probe=probe.to(pipe.device), progress=progress)
        out.append(logp.cpu())
    logp = torch.cat(out)
    nats = -logp
    if levels is not None:
        nats = nats - d * math.log(2 / (levels - 1))
    bpd = nats / (d * math.log(2))
    return ODELikelihood(
        bits_per_dim=float(bpd.mean()), stderr=float(bpd.std() / math.sqrt(n)) if n > 1 else math.nan, n=n,
        levels=levels, dequantization="uniform" if levels is not None else "none", trace=trace, steps=steps,
        nfe=4 * steps, sigma_max=float(math.exp(log_sigma_range(pipe.schedule)[1])),
        conditioning="labels" if conditional else ("null label" if pipe.num_classes is not None else "none"))
