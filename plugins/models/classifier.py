"""A noise-aware classifier p_φ(y | x_t, t): the UNet's encoder half, pooled to class logits
(Dhariwal & Nichol 2021, classifier guidance)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from toolkit import limits
from toolkit.errors import ToolkitError

from .layers import ConditionEmbedding
from .unet import Attention, ResBlock, _groups


class NoisyClassifier(nn.Module):
    """logits = f_φ(x_t, t) for images [B, C, H, W] noised to timestep t (fractional t allowed)."""

    def __init__(self, sample_shape: tuple[int, ...] = (1, 8, 8), num_classes: int = 10, base_channels: int = 32,
                 channel_mult: tuple[int, ...] = (1, 2), attention_heads: int = 4):
        super().__init__()
        sample_shape = limits.sample_shape(sample_shape)
        base_channels = limits.integer("base_channels", base_channels, 1, 65536)
        channel_mult = tuple(limits.integer("channel_mult", m, 1, 64) for m in channel_mult)
        attention_heads = limits.integer("attention_heads", attention_heads, 1, 65536)
        num_classes = limits.classes(num_classes)
        if len(sample_shape) != 3:
            raise ToolkitError(f"classifier needs image data [C, H, W], got sample shape {sample_shape}")
        if num_classes is None or int(num_classes) < 2:
            raise ToolkitError("a classifier needs a data set with at least two classes")
        C, H, W = sample_shape
        factor = 2 ** (len(channel_mult) - 1)
        if H % factor or W % factor:
            raise ToolkitError(f"classifier with {len(channel_mult)} levels needs H and W divisible by {factor}")
        self.sample_shape = sample_shape
        self.num_classes = int(num_classes)
        emb_dim = 4 * base_channels
        self.embed = ConditionEmbedding(base_channels, emb_dim, None)
        self.conv_in = nn.Conv2d(C, base_channels, 3, padding=1)
        blocks: list[nn.Module] = []
        ch = base_channels
        for level, mult in enumerate(channel_mult):
            blocks.append(ResBlock(ch, base_channels * mult, emb_dim, 0.0))
            ch = base_channels * mult
            if level < len(channel_mult) - 1:
                blocks.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        self.blocks = nn.ModuleList(blocks)
        self.attn = Attention(ch, attention_heads)
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.head = nn.Linear(ch, self.num_classes)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        if tuple(x_t.shape[1:]) != self.sample_shape:
            raise ToolkitError(f"classifier expects samples of shape {self.sample_shape}, got {tuple(x_t.shape[1:])}")
        emb = self.embed(t, None)
        h = self.conv_in(x_t)
        for block in self.blocks:
            h = block(h, emb) if isinstance(block, ResBlock) else block(h)
        h = F.silu(self.norm(self.attn(h)))
        return self.head(h.mean(dim=(2, 3)))
