"""Per-sample random streams: sample i draws from its own seeded generator, so it does not depend
on n or the batch size. Stream order: x_T first, then the noise of each stochastic step."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` of run ``seed`` (numpy's SeedSequence mixes the pair)."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(index)]).generate_state(1, np.uint64)[0] >> 1)


class NoiseStreams:
    """One torch.Generator per sample; ``draw`` returns the next [B, *shape] standard normal."""

    def __init__(self, seed: int, indices, shape: tuple[int, ...], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.shape = tuple(shape)
        self.device = device
        self.dtype = dtype
        self.generators = [torch.Generator().manual_seed(sample_seed(seed, int(i))) for i in indices]

    def draw(self) -> Tensor:
        out = torch.stack([torch.randn(self.shape, generator=g, dtype=torch.float32) for g in self.generators])
        return out.to(device=self.device, dtype=self.dtype)
