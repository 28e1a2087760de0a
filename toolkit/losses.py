"""The training losses and the held-out scores of each built-in task (the math; plugins/tasks.py wires them)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toolkit import checkpoint, diffusion, optional


def loss_simple(model: nn.Module, schedule, x0: Tensor, t: Tensor, noise: Tensor, y: Tensor | None) -> Tensor:
    """L_simple = ‖ε - ε_θ(√ᾱ_t x_0 + √(1-ᾱ_t) ε, t)‖² (Algorithm 1), or the v / x_0 target."""
    x_t = diffusion.q_sample(schedule, x0, t, noise)
    out = model(x_t, t, y)
    C = x0.shape[1]
    pred = out[:, :C]
    prediction = optional.prediction(model)
    if prediction == "epsilon":
        target = noise
    elif prediction == "v":
        target = diffusion.v_target(schedule, x0, t, noise)
    else:
        target = x0
    return (pred - target).pow(2).mean()


HYBRID_LAMBDA = 0.001  # λ of L_hybrid = L_simple + λ L_vlb (Nichol & Dhariwal)


def _weighted(per_sample: Tensor, weights: Tensor | None, observed: dict[str, Tensor] | None) -> Tensor:
    """The batch mean of per-sample losses, each times its importance weight 1/(T p_t) (None: uniform t); the
    unweighted values go to ``observed["loss"]`` (what importance sampling learns p_t from)."""
    if observed is not None:
        observed["loss"] = per_sample.detach()
    if weights is None:
        return per_sample.mean()
    return (per_sample * weights.to(per_sample.dtype)).mean()


def loss_hybrid(model: nn.Module, schedule, x0: Tensor, t: Tensor, noise: Tensor, y: Tensor | None,
                levels: int | None, weights: Tensor | None = None, observed: dict[str, Tensor] | None = None) -> Tensor:
    """L_hybrid = L_simple + λ·L_vlb; L_vlb ≈ T·L_t for uniform t, and L_t sees a stop-gradient ε (mean)."""
    x_t = diffusion.q_sample(schedule, x0, t, noise)
    out = model(x_t, t, y)
    C = x0.shape[1]
    eps, v_raw = out[:, :C], out[:, C:]
    simple = (eps - noise).pow(2).flatten(1).mean(1)
    log_variance = diffusion.learned_range_log_variance(schedule, t, v_raw)
    vlb = diffusion.vlb_terms(schedule, x0, x_t, t, eps.detach(), log_variance, levels)
    return _weighted(simple + HYBRID_LAMBDA * schedule.num_timesteps * vlb, weights, observed)


def loss_vlb(model: nn.Module, schedule, x0: Tensor, t: Tensor, noise: Tensor, y: Tensor | None,
             levels: int | None, weights: Tensor | None = None, observed: dict[str, Tensor] | None = None) -> Tensor:
    """L_vlb alone (Improved DDPM's likelihood objective): T·L_t at uniform t, or L_t / p_t with importance-sampled t;
    mean and variance both learn through it (no stop-gradient). L_T is constant in θ and left out."""
    x_t = diffusion.q_sample(schedule, x0, t, noise)
    out = model(x_t, t, y)
    C = x0.shape[1]
    eps, v_raw = out[:, :C], out[:, C:]
    log_variance = diffusion.learned_range_log_variance(schedule, t, v_raw)
    vlb = diffusion.vlb_terms(schedule, x0, x_t, t, eps, log_variance, levels)
    return _weighted(schedule.num_timesteps * vlb, weights, observed)


def loss_autoencoder(model: nn.Module, x0: Tensor, noise: Tensor) -> Tensor:
    """‖x − D(z)‖² + kl_weight·KL(q(z|x) ‖ N(0, I)), z = μ + σ·noise (Rombach et al.'s KL-regularized autoencoder)."""
    recon, kl = model(x0, noise)
    return (recon - x0).pow(2).mean() + model.kl_weight * kl


@torch.no_grad()
def autoencoder_summary(model: nn.Module, x: Tensor, batch_size: int = 500) -> dict[str, Any]:
    """The latent scale factor 1/std(z) over the data, the fingerprint, and the reconstruction error."""
    was = model.training
    model.eval()
    zs, sq, worst = [], 0.0, 0.0
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        z = model.encode(xb)
        err = model.decode(z) - xb
        zs.append(z.cpu())
        sq += float(err.double().pow(2).sum())
        worst = max(worst, float(err.abs().max()))
    model.train(was)
    z = torch.cat(zs)
    scale = float(1.0 / z.double().std())
    return {"scale_factor": scale, "fingerprint": checkpoint.weights_fingerprint(model.state_dict()),
            "range": float(z.double().abs().max()) * scale,  # the real latents' range, scaled: the latent clip range
            "latent_shape": list(z.shape[1:]), "data_shape": list(x.shape[1:]),
            "reconstruction_mse": sq / x.numel(), "reconstruction_max_abs": worst}


def loss_features(model: nn.Module, x0: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy of a classifier on the clean data (its penultimate layer becomes the FD features)."""
    return F.cross_entropy(model(x0), y)


@torch.no_grad()
def holdout_accuracy(model: nn.Module, task: str, x: Tensor, y: Tensor) -> float:
    """Accuracy on held-out clean data (a noise-aware classifier is asked at t = 0)."""
    was = model.training
    model.eval()
    t = torch.zeros(len(x), dtype=torch.long, device=x.device)
    logits = model(x) if task == "features" else model(x, t)
    model.train(was)
    return float((logits.argmax(1) == y).float().mean())


def loss_classifier(model: nn.Module, schedule, x0: Tensor, t: Tensor, noise: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy of p_φ(y | x_t, t) on data noised to a uniformly drawn t (Dhariwal & Nichol)."""
    return F.cross_entropy(model(diffusion.q_sample(schedule, x0, t, noise), t), y)
