"""Layers shared by the built-in networks."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def embedding_frequencies(dim: int, max_period: float = 10000.0, device: torch.device | str | None = None) -> Tensor:
    """The dim // 2 frequencies max_period^(-k / half) of ``timestep_embedding``: computed on the CPU, also
    inside a ``torch.device("meta")`` build (on meta, arange would import torch._dynamo: about 1 s of CPU)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device="cpu", dtype=torch.float32) / half)
    return freqs if device is None else freqs.to(device)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, freqs: Tensor | None = None) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps (Vaswani et al.; Ho et al. Appendix B);
    ``freqs`` from ``embedding_frequencies`` saves recomputing them every call."""
    if freqs is None:
        freqs = embedding_frequencies(dim, max_period, t.device)
    args = t.to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class ConditionEmbedding(nn.Module):
    """t ↦ MLP(sinusoid(t)), plus a learned embedding of the label y (K classes and the null label K)."""

    def __init__(self, base: int, dim: int, num_classes: int | None):
        super().__init__()
        self.base = base
        self.mlp = nn.Sequential(nn.Linear(base, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.num_classes = num_classes
        self.label = nn.Embedding(num_classes + 1, dim) if num_classes else None
        self.register_buffer("freqs", embedding_frequencies(base), persistent=False)  # computed once, not per call

    def forward(self, t: Tensor, y: Tensor | None) -> Tensor:
        emb = self.mlp(timestep_embedding(t, self.base, freqs=self.freqs).to(self.mlp[0].weight.dtype))
        if self.label is not None:
            if y is None:  # unconditional: the null label ∅
                y = torch.full((t.shape[0],), self.num_classes, dtype=torch.long, device=t.device)
            emb = emb + self.label(y.long())
        return emb


def check_input(model: nn.Module, x: Tensor, t: Tensor, y: Tensor | None) -> None:
    from toolkit.errors import ToolkitError

    if tuple(x.shape[1:]) != tuple(model.sample_shape):
        raise ToolkitError(f"{type(model).__name__} expects samples of shape {tuple(model.sample_shape)}, "
                           f"got {tuple(x.shape[1:])}")
    if t.shape != (x.shape[0],):
        raise ToolkitError(f"t must have shape [{x.shape[0]}], got {tuple(t.shape)}")
    if y is not None and model.num_classes is None:
        raise ToolkitError(f"{type(model).__name__} is unconditional; labels are not accepted")
