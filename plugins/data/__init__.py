"""Built-in data sets: digits (shipped), folder of images, .npy/.npz arrays, and 2-D toys."""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from toolkit.data import ArrayDataset, levels_to_unit
from toolkit import limits
from toolkit.errors import ToolkitError
from toolkit.hookspecs import hookimpl

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def digits() -> ArrayDataset:
    """The 1797 UCI optical-recognition digits, 8×8 with 17 gray levels (as scikit-learn ships them)."""
    with resources.files(__package__).joinpath("digits.npz").open("rb") as fh:
        data = np.load(fh)
        images, labels = data["images"], data["labels"]
    x = levels_to_unit(torch.from_numpy(images.astype(np.int64)), 17).unsqueeze(1)
    return ArrayDataset("digits", x, torch.from_numpy(labels.astype(np.int64)), num_classes=10,
                        levels=17, class_names=tuple(str(i) for i in range(10)))


MAX_IMAGE_PIXELS = 8192 * 8192  # a larger image in a folder data set is refused before it is decoded


def folder(path: str, size: int = 32, channels: int = 3) -> ArrayDataset:
    """Every image under ``path`` (recursively), resized to size×size; sub-folders become classes."""
    from PIL import Image

    root = Path(path)
    if not root.is_dir():
        raise ToolkitError(f"folder dataset: {path!r} is not a directory")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ToolkitError(f"folder dataset: no images under {path!r}")
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise ToolkitError("folder dataset: channels must be 1 or 3")
    size = limits.integer("folder dataset: size", size, 1, 4096)
    limits.fits_memory(f"folder dataset: {len(files)} images of {size}×{size}", 5 * len(files) * size * size * channels,
                       "use a smaller size")
    arrays = []
    for f in files:
        try:
            with Image.open(f) as im:  # reads the header only: the size is checked before anything is decoded
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise ToolkitError(f"folder dataset: {f} is {im.width}×{im.height} pixels, more than the "
                                       f"{MAX_IMAGE_PIXELS // 2**20} megapixels an image may have here")
                im = im.convert(mode).resize((size, size), Image.Resampling.BICUBIC)
                arrays.append(np.asarray(im, dtype=np.uint8).reshape(size, size, channels))
        except (OSError, Image.DecompressionBombError, SyntaxError, ValueError) as exc:
            if isinstance(exc, ToolkitError):
                raise
            raise ToolkitError(f"folder dataset: cannot read {f}: {exc}") from exc
    x = levels_to_unit(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2), 256)
    classes = sorted({f.parent.relative_to(root).as_posix() for f in files})
    y = None
    if len(classes) > 1:
        index = {c: i for i, c in enumerate(classes)}
        y = torch.tensor([index[f.parent.relative_to(root).as_posix()] for f in files])
    return ArrayDataset(f"folder:{root.name}", x.contiguous(), y, len(classes) if y is not None else None,
                        levels=256, class_names=tuple(classes) if y is not None else None)


def array(path: str, key: str = "x", labels_key: str = "y", levels: int | None = None,
          value_range: str = "auto") -> ArrayDataset:
    """A .npy array or a .npz with ``key`` (and optional ``labels_key``), [N, C, H, W] or [N, D].

    ``value_range``: "auto" maps uint8 from [0, 255] and leaves floats as they are (expected in
    [-1, 1]); "0,1" and "0,255" rescale floats from those ranges.
    """
    p = Path(path)
    if not p.is_file():
        raise ToolkitError(f"array dataset: no such file {path!r}")
    y = None
    try:
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as data:
                if key not in data:
                    raise ToolkitError(f"array dataset: {path!r} has no array {key!r} (has {', '.join(data.files)})")
                x = data[key]
                if labels_key in data:
                    y = data[labels_key]
        else:
            x = np.load(p, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ToolkitError(f"array dataset: cannot read {path!r}: {exc}") from exc
    if x.ndim not in (2, 3, 4):
        raise ToolkitError(f"array dataset: expected [N, D], [N, H, W] or [N, C, H, W], got shape {x.shape}")
    if x.ndim == 3:
        x = x[:, None]
    if x.dtype == np.uint8:
        levels = levels or 256
        if int(x.max()) >= levels:
            raise ToolkitError(f"array dataset: values up to {int(x.max())} do not fit levels={levels}")
        xt = levels_to_unit(torch.from_numpy(x.astype(np.int64)), levels)
    else:
        xt = torch.from_numpy(np.asarray(x, dtype=np.float32))
        if value_range == "0,1":
            xt = xt * 2 - 1
        elif value_range == "0,255":
            xt = xt / 127.5 - 1
        elif value_range != "auto":
            raise ToolkitError(f"array dataset: value_range must be auto, 0,1 or 0,255, not {value_range!r}")
    yt = num_classes = None
    if y is not None:
        if not np.issubdtype(y.dtype, np.integer):
            raise ToolkitError("array dataset: labels must be integers")
        yt = torch.from_numpy(y.astype(np.int64))
        if len(yt) and not 0 <= int(yt.min()) <= int(yt.max()) < limits.MAX_CLASSES:
            bad = int(yt.min()) if int(yt.min()) < 0 else int(yt.max())
            raise ToolkitError(f"array dataset: labels must lie in 0..{limits.MAX_CLASSES - 1}, found {bad}")
        num_classes = int(yt.max()) + 1 if len(yt) else None
    return ArrayDataset(f"array:{p.stem}", xt.contiguous(), yt, num_classes, levels)


TOY_MAX = 10_000_000  # points of a 2-D toy (160 MB as float64 while it is made)


def _toy_options(name: str, n: int, seed: int, **scales: float) -> None:
    """The toys' options checked before any point is drawn."""
    limits.integer(f"{name}: n", n, 2, TOY_MAX)
    limits.integer(f"{name}: seed", seed, 0, 2**63 - 1)
    for key, value in scales.items():
        limits.number(f"{name}: {key}", value, 0.0)


def _toy(name: str, points: np.ndarray) -> ArrayDataset:
    x = torch.from_numpy(points.astype(np.float32))
    x = (x - x.mean(0)) / x.std(0)  # unit variance per dimension, like the data the schedule assumes
    return ArrayDataset(name, x)


def moons(n: int = 8000, noise: float = 0.05, seed: int = 0) -> ArrayDataset:
    """Two interleaving half circles (as scikit-learn's make_moons)."""
    _toy_options("moons", n, seed, noise=noise)
    rng = np.random.default_rng(seed)
    n_out = n // 2
    a = np.linspace(0, math.pi, n_out)
    b = np.linspace(0, math.pi, n - n_out)
    pts = np.concatenate([np.stack([np.cos(a), np.sin(a)], 1),
                          np.stack([1 - np.cos(b), 1 - np.sin(b) - 0.5], 1)])
    return _toy("moons", pts + rng.normal(scale=noise, size=pts.shape))


def swissroll(n: int = 8000, noise: float = 0.3, seed: int = 0) -> ArrayDataset:
    """The 2-D Swiss roll: t·(cos t, sin t) for t in [1.5π, 4.5π]."""
    _toy_options("swissroll", n, seed, noise=noise)
    rng = np.random.default_rng(seed)
    t = 1.5 * math.pi * (1 + 2 * rng.random(n))
    pts = np.stack([t * np.cos(t), t * np.sin(t)], 1)
    return _toy("swissroll", pts + rng.normal(scale=noise, size=pts.shape))


def gaussians8(n: int = 8000, radius: float = 2.0, std: float = 0.02, seed: int = 0) -> ArrayDataset:
    """Eight Gaussians on a circle, labelled by mode (a class-conditional toy)."""
    _toy_options("gaussians8", n, seed, std=std)
    limits.number("gaussians8: radius", radius, 1e-9)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 8, n)
    angle = y * (2 * math.pi / 8)
    centres = radius * np.stack([np.cos(angle), np.sin(angle)], 1)
    pts = (centres + rng.normal(scale=std * radius, size=centres.shape)) / radius
    return ArrayDataset("gaussians8", torch.from_numpy(pts.astype(np.float32)),
                        torch.from_numpy(y.astype(np.int64)), num_classes=8)


@hookimpl
def register_datasets(register):
    register("digits", digits)
    register("folder", folder)
    register("array", array, aliases=("npy", "npz"))
    register("moons", moons)
    register("swissroll", swissroll)
    register("gaussians8", gaussians8)
