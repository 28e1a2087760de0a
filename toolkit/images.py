"""Writing samples: a PNG grid (scaled up so 8×8 digits are visible) or a float32 .npy array."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import Tensor

from toolkit import limits
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


MAX_GRID_PIXELS = 8192 * 8192  # a PNG grid larger than this is refused: viewers choke, use .npy


def _layout(n: int, shape: tuple[int, ...], nrow: int | None, scale: int | None = None,
            pad: int | None = None) -> tuple[int, int, int, int, int, int]:
    """(nrow, ncol, scale, pad, height, width) of the grid of n samples of ``shape`` [C, H, W]."""
    if len(shape) != 3:
        raise ToolkitError(f"a PNG grid needs image samples [N, C, H, W], got samples of shape {tuple(shape)}; "
                           "use .npy")
    c, h, w = shape
    if c not in (1, 3):
        raise ToolkitError(f"a PNG grid needs 1 or 3 channels, got {c}; use .npy")
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    scale = scale or max(1, 64 // max(h, w))
    pad = max(1, scale // 2) if pad is None else pad
    return nrow, ncol, scale, pad, ncol * (h * scale + pad) + pad, nrow * (w * scale + pad) + pad


def check_grid(n: int, shape: tuple[int, ...], nrow: int | None = None) -> None:
    """Refuse, before any sampling, a PNG grid that is not an image or too large to be useful as one."""
    *_, height, width = _layout(n, tuple(shape), nrow)
    if height * width > MAX_GRID_PIXELS:
        raise ToolkitError(f"a grid of {n} samples would be a {width}×{height} PNG (more than "
                           f"{MAX_GRID_PIXELS // 2**20} megapixels); write them to a .npy file instead")


def grid(samples: Tensor, nrow: int | None = None, scale: int | None = None, pad: int | None = None) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] → uint8 image [H', W', C] with ``nrow`` samples per row."""
    n = samples.shape[0]
    nrow, ncol, scale, pad, height, width = _layout(n, tuple(samples.shape[1:]), nrow, scale, pad)
    c, h, w = samples.shape[1:]
    img = ((samples.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    img = img.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    H, W = h * scale + pad, w * scale + pad
    canvas = torch.full((c, height, width), 128, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        canvas[:, pad + r * H: pad + r * H + h * scale, pad + k * W: pad + k * W + w * scale] = img[i]
    return canvas.permute(1, 2, 0).numpy()


def write_npy(path: str | os.PathLike, shape: tuple[int, ...], batches: Iterable[Tensor], digest=None) -> Path:
    """Stream float32 batches into one .npy of ``shape`` [n, ...]: memory bounded by a batch, the free disk
    space checked first, and the file renamed into place only when complete. ``digest`` (a hashlib object),
    if given, is fed the array's bytes as they are written."""
    path = Path(path)
    shape = tuple(int(s) for s in shape)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")), "fortran_order": False, "shape": shape}
    limits.fits_disk(f"{shape[0]} samples of shape {list(shape[1:])}", 4 * math.prod(shape),
                     path.parent if str(path.parent) else ".")

    def write(tmp: str) -> None:
        written = 0
        with open(tmp, "wb") as fh:
            np.lib.format.write_array_header_1_0(fh, header)
            for batch in batches:
                arr = np.ascontiguousarray(batch.detach().cpu().to(torch.float32).numpy(), dtype="<f4")
                if arr.shape[1:] != shape[1:] or written + len(arr) > shape[0]:
                    raise ToolkitError(f"a batch of shape {list(arr.shape)} does not fit {list(shape)}")
                data = arr.tobytes()
                fh.write(data)
                if digest is not None:
                    digest.update(data)
                written += len(arr)
            if written != shape[0]:
                raise ToolkitError(f"{written} samples were produced, {shape[0]} expected")
            fh.flush()
            os.fsync(fh.fileno())

    atomic_write(path, write)
    return path


def save_stream(path: str | os.PathLike, shape: tuple[int, ...], batches: Callable[[], Iterable[Tensor]],
                nrow: int | None = None) -> Path:
    """Write n = shape[0] samples that ``batches()`` produces: a .npy streamed batch by batch, a PNG grid
    checked for size before the first batch is computed."""
    path = check_output(path)
    if path.suffix.lower() == ".npy":
        return write_npy(path, shape, batches())
    check_grid(shape[0], tuple(shape[1:]), nrow)
    return save_samples(torch.cat(list(batches())), path, nrow=nrow)


def save_samples(samples: Tensor, path: str | os.PathLike, nrow: int | None = None) -> Path:
    """Write samples to .png (grid) or .npy (float32 [N, ...] in [-1, 1]) atomically."""
    from PIL import Image

    path = check_output(path)
    if path.suffix.lower() == ".npy":
        return write_npy(path, tuple(samples.shape), [samples])
    check_grid(samples.shape[0], tuple(samples.shape[1:]), nrow)
    img = grid(samples.detach().cpu(), nrow=nrow)
    pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
    atomic_write(path, lambda tmp: pil.save(tmp, format="PNG"))
    return path
