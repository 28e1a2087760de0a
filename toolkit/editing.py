"""Editing with a deterministic sampler: DDIM inversion (data → x_T), spherical interpolation of inverted
x_T (the DDIM paper's §5.3), and img2img (SDEdit, Meng et al. 2022: noise the input to t = s·T, denoise)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterator

import attrs
import numpy as np
import torch
from torch import Tensor

from toolkit import diffusion, optional
from toolkit.errors import ToolkitError
from toolkit.noise import NoiseStreams
from toolkit.protocols import ClipsX0, Invertible

RANGE_SLACK = 1e-3  # images must lie in [-1, 1] (the data convention), up to rounding


def check_images(x: Any, shape: tuple[int, ...], what: str = "image") -> Tensor:
    """Images [N, *shape] float in [-1, 1] and finite; one image [*shape] becomes [1, *shape]."""
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
    if tuple(x.shape) == tuple(shape):
        x = x[None]
    if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != tuple(shape) or x.shape[0] < 1:
        raise ToolkitError(f"{what} must have shape {list(shape)} or [N, {', '.join(map(str, shape))}], "
                           f"got {list(x.shape)}")
    if not x.is_floating_point():
        raise ToolkitError(f"{what} must be floating point in [-1, 1], got {x.dtype}")
    x = x.float()
    if not bool(torch.isfinite(x).all()):
        raise ToolkitError(f"{what} has NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1 - RANGE_SLACK or hi > 1 + RANGE_SLACK:
        raise ToolkitError(f"{what} values must lie in [-1, 1] (the data convention), got [{lo:.3g}, {hi:.3g}]")
    return x.clamp(-1, 1)


def read_npy(path: Path, what: str) -> np.ndarray:
    """A .npy file's array (never a pickle), or one line saying it is not readable."""
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ToolkitError(f"{what} {str(path)!r} is not a readable .npy array ({exc})") from None


def load_images(path: str | os.PathLike, shape: tuple[int, ...], what: str = "--input") -> Tensor:
    """A .npy array [N, *shape] (or one [*shape]) in [-1, 1], or a grayscale/RGB PNG of one image (0..255)."""
    path = Path(path)
    if not path.is_file():
        raise ToolkitError(f"{what} {str(path)!r} does not exist")
    if path.suffix.lower() == ".npy":
        return check_images(read_npy(path, what), shape, what)
    if path.suffix.lower() == ".png":
        from PIL import Image, UnidentifiedImageError

        try:
            img = Image.open(path)
            img = img.convert("L" if shape[0] == 1 else "RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise ToolkitError(f"{what} {str(path)!r} is not a readable PNG ({exc})") from None
        if img.size != (shape[2], shape[1]):
            raise ToolkitError(f"{what} {str(path)!r} is {img.size[0]}×{img.size[1]} pixels, the model's images "
                               f"are {shape[2]}×{shape[1]}")
        arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        return check_images(arr, shape, what)
    raise ToolkitError(f"{what} must be a .npy or .png file, got {str(path)!r}")


def load_noise(path: str | os.PathLike, shape: tuple[int, ...], what: str = "--noise") -> Tensor:
    """x_T from a .npy [N, *shape] (what `toolkit invert` writes): float and finite, any range."""
    path = Path(path)
    if path.suffix.lower() != ".npy" or not path.is_file():
        raise ToolkitError(f"{what} must be an existing .npy file, got {str(path)!r}")
    x = torch.from_numpy(read_npy(path, what))
    if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != tuple(shape) or len(x) < 1:
        raise ToolkitError(f"{what} must have shape [N, {', '.join(map(str, shape))}], got {list(x.shape)}")
    if not x.is_floating_point() or not bool(torch.isfinite(x).all()):
        raise ToolkitError(f"{what} must hold finite floating-point values")
    return x.float()


def check_strength(strength: Any) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ToolkitError(f"strength must lie in (0, 1], got {strength!r}")
    return float(strength)


def _encode(pipe, x: Tensor) -> Tensor:
    """Images → the space the model samples (the autoencoder's scaled latents for a latent pipeline)."""
    if pipe.latent is None:
        return x.to(pipe.device)
    with torch.no_grad():
        return pipe.latent.encode(x.to(pipe.device))


@torch.no_grad()
def invert(pipe, x0: Any, labels: Any = None, *, scale: Any = None, batch_size: int | None = None) -> Tensor:
    """x_T [N, *sample_shape] of images x0 [N, *output_shape]: the pipeline's deterministic sampler run backwards
    (DDIM η = 0 inversion); sampling from it (``Pipeline.sample(noise=x_T)``) gives the images back."""
    from toolkit.sampling import run_plan

    sampler = pipe.sampler
    name = optional.name(sampler)
    if optional.stochastic(sampler):
        raise ToolkitError(f"sampler {name!r} is stochastic: only a deterministic sampler can be inverted "
                           "(ddim with eta=0)")
    if not isinstance(sampler, Invertible):
        raise ToolkitError(f"sampler {name!r} cannot run backwards: invert with ddim (eta=0)")
    if pipe.mean_shift:
        raise ToolkitError("classifier guidance on the mean (ddpm) cannot be inverted")
    if isinstance(sampler, ClipsX0) and attrs.has(type(sampler)):
        guard = {"threshold": 0.0} if "threshold" in attrs.fields_dict(type(sampler)) else {}
        sampler = attrs.evolve(sampler, clip_x0=False, **guard)  # clipping or thresholding x̂_0 is not invertible
    x0 = check_images(x0, pipe.output_shape, "images")
    n = x0.shape[0]
    y = pipe.check_labels(n, labels)
    plan = sampler.inverse_plan(pipe.schedule, pipe.steps)
    bs = batch_size or pipe.batch_size
    out = []
    for start in range(0, n, bs):
        stop = min(n, start + bs)
        yb = y[start:stop].to(pipe.device) if y is not None else None
        sb = _scale_slice(scale, start, stop)
        out.append(run_plan(sampler, pipe.model_fn(yb, None if sb is None else sb.to(pipe.device)), plan,
                            _encode(pipe, x0[start:stop])).cpu())
    return torch.cat(out)


def _scale_slice(scale: Any, start: int, stop: int) -> Tensor | None:
    """The guidance scales of samples start..stop-1: one number for all, or one per sample."""
    if scale is None:
        return None
    s = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
    return s[start:stop] if s.numel() > 1 else s.expand(stop - start)


def slerp(a: Tensor, b: Tensor, w: float) -> Tensor:
    """Spherical interpolation of two x_T (per sample, over all their values), as the DDIM paper does: a
    Gaussian x_T keeps its norm, which a straight line between two of them would shrink."""
    fa, fb = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    cos = (fa * fb).sum(1) / (fa.norm(dim=1) * fb.norm(dim=1))
    theta = torch.arccos(cos.clamp(-1, 1)).reshape(-1, *([1] * (a.ndim - 1)))
    small = theta.abs() < 1e-6
    sin = torch.sin(theta).clamp(min=1e-12)
    out = torch.where(small, (1 - w) * a.double() + w * b.double(),
                      (torch.sin((1 - w) * theta) * a.double() + torch.sin(w * theta) * b.double()) / sin)
    return out.to(a.dtype)


@torch.no_grad()
def interpolate(pipe, a: Any, b: Any, frames: int, labels: Any = None, *, scale: Any = None) -> Tensor:
    """``frames`` images from a to b: invert both, interpolate their x_T spherically, sample each."""
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 2:
        raise ToolkitError(f"frames must be an integer >= 2, got {frames!r}")
    xa = check_images(a, pipe.output_shape, "image A")[:1]
    xb = check_images(b, pipe.output_shape, "image B")[:1]
    y = None if labels is None else pipe.check_labels(1, labels)
    z = invert(pipe, torch.cat([xa, xb]), None if y is None else y.repeat(2), scale=scale)
    x_T = torch.cat([slerp(z[:1], z[1:], k / (frames - 1)) for k in range(frames)])
    return pipe.sample(frames, labels=None if y is None else y.repeat(frames), noise=x_T, scale=scale)


def truncated(pipe, strength: float):
    """The pipeline over the first ⌈s·T⌉ timesteps of its schedule, with about s × its steps: every sampler
    then starts at noise level s (its own grid over the shorter schedule, first-order start included; a listed
    spacing keeps the times it lists below the start)."""
    from toolkit.sampling import format_listed, listed_grid
    from toolkit.schedule import schedule_from_betas

    strength = check_strength(strength)
    T = pipe.schedule.num_timesteps
    T_start = max(1, min(T, math.ceil(strength * T)))
    steps = max(1, min(T_start, round(strength * pipe.steps)))
    sampler = pipe.sampler
    listed = listed_grid(optional.option(sampler, "spacing"))
    if listed is not None and T_start < T:  # a listed grid: its own times below the new start
        keep = (listed[0] < T_start) & (listed[1] < T_start)
        if not keep.any():
            raise ToolkitError(f"strength {strength} starts at t = {T_start - 1}, below every time the spacing lists")
        if not attrs.has(type(sampler)):
            raise ToolkitError(f"img2img with a listed spacing needs a sampler whose options attrs can change; "
                               f"{optional.name(sampler)!r} is not one")
        sampler = attrs.evolve(sampler, spacing=format_listed(listed[0][keep], listed[1][keep]))
        steps = int(keep.sum())
    schedule = pipe.schedule if T_start == T else schedule_from_betas(
        f"{pipe.schedule.name}[:{T_start}]", pipe.schedule.betas[:T_start])
    train = pipe.train_schedule if pipe.train_schedule is not None else pipe.schedule
    return attrs.evolve(pipe, schedule=schedule, sampler=sampler, steps=int(steps), train_schedule=train)


@torch.no_grad()
def edit_batches(pipe, x0: Any, strength: float, seed: int = 0, labels: Any = None, *, scale: Any = None,
                 batch_size: int | None = None, progress=None) -> Iterator[Tensor]:
    """img2img (SDEdit): each image noised to the first time of the truncated run, x = α x_0 + σ ε (ε: draw 0
    of sample i's stream, as x_T would be), then denoised by the pipeline's sampler and guidance."""
    short = truncated(pipe, strength)
    x0 = check_images(x0, pipe.output_shape, "--init")
    n = x0.shape[0]
    t0 = short.plan.t_x[:1].double()
    a = diffusion.alpha_bar(short.schedule, t0, torch.zeros(1), torch.float64).reshape(())
    y = None if labels is None else short.check_labels(n, labels)
    bs = batch_size or pipe.batch_size
    for start in range(0, n, bs):
        stop = min(n, start + bs)
        z = _encode(pipe, x0[start:stop]).cpu()
        eps = NoiseStreams(seed, range(start, stop), tuple(pipe.sample_shape)).at(0)
        x_start = (a.sqrt() * z.double() + (1 - a).sqrt() * eps.double()).float()
        yb = None if y is None else y[start:stop]
        yield from short.batches(stop - start, seed, yb, noise=x_start, scale=_scale_slice(scale, start, stop),
                                 offset=start, batch_size=stop - start, progress=progress)


def edit(pipe, x0: Any, strength: float, seed: int = 0, labels: Any = None, **kw: Any) -> Tensor:
    """All edited images at once: see ``edit_batches``."""
    return torch.cat(list(edit_batches(pipe, x0, strength, seed, labels, **kw)))
