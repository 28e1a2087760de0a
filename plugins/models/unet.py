"""A small DDPM UNet: residual blocks with GroupNorm, sinusoidal time embedding, self-attention at
the lowest resolution, optional class embedding with a null label ∅ (Ho et al.; Dhariwal & Nichol)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toolkit import limits
from toolkit.errors import ToolkitError

from .layers import ConditionEmbedding, check_input


def _groups(ch: int) -> int:
    for g in (32, 16, 8, 4, 2, 1):
        if ch % g == 0 and ch // g >= 2:
            return g
    return 1


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)  # scale and shift (FiLM), as in Improved DDPM
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    def __init__(self, ch: int, heads: int):
        super().__init__()
        if ch % heads:
            raise ToolkitError(f"unet: {ch} channels do not split into {heads} attention heads")
        self.heads = heads
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W).unbind(1)
        h = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class UNet(nn.Module):
    """ε_θ(x_t, t, y) for images [B, C, H, W]; H and W divisible by 2^(levels-1)."""

    def __init__(
        self,
        sample_shape: tuple[int, ...] = (1, 8, 8),
        num_classes: int | None = None,
        base_channels: int = 32,
        channel_mult: tuple[int, ...] = (1, 2),
        num_res_blocks: int = 1,
        attention_heads: int = 4,
        dropout: float = 0.0,
        learned_variance: bool = False,
        prediction: str = "epsilon",
    ):
        super().__init__()
        sample_shape = limits.sample_shape(sample_shape)
        channel_mult = tuple(limits.integer("channel_mult", m, 1, 64) for m in channel_mult)
        base_channels = limits.integer("base_channels", base_channels, 1, 65536)
        num_res_blocks = limits.integer("num_res_blocks", num_res_blocks, 1, 64)
        attention_heads = limits.integer("attention_heads", attention_heads, 1, 65536)
        dropout = limits.number("dropout", dropout, 0.0, 1.0, high_open=True)
        num_classes = limits.classes(num_classes)
        if not channel_mult:
            raise ToolkitError("channel_mult must list at least one level")
        if len(sample_shape) != 3:
            raise ToolkitError(f"unet needs image data [C, H, W], got sample shape {sample_shape}; use mlp for vectors")
        C, H, W = sample_shape
        factor = 2 ** (len(channel_mult) - 1)
        if H % factor or W % factor:
            raise ToolkitError(f"unet with {len(channel_mult)} levels needs H and W divisible by {factor}, got {H}×{W}")
        if prediction not in ("epsilon", "v", "x0"):
            raise ToolkitError(f"prediction must be epsilon, v or x0, not {prediction!r}")
        self.sample_shape = sample_shape
        self.num_classes = num_classes
        self.learned_variance = bool(learned_variance)
        self.prediction = prediction

        emb_dim = 4 * base_channels
        self.embed = ConditionEmbedding(base_channels, emb_dim, num_classes)
        self.conv_in = nn.Conv2d(C, base_channels, 3, padding=1)
        chans = [base_channels * m for m in channel_mult]
        self.down = nn.ModuleList()
        skips = [base_channels]
        ch = base_channels
        for level, cout in enumerate(chans):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, cout, emb_dim, dropout))
                ch = cout
                skips.append(ch)
            down = nn.Conv2d(ch, ch, 3, stride=2, padding=1) if level < len(chans) - 1 else None
            if down is not None:
                skips.append(ch)
            self.down.append(nn.ModuleDict({"blocks": blocks, **({"down": down} if down else {})}))
        self.mid1 = ResBlock(ch, ch, emb_dim, dropout)
        self.mid_attn = Attention(ch, attention_heads)
        self.mid2 = ResBlock(ch, ch, emb_dim, dropout)
        self.up = nn.ModuleList()
        for level, cout in reversed(list(enumerate(chans))):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(ch + skips.pop(), cout, emb_dim, dropout))
                ch = cout
            attn = Attention(ch, attention_heads) if level == len(chans) - 1 else None
            up = nn.Conv2d(ch, ch, 3, padding=1) if level > 0 else None
            self.up.append(nn.ModuleDict({"blocks": blocks, **({"attn": attn} if attn else {}),
                                          **({"up": up} if up else {})}))
        self.norm_out = nn.GroupNorm(_groups(ch), ch)
        self.conv_out = nn.Conv2d(ch, C * (2 if learned_variance else 1), 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        check_input(self, x_t, t, y)
        emb = self.embed(t, y)
        h = self.conv_in(x_t)
        hs = [h]
        for level in self.down:
            for block in level["blocks"]:
                h = block(h, emb)
                hs.append(h)
            if "down" in level:
                h = level["down"](h)
                hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for level in self.up:
            for block in level["blocks"]:
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
            if "attn" in level:
                h = level["attn"](h)
            if "up" in level:
                h = level["up"](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))
