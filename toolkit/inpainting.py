"""Inpainting with any v2 sampler: RePaint (Lugmayr et al. 2022) — the known region replaced between steps by the
data noised to the next noise level, with resampling jumps that re-noise a block of steps and run it again.

``Inpaint`` wraps a sampler the way ``MeanShifted`` does: the wrapped sampler does not know it is inpainting.
Its plan repeats the wrapped plan's rows (a block of ``jump`` iterations ``resample`` times), so the toolkit's
one loop runs it and the exporter builds the same ONNX Loop, with ``image`` and ``mask`` as graph inputs.

Mask convention (diffusers'): 1 = fill in (generated), 0 = keep (the given image).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
from attrs import define, evolve, field

from toolkit.errors import ToolkitError

if TYPE_CHECKING:  # torch is imported where it is used: the CLI reads this module's defaults without it
    from torch import Tensor

    from toolkit.protocols import ModelFn, Sampler, Schedule

MASKS = ("lower-half", "upper-half", "left-half", "right-half", "center")
DEFAULT_RESAMPLE = 5  # RePaint uses r = 10, j = 10 over 250 DDPM steps; these suit the default 50-step runs
DEFAULT_JUMP = 5
PREFIX = "inpaint:"  # the wrapper's own plan tables (the wrapped sampler's keep their names)


def _positive(instance, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ToolkitError(f"{attribute.name} must be a positive integer, got {value!r}")


def alpha_bar_at(schedule: Schedule, t: np.ndarray) -> np.ndarray:
    """ᾱ at (fractional) sampling times t, float64: the schedule's value at integer t, λ interpolated between
    them (as ``sampling.grid``), 1 at t < 0 (the clean end)."""
    from toolkit.sampling import alpha_sigma, log_snr_at

    t = np.asarray(t, dtype=np.float64)
    alpha, _ = alpha_sigma(log_snr_at(schedule, t))
    out = alpha ** 2
    a = schedule.alphas_cumprod.detach().cpu().double().numpy()
    whole = (t >= 0) & (t == np.round(t))
    out[whole] = a[t[whole].astype(np.int64)]
    out[t < 0] = 1.0
    return out


def repaint_rows(iterations: int, resample: int, jump: int) -> list[tuple[int, bool, bool, int]]:
    """RePaint's time schedule over the wrapped plan's iterations: (iteration, save the state, jump back after it,
    the iteration it jumps back to). Iterations 0..n-2 go in blocks of ``jump``, each run ``resample`` times
    (jumping back to the block's start after each run but the last); the final step to the clean data runs once."""
    rows: list[tuple[int, bool, bool, int]] = []
    body = iterations - 1
    for start in range(0, body, jump):
        block = list(range(start, min(start + jump, body)))
        for rep in range(resample):
            for k in block:
                rows.append((k, k == block[0], k == block[-1] and rep < resample - 1, block[0]))
    rows.append((iterations - 1, iterations == 1, False, iterations - 1))
    return rows


@define(frozen=True)
class Inpaint:
    """A sampler that inpaints: after every step x ← m·x + (1-m)·(√ᾱ' x_0 + √(1-ᾱ') z) at the step's next noise
    level ᾱ' (RePaint eq. 8-9), and after each block of ``jump`` iterations but the last of ``resample`` runs,
    x ← √(ᾱ_b/ᾱ') x + √(1-ᾱ_b/ᾱ') z back to the block's first noise level ᾱ_b (q(x_b | x'), the jump),
    with the wrapped sampler's state restored to what it was there.

    ``image`` [B, *shape] is the known data (in the model's space) and ``mask`` [B, *shape] is 1 where the
    sample is generated; both may be None while only planning. resample = 1 is plain replacement.
    """

    base: Sampler
    image: Tensor | None = None
    mask: Tensor | None = None
    resample: int = field(default=DEFAULT_RESAMPLE, validator=_positive)
    jump: int = field(default=DEFAULT_JUMP, validator=_positive)

    @property
    def name(self) -> str:
        from toolkit import optional

        return optional.name(self.base)

    def bind(self, image: Tensor, mask: Tensor) -> "Inpaint":
        """The same sampler over a batch's known data and mask."""
        return evolve(self, image=image, mask=mask)

    def plan(self, schedule: Schedule, steps: int):
        import torch

        from toolkit import optional
        from toolkit.sampling import Plan, as_v2

        if optional.option(self.base, "rebuilds_x_from_history", False):
            raise ToolkitError(f"sampler {self.name!r} rebuilds x from its own history at every step, so the known "
                               "region injected between steps would be lost: inpaint with ddim, ddpm, dpmpp-2m, heun "
                               "or euler-a")
        per_step = int(optional.option(self.base, "iterations_per_step", 1))
        if self.resample > 1 and self.jump % per_step:
            raise ToolkitError(f"sampler {self.name!r} takes {per_step} loop iterations per step, so --jump must be a "
                               f"multiple of {per_step} for every resampling block to start at a step, got {self.jump}")
        base = as_v2(self.base).plan(schedule, steps)
        n = len(base)
        if n < 1:
            raise ToolkitError("inpainting needs a plan with at least one iteration")
        rows = repaint_rows(n, self.resample, self.jump)
        idx = torch.tensor([r[0] for r in rows])
        t = base.t_x.numpy()  # the noise levels x stands at (the network may be told shifted times)
        t_next = base.tables["t_next"].numpy() if "t_next" in base.tables else np.append(t[1:], -1.0)
        a_next = alpha_bar_at(schedule, t_next)
        back = alpha_bar_at(schedule, t[[r[3] for r in rows]]) / a_next[idx.numpy()]
        tables = {k: v[idx] for k, v in base.tables.items()}
        tables |= {
            PREFIX + "save": np.array([float(r[1]) for r in rows]),
            PREFIX + "jump": np.array([float(r[2]) for r in rows]),
            PREFIX + "sqrt_a": np.sqrt(a_next[idx.numpy()]),  # the known data at the step's next level
            PREFIX + "sqrt_1ma": np.sqrt(1 - a_next[idx.numpy()]),
            PREFIX + "back_x": np.sqrt(np.minimum(back, 1.0)),  # q(x_b | x') = N(√(ᾱ_b/ᾱ') x', 1 - ᾱ_b/ᾱ')
            PREFIX + "back_z": np.sqrt(np.clip(1 - back, 0, None)),
        }
        return Plan(t=base.t[idx], t_x=base.t_x[idx], steps=base.steps, tables=tables, nfe_per_step=base.nfe_per_step,
                    draws_per_step=base.draws_per_step + 2, schedule=schedule)  # + the known data's z, the jump's z

    def init_state(self, x_T: Tensor, plan) -> tuple[Tensor, ...]:
        from toolkit.sampling import as_v2

        state = tuple(as_v2(self.base).init_state(x_T, plan))
        return (*state, *(s.clone() for s in state))  # (current, saved at the block's start)

    def step(self, model_fn: ModelFn, x: Tensor, state: tuple, i: Tensor, plan, noise: Tensor | None):
        import torch

        from toolkit.sampling import as_v2

        if self.image is None or self.mask is None:
            raise ToolkitError("Inpaint.step needs the known image and mask: call bind(image, mask) first")
        base = as_v2(self.base)
        k = len(state) // 2
        current, saved = tuple(state[:k]), tuple(state[k:])
        save = plan[PREFIX + "save"][i] > 0
        saved = tuple(torch.where(save, c, s) for c, s in zip(current, saved))
        D = plan.draws_per_step - 2  # the wrapped sampler's draws come first
        x_next, new = base.step(model_fn, x, current, i, plan, noise[:D] if D else None)
        known = plan[PREFIX + "sqrt_a"][i] * self.image + plan[PREFIX + "sqrt_1ma"][i] * noise[D]
        x_next = self.mask * x_next + (1 - self.mask) * known
        jump = plan[PREFIX + "jump"][i] > 0
        back = plan[PREFIX + "back_x"][i] * x_next + plan[PREFIX + "back_z"][i] * noise[D + 1]
        x_next = torch.where(jump, back, x_next)
        new = tuple(torch.where(jump, s, n_) for s, n_ in zip(saved, new))
        return x_next, (*new, *saved)


# ---------------------------------------------------------------- masks


def named_mask(name: str, shape: tuple[int, ...]) -> Tensor:
    """A fill mask [*shape] by name: the lower/upper/left/right half or the center (the middle half each way)."""
    import torch

    C, H, W = shape[0], shape[-2], shape[-1]
    m = torch.zeros(H, W)
    if name == "lower-half":
        m[H // 2:] = 1
    elif name == "upper-half":
        m[:H - H // 2] = 1
    elif name == "left-half":
        m[:, :W - W // 2] = 1
    elif name == "right-half":
        m[:, W // 2:] = 1
    elif name == "center":
        m[H // 4:H - H // 4, W // 4:W - W // 4] = 1
    else:
        raise ToolkitError(f"unknown mask {name!r}: give a .npy or .png file or one of {', '.join(MASKS)}")
    return m.expand(C, H, W).clone()


def check_mask(mask: Any, shape: tuple[int, ...], n: int) -> Tensor:
    """A fill mask as [n, *shape] float of 0/1 (1 = generate): one mask [H, W], [1, H, W] or [*shape] for all
    n images, or one per image [n, ...]."""
    import torch

    m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
    C, H, W = shape
    if m.dtype == torch.bool:
        m = m.to(torch.float32)
    if not (m.is_floating_point() or m.dtype in (torch.uint8, torch.int32, torch.int64)):
        raise ToolkitError(f"mask must hold numbers 0 and 1, got {m.dtype}")
    per_image = m.ndim == 4 or (m.ndim == 3 and m.shape[0] == n and n > 1 and C != n)
    if not per_image:
        m = m[None]
    if m.ndim == 3:  # [N, H, W]
        m = m[:, None]
    if m.ndim != 4 or tuple(m.shape[-2:]) != (H, W) or m.shape[1] not in (1, C) or m.shape[0] not in (1, n):
        raise ToolkitError(f"mask must have shape [{H}, {W}], [1 or {C}, {H}, {W}] or one per image "
                           f"[{n}, 1 or {C}, {H}, {W}], got {list(torch.as_tensor(mask).shape)}")
    m = m.to(torch.float32)
    if not bool(((m == 0) | (m == 1)).all()):
        bad = m[(m != 0) & (m != 1)].flatten()[0].item()
        raise ToolkitError(f"mask must be binary (1 = fill in, 0 = keep), found the value {bad:g}")
    return m.expand(n, C, H, W).contiguous()


def load_mask(spec: str | os.PathLike, shape: tuple[int, ...], n: int, what: str = "--mask") -> Tensor:
    """--mask: a name (lower-half, upper-half, left-half, right-half, center), a .npy of 0/1, or a PNG
    (white = fill in, black = keep; nothing in between)."""
    if str(spec) in MASKS:
        return check_mask(named_mask(str(spec), shape), shape, n)
    path = Path(spec)
    if path.suffix.lower() not in (".npy", ".png"):
        raise ToolkitError(f"{what} must be one of {', '.join(MASKS)} or a .npy/.png file, got {str(spec)!r}")
    if not path.is_file():
        raise ToolkitError(f"{what} {str(path)!r} does not exist")
    if path.suffix.lower() == ".npy":
        from toolkit.editing import read_npy

        return check_mask(read_npy(path, what), shape, n)
    from PIL import Image, UnidentifiedImageError

    try:
        arr = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as exc:
        raise ToolkitError(f"{what} {str(path)!r} is not a readable PNG ({exc})") from None
    return check_mask(arr, shape, n)


# ---------------------------------------------------------------- the run


def _space(pipe, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Known data and fill mask in the space the model samples: for a latent pipeline the encoded image and the
    mask max-pooled to the latent grid (a latent cell is kept only if all of its pixels are)."""
    import torch

    if pipe.latent is None:
        return image.to(pipe.device), mask.to(pipe.device)
    z = pipe.latent.encode(image.to(pipe.device))
    m = torch.nn.functional.adaptive_max_pool2d(mask.amax(1, keepdim=True).to(pipe.device), z.shape[-2:])
    return z, m.expand_as(z).contiguous()


def sampler(pipe, resample: int = DEFAULT_RESAMPLE, jump: int = DEFAULT_JUMP) -> Inpaint:
    """The pipeline's sampler wrapped for inpainting (checked: it must have plugin API 2)."""
    from toolkit import optional
    from toolkit.sampling import is_v2

    if not is_v2(pipe.sampler):
        raise ToolkitError(f"sampler {optional.name(pipe.sampler)!r} uses plugin API 1: inpainting needs plugin API 2 "
                           "(plan, init_state, step)")
    return Inpaint(pipe.sampler, resample=resample, jump=jump)


def inpaint_batches(pipe, image: Any, mask: Any, seed: int = 0, labels: Any = None, *, scale: Any = None,
                    resample: int = DEFAULT_RESAMPLE, jump: int = DEFAULT_JUMP, batch_size: int | None = None,
                    progress=None) -> Iterator[Tensor]:
    """Inpainted images [B, *output_shape] batch by batch: sample i fills image i where mask i is 1, with x_T
    and its step noise from stream i of ``seed`` (as ``Pipeline.sample``); the kept pixels are the image's."""
    import torch

    from toolkit.editing import check_images

    wrapper = sampler(pipe, resample, jump)
    image = check_images(image, pipe.output_shape, "image")
    n = image.shape[0]
    mask = check_mask(mask, pipe.output_shape, n)
    y = pipe.check_labels(n, labels)
    plan = wrapper.plan(pipe.schedule, pipe.steps)
    bs = batch_size or pipe.batch_size
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise ToolkitError(f"batch_size must be a positive integer, got {bs!r}")
    return torch.no_grad()(_run)(pipe, wrapper, plan, image, mask, y, seed, scale, bs, progress)


def _run(pipe, wrapper, plan, image, mask, y, seed, scale, bs, progress) -> Iterator[Tensor]:
    import torch

    from toolkit.editing import _scale_slice
    from toolkit.noise import NoiseStreams
    from toolkit.sampling import run_plan, stream_noise_fn

    n = image.shape[0]
    for start in range(0, n, bs):
        stop = min(n, start + bs)
        streams = NoiseStreams(seed, range(start, stop), pipe.sample_shape, pipe.device)
        x_T = streams.draw()
        yb = None if y is None else y[start:stop].to(pipe.device)
        sb = _scale_slice(scale, start, stop)
        sb = None if sb is None else sb.to(pipe.device)
        known, fill = _space(pipe, image[start:stop], mask[start:stop])
        run = evolve(wrapper, base=pipe.sampler_for(yb, sb)).bind(known, fill)
        x0 = run_plan(run, pipe.model_fn(yb, sb), plan, x_T,
                      noise_fn=stream_noise_fn(streams.draw, plan.draws_per_step), progress=progress)
        if pipe.latent is not None:
            x0 = pipe.latent.decode(x0)
        if not torch.isfinite(x0).all():
            raise ToolkitError("inpainting produced NaN or infinite values")
        m = mask[start:stop].to(x0.device)
        yield (m * x0.clamp(-1, 1) + (1 - m) * image[start:stop].to(x0.device)).cpu()


def inpaint(pipe, image: Any, mask: Any, seed: int = 0, labels: Any = None, **kw: Any) -> Tensor:
    """All inpainted images at once: see ``inpaint_batches``."""
    import torch

    return torch.cat(list(inpaint_batches(pipe, image, mask, seed, labels, **kw)))
