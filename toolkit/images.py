"""Writing samples: a PNG grid (scaled up so 8×8 digits are visible), a scatter plot of 2-D points, or a
float32 .npy array; and the loss curve of a run."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Union

import numpy as np

from toolkit import limits
from toolkit.errors import ToolkitError
from toolkit.files import atomic_write

if TYPE_CHECKING:
    from torch import Tensor

Samples = Union["Tensor", np.ndarray]  # torch tensors or numpy arrays: the onnxruntime path writes without torch
SUFFIXES = (".png", ".npy")


def as_numpy(samples: Any, dtype: type = np.float32) -> np.ndarray:
    """A numpy array (float32, or float64) of samples given as a torch tensor (any device or dtype) or an array."""
    if hasattr(samples, "detach"):  # a torch tensor; checked by duck type so this module never imports torch
        t = samples.detach().cpu()
        samples = (t.double() if dtype is np.float64 else t.float()).numpy()
    return np.asarray(samples, dtype=dtype)


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


SCATTER_SIZE = 512  # pixels of a scatter plot of 2-D samples
SCATTER_RANGE = 1.1  # the least the plot shows: [-1.1, 1.1]² (images-range data lies in [-1, 1])


def is_points(shape: tuple[int, ...]) -> bool:
    """2-D vector samples (moons, swissroll, gaussians8): drawn as a scatter plot, not a grid."""
    return tuple(shape) == (2,)


def scatter(points: Samples, size: int = SCATTER_SIZE) -> np.ndarray:
    """[N, 2] points → a uint8 RGB scatter plot [size, size, 3] (y up), with the axes through 0 and the square
    [-1, 1]² outlined; the plot spans ±max(1.1, 1.05·max |coordinate|), so data with no fixed range stays in view."""
    from PIL import Image, ImageDraw

    p = as_numpy(points, np.float64).reshape(-1, 2)
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    finite = p[np.isfinite(p).all(1)]
    span = max(SCATTER_RANGE, 1.05 * float(np.abs(finite).max())) if len(finite) else SCATTER_RANGE
    to_px = lambda v: (v + span) / (2 * span) * (size - 1)  # noqa: E731
    mid = to_px(0.0)
    draw.line([(0, mid), (size - 1, mid)], fill=(205, 205, 205))
    draw.line([(mid, 0), (mid, size - 1)], fill=(205, 205, 205))
    draw.rectangle([to_px(-1), to_px(-1), to_px(1), to_px(1)], outline=(160, 160, 160))
    r = max(1, size // 256)
    for x, y in finite:
        px, py = to_px(x), size - 1 - to_px(y)
        draw.ellipse([px - r, py - r, px + r, py + r], fill=(31, 90, 170))
    return np.asarray(img)


def line_plot(series: dict[str, tuple[list[float], list[float]]], title: str = "", width: int = 720,
              height: int = 400) -> np.ndarray:
    """Curves (name → (x, y)) on shared axes, a uint8 RGB image: the loss curve of ``toolkit show``."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    try:
        draw.font = ImageFont.load_default(size=13)  # Pillow ≥ 10.1 with FreeType: a scalable font
    except (TypeError, OSError, ImportError):
        pass  # the bitmap default
    left, right, top, bottom = 70, width - 20, 30, height - 40
    points = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys) if math.isfinite(y)]
    if not points:
        raise ToolkitError("nothing to plot: no finite values")
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-9)
    px = lambda x: left + (x - x0) / (x1 - x0) * (right - left)  # noqa: E731
    py = lambda y: bottom - (y - y0) / (y1 - y0) * (bottom - top)  # noqa: E731
    draw.rectangle([left, top, right, bottom], outline=(120, 120, 120))
    for y in (y0, (y0 + y1) / 2, y1):
        draw.text((4, py(y) - 6), f"{y:.4g}", fill=(60, 60, 60))
    for x in (x0, (x0 + x1) / 2, x1):
        draw.text((px(x) - 12, bottom + 6), f"{x:.0f}", fill=(60, 60, 60))
    draw.text((left, 8), title, fill=(0, 0, 0))
    colors = [(31, 90, 170), (214, 96, 30), (44, 150, 44), (150, 40, 150)]
    for k, (name, (xs, ys)) in enumerate(series.items()):
        pts = [(px(x), py(y)) for x, y in zip(xs, ys) if math.isfinite(y)]
        color = colors[k % len(colors)]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        for p in pts if len(pts) <= 1 or len(pts) < 30 else []:
            draw.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=color)
        draw.text((right - 150, top + 6 + 14 * k), name, fill=color)
    return np.asarray(img)


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 [H, W] or [H, W, C] image as PNG file bytes."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def picture(samples: Samples, nrow: int | None = None) -> np.ndarray:
    """What a PNG of these samples shows: a grid of images, or a scatter plot of 2-D points."""
    if is_points(tuple(samples.shape[1:])):
        return scatter(samples)
    check_grid(samples.shape[0], tuple(samples.shape[1:]), nrow)
    return grid(samples, nrow=nrow)


def check_grid(n: int, shape: tuple[int, ...], nrow: int | None = None) -> None:
    """Refuse, before any sampling, a PNG grid that is not an image or too large to be useful as one."""
    if is_points(shape):
        return  # a scatter plot: one fixed-size picture whatever n
    *_, height, width = _layout(n, tuple(shape), nrow)
    if height * width > MAX_GRID_PIXELS:
        raise ToolkitError(f"a grid of {n} samples would be a {width}×{height} PNG (more than "
                           f"{MAX_GRID_PIXELS // 2**20} megapixels); write them to a .npy file instead")


def grid(samples: Samples, nrow: int | None = None, scale: int | None = None, pad: int | None = None) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] → uint8 image [H', W', C] with ``nrow`` samples per row."""
    samples = as_numpy(samples)
    n = samples.shape[0]
    nrow, ncol, scale, pad, height, width = _layout(n, tuple(samples.shape[1:]), nrow, scale, pad)
    c, h, w = samples.shape[1:]
    samples = np.nan_to_num(samples, nan=-1.0)  # a NaN pixel is black, as torch's cast made it
    img = np.rint((np.clip(samples, -1, 1) + 1) * np.float32(127.5)).astype(np.uint8)  # rint: half to even
    img = img.repeat(scale, 2).repeat(scale, 3)
    H, W = h * scale + pad, w * scale + pad
    canvas = np.full((c, height, width), 128, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        canvas[:, pad + r * H: pad + r * H + h * scale, pad + k * W: pad + k * W + w * scale] = img[i]
    return np.ascontiguousarray(canvas.transpose(1, 2, 0))


def write_npy(path: str | os.PathLike, shape: tuple[int, ...], batches: Iterable[Samples], digest=None) -> Path:
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
                arr = np.ascontiguousarray(as_numpy(batch), dtype="<f4")
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


def save_stream(path: str | os.PathLike, shape: tuple[int, ...], batches: Callable[[], Iterable[Samples]],
                nrow: int | None = None) -> Path:
    """Write n = shape[0] samples that ``batches()`` produces: a .npy streamed batch by batch, a PNG grid
    checked for size before the first batch is computed."""
    path = check_output(path)
    if path.suffix.lower() == ".npy":
        return write_npy(path, shape, batches())
    check_grid(shape[0], tuple(shape[1:]), nrow)
    return save_samples(np.concatenate([as_numpy(b) for b in batches()]), path, nrow=nrow)


def save_samples(samples: Samples, path: str | os.PathLike, nrow: int | None = None) -> Path:
    """Write samples to .png (grid) or .npy (float32 [N, ...] in [-1, 1]) atomically."""
    from PIL import Image

    path = check_output(path)
    if path.suffix.lower() == ".npy":
        return write_npy(path, tuple(samples.shape), [samples])
    img = picture(samples, nrow)
    pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
    atomic_write(path, lambda tmp: pil.save(tmp, format="PNG"))
    return path
