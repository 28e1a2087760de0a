"""Per-sample random streams: sample i's numbers depend on (seed, i) alone, never on n or the batch size.
Stream order: x_T first (draw 0), then the noise of each stochastic step. The numbers come from the
counter-based generator of toolkit.rng, which the torch-free runtime and the exported graphs share;
``sample_seed`` seeds the training loop's per-step torch generators."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` of run ``seed`` (numpy's SeedSequence mixes the pair)."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(index)]).generate_state(1, np.uint64)[0] >> 1)


class NoiseStreams:
    """Sample i's stream of run ``seed``: ``draw`` returns the next [B, *shape] standard normal (draw 0 is x_T).

    The numbers come from toolkit.rng, a counter-based generator that numpy (the torch-free runtime) and
    the exported ONNX graphs compute identically, so a seed means the same samples everywhere."""

    def __init__(self, seed: int, indices, shape: tuple[int, ...], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        from toolkit.errors import ToolkitError

        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**63:
            raise ToolkitError(f"seed must be an integer in 0..2^63-1, got {seed!r}")
        self.seed = int(seed)
        self.shape = tuple(shape)
        self.device = device
        self.dtype = dtype
        self.index = torch.as_tensor(list(indices), dtype=torch.int64, device=device)
        self.count = 0

    def at(self, draw: int) -> Tensor:
        """Draw number ``draw`` of every stream, whatever was drawn before."""
        from toolkit.rng import normal_torch

        out = normal_torch(self.seed, self.index, draw, self.shape, self.device)
        return out.to(dtype=self.dtype)

    def draw(self) -> Tensor:
        out = self.at(self.count)
        self.count += 1
        return out
