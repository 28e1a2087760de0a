"""Write a data set out as a folder of PNG images (sub-folders by class) or one .npz array: the inputs
the folder and array data sets read back, e.g. to try `--dataset DIR/` on real files."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from toolkit.data import ArrayDataset
from toolkit.errors import ToolkitError

FORMATS = ("png", "npz")


def export_dataset(data: ArrayDataset, out: str | os.PathLike, fmt: str = "png") -> Path:
    """``data`` as PNG files under the new folder ``out`` (``out/<class>/00000.png``), or as ``out.npz``
    (x float32 in [-1, 1], y). Never writes into or over anything that exists: a new path only."""
    if fmt not in FORMATS:
        raise ToolkitError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise ToolkitError(f"{str(out)!r} already exists; give a new path (nothing is ever written over)")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ToolkitError(f"output folder {str(parent)!r} does not exist")
    if fmt == "npz":
        if out.suffix != ".npz":
            raise ToolkitError(f"--format npz writes a .npz file, not {str(out)!r}")
        from toolkit.files import atomic_write

        arrays = {"x": data.x.numpy().astype(np.float32)}
        if data.y is not None:
            arrays["y"] = data.y.numpy().astype(np.int64)
        atomic_write(out, lambda tmp: np.savez(open(tmp, "wb"), **arrays))
        return out
    if data.x.ndim != 4 or data.x.shape[1] not in (1, 3):
        raise ToolkitError(f"dataset {data.name!r} holds samples of shape {tuple(data.x.shape[1:])}, not images "
                           "with 1 or 3 channels: use --format npz")
    from PIL import Image

    pixels = ((data.x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).numpy()
    names = data.class_names or (tuple(str(k) for k in range(data.num_classes)) if data.num_classes else None)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    try:
        for i, img in enumerate(pixels):
            folder = tmp / names[int(data.y[i])] if data.y is not None and names else tmp
            folder.mkdir(exist_ok=True)
            mode = "L" if img.shape[2] == 1 else "RGB"
            Image.fromarray(img[:, :, 0] if mode == "L" else img, mode).save(folder / f"{i:05d}.png")
        os.chmod(tmp, 0o777 & ~_umask())
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
