"""Writing samples: a PNG grid (scaled up so 8×8 digits are visible) or a float32 .npy array."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from toolkit.errors import ToolkitError
from toolkit.files import atomic_write

SUFFIXES = (".png", ".npy")


def check_output(path: str | os.PathLike, suffixes: tuple[str, ...] = SUFFIXES) -> Path:
    """Fail before any work if the output cannot be written: folder missing or unknown suffix."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise ToolkitError(f"output {str(path)!r} must end in {' or '.join(suffixes)}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ToolkitError(f"output folder {str(parent)!r} does not exist")
    return path


def grid(samples: Tensor, nrow: int | None = None, scale: int | None = None, pad: int | None = None) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] → uint8 image [H', W', C] with ``nrow`` samples per row."""
    if samples.ndim != 4:
        raise ToolkitError(f"a PNG grid needs image samples [N, C, H, W], got {tuple(samples.shape)}; use .npy")
    n, c, h, w = samples.shape
    if c not in (1, 3):
        raise ToolkitError(f"a PNG grid needs 1 or 3 channels, got {c}; use .npy")
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    scale = scale or max(1, 64 // max(h, w))
    pad = max(1, scale // 2) if pad is None else pad
    img = ((samples.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    img = img.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    H, W = h * scale + pad, w * scale + pad
    canvas = torch.full((c, ncol * H + pad, nrow * W + pad), 128, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        canvas[:, pad + r * H: pad + r * H + h * scale, pad + k * W: pad + k * W + w * scale] = img[i]
    return canvas.permute(1, 2, 0).numpy()


def save_samples(samples: Tensor, path: str | os.PathLike, nrow: int | None = None) -> Path:
    """Write samples to .png (grid) or .npy (float32 [N, ...] in [-1, 1]) atomically."""
    from PIL import Image

    path = check_output(path)
    if path.suffix.lower() == ".npy":
        arr = samples.detach().cpu().to(torch.float32).numpy()
        atomic_write(path, lambda tmp: np.save(tmp, arr))
    else:
        img = grid(samples.detach().cpu(), nrow=nrow)
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        atomic_write(path, lambda tmp: pil.save(tmp, format="PNG"))
    return path
