"""A convolutional autoencoder for latent diffusion (Rombach et al. 2022): the encoder maps x to a latent
z of ``latent_channels`` × H/f × W/f, the decoder maps z back; KL-regularized with a small weight (the
encoder outputs a mean and a log-variance), or plain with ``kl_weight=0``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toolkit import limits
from toolkit.errors import ToolkitError

from .unet import _groups


class _Block(nn.Module):
    """GroupNorm → SiLU → conv, twice, with a residual connection."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(_groups(cin), cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(_groups(cout), cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class ConvAutoencoder(nn.Module):
    """encode(x) → z (the posterior mean), decode(z) → x̂; ``forward`` gives the training loss terms."""

    def __init__(self, sample_shape: tuple[int, ...] = (1, 8, 8), latent_channels: int = 2, downsample: int = 2,
                 base_channels: int = 32, kl_weight: float = 1e-6, num_classes: int | None = None):
        super().__init__()
        sample_shape = limits.sample_shape(sample_shape)
        latent_channels = limits.integer("latent_channels", latent_channels, 1, 65536)
        downsample = limits.integer("downsample", downsample, 1, 65536)
        base_channels = limits.integer("base_channels", base_channels, 1, 65536)
        kl_weight = limits.number("kl_weight", kl_weight, 0.0)
        if len(sample_shape) != 3:
            raise ToolkitError(f"autoencoder needs image data [C, H, W], got sample shape {sample_shape}")
        levels = int(round(math.log2(downsample))) if downsample >= 1 else -1
        if downsample < 1 or 2 ** levels != downsample:
            raise ToolkitError(f"--downsample must be a power of two, got {downsample}")
        C, H, W = sample_shape
        if H % downsample or W % downsample:
            raise ToolkitError(f"--downsample {downsample} does not divide the data's {H}×{W} pixels")
        if latent_channels < 1:
            raise ToolkitError(f"--latent-channels must be positive, got {latent_channels}")
        self.sample_shape = sample_shape
        self.latent_shape = (int(latent_channels), H // downsample, W // downsample)
        self.kl_weight = float(kl_weight)
        self.num_classes = num_classes  # unused: lets the training loop treat it like other models
        ch = base_channels
        enc: list[nn.Module] = [nn.Conv2d(C, ch, 3, padding=1), _Block(ch, ch)]
        for _ in range(levels):
            enc += [nn.Conv2d(ch, ch, 3, stride=2, padding=1), _Block(ch, ch)]
        enc += [nn.GroupNorm(_groups(ch), ch), nn.SiLU(), nn.Conv2d(ch, 2 * latent_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(latent_channels, ch, 3, padding=1), _Block(ch, ch)]
        for _ in range(levels):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1), _Block(ch, ch)]
        dec += [nn.GroupNorm(_groups(ch), ch), nn.SiLU(), nn.Conv2d(ch, C, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    def _check(self, x: Tensor, shape: tuple[int, ...], what: str) -> None:
        if tuple(x.shape[1:]) != shape:
            raise ToolkitError(f"autoencoder {what} expects shape {shape}, got {tuple(x.shape[1:])}")

    def moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of q(z | x)."""
        self._check(x, self.sample_shape, "encoder")
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x: Tensor) -> Tensor:
        """The latent of x: the posterior mean (deterministic, so a data set encodes once)."""
        return self.moments(x)[0]

    def decode(self, z: Tensor) -> Tensor:
        self._check(z, self.latent_shape, "decoder")
        return self.decoder(z)

    def forward(self, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Reconstruction of a posterior sample z = μ + σ·noise and KL(q(z|x) ‖ N(0, I)) per latent element."""
        mean, logvar = self.moments(x)
        if self.kl_weight > 0:
            noise = torch.randn_like(mean) if noise is None else noise
            z = mean + torch.exp(0.5 * logvar) * noise
        else:
            z = mean
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        return self.decode(z), kl
