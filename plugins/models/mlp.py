"""An MLP noise predictor for vector data such as the 2-D toys."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from toolkit import limits
from toolkit.errors import ToolkitError

from .layers import ConditionEmbedding, check_input


class MLP(nn.Module):
    """ε_θ(x_t, t, y) for [B, D] data: residual SiLU layers conditioned on the time/label embedding."""

    def __init__(self, sample_shape: tuple[int, ...] = (2,), num_classes: int | None = None,
                 hidden: int = 128, layers: int = 3, learned_variance: bool = False,
                 prediction: str = "epsilon"):
        super().__init__()
        sample_shape = limits.sample_shape(sample_shape)
        hidden = limits.integer("hidden", hidden, 1, 65536)
        layers = limits.integer("layers", layers, 0, 1024)
        num_classes = limits.classes(num_classes)
        if len(sample_shape) != 1:
            raise ToolkitError(f"mlp needs vector data [D], got sample shape {sample_shape}; use unet for images")
        if prediction not in ("epsilon", "v", "x0"):
            raise ToolkitError(f"prediction must be epsilon, v or x0, not {prediction!r}")
        (D,) = sample_shape
        self.sample_shape = sample_shape
        self.num_classes = num_classes
        self.learned_variance = bool(learned_variance)
        self.prediction = prediction
        self.embed = ConditionEmbedding(hidden, hidden, num_classes)
        self.inp = nn.Linear(D, hidden)
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.out = nn.Linear(hidden, D * (2 if learned_variance else 1))
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        check_input(self, x_t, t, y)
        emb = self.embed(t, y)
        h = self.inp(x_t)
        for block in self.blocks:
            h = h + block(F.silu(h + emb))
        return self.out(F.silu(h))
