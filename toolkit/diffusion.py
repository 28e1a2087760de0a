"""The diffusion math, once: forward process, posterior, conversions between predictions.

Every function takes 0-based integer timesteps (a tensor of shape [B]) and gathers from float64
schedule arrays, casting to the data's dtype at use.
"""

from __future__ import annotations

from typing import Callable

import math

import torch
from torch import Tensor

from toolkit.protocols import Schedule


def gather(arr: Tensor, t: Tensor, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """arr[t] shaped to broadcast with ``like`` ([B] -> [B, 1, 1, ...]), cast to ``dtype`` (default: like's)."""
    out = arr[t.long().cpu()] if arr.device.type == "cpu" else arr[t.long()]
    return out.to(device=like.device, dtype=dtype or like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def alpha_bar(schedule: Schedule, t: Tensor, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """ᾱ_t with ᾱ_{-1} = 1 (the clean data after the last step), shaped to broadcast with ``like``.

    A floating-point t may be fractional: ᾱ = sigmoid(λ) with the log-SNR λ linear in t between the
    schedule's integer times (exact at integer t). Pass dtype=torch.float64 to compute step
    coefficients exactly, then cast them to the data's dtype.
    """
    if t.is_floating_point():
        return interp_alpha_bar(schedule, t, like, dtype)
    a = torch.cat([torch.ones(1, dtype=torch.float64), schedule.alphas_cumprod.to(torch.float64)])
    return gather(a, t.long() + 1, like, dtype)


def log_snr(schedule: Schedule) -> Tensor:
    """λ_t = log(ᾱ_t / (1-ᾱ_t)) at t = 0..T-1, float64 on the CPU, strictly decreasing."""
    a = schedule.alphas_cumprod.detach().cpu().to(torch.float64)
    return torch.log(a) - torch.log1p(-a)


def interp(table: Tensor, t: Tensor) -> Tensor:
    """table at fractional t in [0, len-1], linear between integer times; traceable (floor and two gathers)."""
    n = table.shape[0]
    tf = t.to(table.dtype).clamp(0, n - 1)
    lo = tf.floor().long().clamp(max=max(n - 2, 0))
    hi = (lo + 1).clamp(max=n - 1)
    frac = tf - lo.to(table.dtype)
    return table[lo] * (1 - frac) + table[hi] * frac


def interp_alpha_bar(schedule: Schedule, t: Tensor, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """ᾱ at fractional t (λ interpolated), 1 where t < 0."""
    lam = log_snr(schedule)
    tt = t.to(torch.float64).to(lam.device)
    out = torch.where(tt < 0, torch.ones_like(tt), torch.sigmoid(interp(lam, tt)))
    return out.to(device=like.device, dtype=dtype or like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def alpha_bar_fn(schedule: Schedule, device: torch.device | str = "cpu") -> Callable[[Tensor, Tensor], Tensor]:
    """``alpha_bar`` with its table built once: (t, like) → ᾱ_t shaped like ``like`` in its dtype. What a
    sampling loop calls every step (``alpha_bar`` rebuilds the float64 table on each call)."""
    table = torch.cat([torch.ones(1, dtype=torch.float64), schedule.alphas_cumprod.detach().cpu().double()])
    lam = log_snr(schedule).to(device)
    table = table.to(device)

    def at(t: Tensor, like: Tensor) -> Tensor:
        if t.is_floating_point():
            tt = t.to(lam.dtype)
            out = torch.where(tt < 0, torch.ones_like(tt), torch.sigmoid(interp(lam, tt)))
        else:
            out = table[t.long() + 1]
        return out.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

    return at


def eps_from_score(a: Tensor, score: Tensor) -> Tensor:
    """ε from a score ∇_{x_t} log p(x_t) at ᾱ_t = ``a``: ε = −√(1-ᾱ)·score (q(x_t|x_0) is Gaussian with σ² = 1-ᾱ).
    Classifier guidance adds the classifier's s·∇ log p(y|x_t) to the score this way (Dhariwal & Nichol Alg. 2)."""
    return -(1 - a).sqrt() * score


def eps_from_output(prediction: str, a: Tensor, x_t: Tensor, head: Tensor) -> Tensor:
    """ε from a network's prediction at ᾱ_t = ``a``: ε itself, v (ε = √(1-ᾱ) x_t + √ᾱ v, Salimans & Ho),
    x̂_0 (ε = (x_t - √ᾱ x̂_0)/√(1-ᾱ), eq. 4 inverted) or the score (``eps_from_score``). The one place these
    conversions live: the pipeline and guidance call it with a cached ᾱ; samplers see ε only."""
    if prediction == "score":
        return eps_from_score(a, head)
    if prediction == "v":
        return (1 - a).sqrt() * x_t + a.sqrt() * head
    if prediction == "x0":
        return (x_t - a.sqrt() * head) / (1 - a).sqrt()
    if prediction == "epsilon":
        return head
    raise ValueError(f"unknown prediction {prediction!r}")


def q_sample(schedule: Schedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε, a draw from q(x_t | x_0)  (Ho et al. eq. 4)."""
    a = alpha_bar(schedule, t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def q_mean_variance(schedule: Schedule, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Mean √ᾱ_t x_0 and variance (1-ᾱ_t) of q(x_t | x_0)."""
    a = alpha_bar(schedule, t, x0)
    return a.sqrt() * x0, (1 - a).expand_as(x0)


def predict_x0(schedule: Schedule, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """x_0 = (x_t - √(1-ᾱ_t) ε) / √ᾱ_t  (inverting eq. 4)."""
    a = alpha_bar(schedule, t, x_t)
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def predict_eps(schedule: Schedule, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
    """ε = (x_t - √ᾱ_t x_0) / √(1-ᾱ_t)."""
    a = alpha_bar(schedule, t, x_t)
    return (x_t - a.sqrt() * x0) / (1 - a).sqrt()


def eps_from_v(schedule: Schedule, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
    """ε = √(1-ᾱ_t) x_t + √ᾱ_t v, for v = √ᾱ ε - √(1-ᾱ) x_0 (Salimans & Ho)."""
    a = alpha_bar(schedule, t, x_t)
    return (1 - a).sqrt() * x_t + a.sqrt() * v


def v_target(schedule: Schedule, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """v = √ᾱ_t ε - √(1-ᾱ_t) x_0."""
    a = alpha_bar(schedule, t, x0)
    return a.sqrt() * eps - (1 - a).sqrt() * x0


def q_posterior(
    schedule: Schedule, x0: Tensor, x_t: Tensor, t: Tensor, t_prev: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Mean μ̃ and variance β̃ of q(x_{t_prev} | x_t, x_0)  (Ho et al. eq. 6-7).

    With t_prev = t - 1 (the default) these are the paper's μ̃_t and β̃_t. For a sub-sequence
    (respaced sampling) the step's own β is 1 - ᾱ_t / ᾱ_{t_prev}.
    """
    if t_prev is None:
        t_prev = t - 1
    a_t = alpha_bar(schedule, t, x_t, torch.float64)  # coefficients in float64, cast at use
    a_prev = alpha_bar(schedule, t_prev, x_t, torch.float64)
    beta = 1 - a_t / a_prev
    coef_x0 = (a_prev.sqrt() * beta / (1 - a_t)).to(x_t.dtype)
    coef_xt = ((1 - a_prev) * (a_t / a_prev).sqrt() / (1 - a_t)).to(x_t.dtype)
    variance = ((1 - a_prev) / (1 - a_t) * beta).to(x_t.dtype)
    return coef_x0 * x0 + coef_xt * x_t, variance


def model_time(train_log_snr: Tensor, sample_log_snr: Tensor) -> Tensor:
    """Fractional training-schedule times whose log-SNR equals ``sample_log_snr`` (linear interpolation).

    ``train_log_snr`` is strictly decreasing in t; values outside its range clamp to 0 or T-1.
    """
    lam = train_log_snr.to(torch.float64)
    q = sample_log_snr.to(torch.float64)
    # searchsorted needs increasing values: flip the decreasing array.
    inc = lam.flip(0)
    n = inc.numel()
    idx = torch.searchsorted(inc, q).clamp(1, n - 1)
    lo, hi = inc[idx - 1], inc[idx]
    frac = ((q - lo) / (hi - lo)).clamp(0, 1)
    pos_inc = (idx - 1).to(torch.float64) + frac  # position in the increasing array
    return (n - 1 - pos_inc).clamp(0, n - 1)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) per element, in nats (the L_{t-1} terms of the VLB)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor, levels: int) -> Tensor:
    """log p(x) per element for data on ``levels`` evenly spaced values in [-1, 1] (Ho et al. eq. 13, L_0).

    Each value owns the bin of width 2/(levels-1) around it; the outermost bins extend to ±∞, so the
    probabilities of all levels sum to one.
    """
    if levels < 2:
        raise ValueError("levels must be at least 2")
    half = 1.0 / (levels - 1)
    inv_std = torch.exp(-log_scale)
    cdf_plus = torch.special.ndtr(inv_std * (x - mean + half))
    cdf_minus = torch.special.ndtr(inv_std * (x - mean - half))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_minus = torch.log((1.0 - cdf_minus).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))
    edge = 1.0 - 1e-3 * half
    return torch.where(x < -edge, log_cdf_plus, torch.where(x > edge, log_one_minus_cdf_minus, log_delta))


def posterior_log_variance_clipped(schedule: Schedule, t: Tensor, like: Tensor) -> Tensor:
    """log β̃_t, with β̃_0 = 0 replaced by β̃_1 (guided-diffusion's clipping), in float64."""
    a = torch.cat([torch.ones(1, dtype=torch.float64), schedule.alphas_cumprod.to(torch.float64)])
    betas = schedule.betas.to(torch.float64)
    tilde = (1 - a[:-1]) / (1 - a[1:]) * betas  # β̃_t for t = 0..T-1
    if tilde.numel() > 1:
        tilde = torch.cat([tilde[1:2], tilde[1:]])
    return gather(torch.log(tilde.clamp(min=1e-20)), t, like, torch.float64)


def learned_range_log_variance(schedule: Schedule, t: Tensor, v_raw: Tensor) -> Tensor:
    """log Σ_θ = v log β_t + (1 - v) log β̃_t with v = (v_raw + 1)/2 (Improved DDPM eq. 15)."""
    frac = (v_raw + 1) / 2
    log_beta = gather(torch.log(schedule.betas.to(torch.float64)), t, v_raw, torch.float64)
    log_tilde = posterior_log_variance_clipped(schedule, t, v_raw)
    return frac * log_beta.to(v_raw.dtype) + (1 - frac) * log_tilde.to(v_raw.dtype)


def fixed_log_variance(schedule: Schedule, t: Tensor, like: Tensor, mode: str) -> Tensor:
    """log σ_t² of a fixed-variance reverse step: "posterior" β̃_t or "beta" β_t (both with β̃_1 at t=0,
    as guided-diffusion's fixedsmall / fixedlarge), in float64."""
    if mode == "posterior":
        return posterior_log_variance_clipped(schedule, t, like)
    if mode != "beta":
        raise ValueError(f"fixed variance must be 'posterior' or 'beta', not {mode!r}")
    log_beta = torch.log(schedule.betas.to(torch.float64))
    clipped = posterior_log_variance_clipped(schedule, torch.ones_like(t), like)
    return torch.where((t == 0).reshape(clipped.shape), clipped, gather(log_beta, t, like, torch.float64))


def prior_kl(schedule: Schedule, x0: Tensor) -> Tensor:
    """L_T = KL(q(x_T | x_0) ‖ N(0, I)) of each sample in bits/dim: the price of the prior (no parameters)."""
    t = torch.full((x0.shape[0],), schedule.num_timesteps - 1, device=x0.device, dtype=torch.long)
    a = alpha_bar(schedule, t, x0, torch.float64)
    mean, log_var = a.sqrt() * x0.double(), torch.log1p(-a).expand_as(x0)
    kl = normal_kl(mean, log_var, torch.zeros_like(mean), torch.zeros_like(mean))
    return (kl.mean(dim=tuple(range(1, x0.ndim))) / math.log(2.0)).to(x0.dtype)


def vlb_terms(schedule: Schedule, x0: Tensor, x_t: Tensor, t: Tensor, eps: Tensor, log_variance: Tensor,
              levels: int | None, clip_x0: bool = False) -> Tensor:
    """The VLB term L_t of each sample in bits/dim: KL(q(x_{t-1}|x_t,x_0) ‖ p_θ(x_{t-1}|x_t)) for t ≥ 1,
    and L_0 = −log p_θ(x_0|x_1) (discretized Gaussian with ``levels``, or a Gaussian density when None).
    ``clip_x0`` clips the predicted x_0 to [-1, 1] as sampling does (evaluation; training does not)."""
    x0_pred = predict_x0(schedule, x_t, t, eps)
    if clip_x0:
        x0_pred = x0_pred.clamp(-1, 1)
    mean_p, _ = q_posterior(schedule, x0_pred, x_t, t)
    mean_q, _ = q_posterior(schedule, x0, x_t, t)
    log_var_q = posterior_log_variance_clipped(schedule, t, x_t).to(x_t.dtype)
    dims = tuple(range(1, x0.ndim))
    kl = normal_kl(mean_q, log_var_q, mean_p, log_variance).mean(dim=dims)
    if levels is not None:
        nll = -discretized_gaussian_log_likelihood(x0, mean_p, 0.5 * log_variance, levels).mean(dim=dims)
    else:
        nll = 0.5 * (math.log(2 * math.pi) + log_variance + (x0 - mean_p) ** 2 * torch.exp(-log_variance)).mean(dim=dims)
    return torch.where(t == 0, nll, kl) / math.log(2.0)
