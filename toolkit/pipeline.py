"""A Pipeline: schedule + predictor + sampler (+ guidance), resolved by name through the registry."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch
import attrs
from attrs import define, field
from torch import Tensor, nn

from toolkit import diffusion, limits, optional
from toolkit.errors import ToolkitError, parse_device
from toolkit.noise import NoiseStreams
from toolkit.protocols import (ChecksModel, GradientGuidance, Guidance, HasLogVariance, LatentAware, ModelFn,
                                NoisePredictor, Sampler, Schedule)
from toolkit.registry import create, missing_attributes

if TYPE_CHECKING:
    from toolkit.sampling import Plan

DEFAULT_MODEL = "digits"


def _same_schedule(a: Schedule, b: Schedule) -> bool:
    return a.num_timesteps == b.num_timesteps and bool(np.allclose(  # numpy: no tracing of constants on export
        a.alphas_cumprod.detach().cpu().double().numpy(), b.alphas_cumprod.detach().cpu().double().numpy(),
        rtol=1e-10, atol=1e-12))


@define(frozen=True)
class Pipeline:
    """Everything one sampling run needs; ``sample`` is the whole of it.

    ``train_schedule`` is the schedule the predictor was trained under (None: the same as
    ``schedule``). When they differ, the predictor is queried at the training time with the same
    log-SNR, so any schedule can sample any model.
    """

    schedule: Schedule
    predictor: NoisePredictor
    sampler: Sampler
    steps: int
    guidance: Guidance | None = None
    latent: Any = None
    train_schedule: Schedule | None = None
    device: torch.device = field(factory=lambda: torch.device("cpu"), converter=torch.device)
    batch_size: int = 500
    config: dict[str, Any] = field(factory=dict)
    cuda_graphs: bool = False  # the torch loop captured as one CUDA graph per batch size (toolkit.cuda_graphs)
    _graphed: dict[int, Any] = field(factory=dict, init=False, eq=False, repr=False)  # batch size → GraphedLoop

    @property
    def plan(self) -> "Plan":
        """The sampler's plan for this run (time grid, per-step tables, network calls, noise draws)."""
        from toolkit.sampling import sampler_plan

        return sampler_plan(self.sampler, self.schedule, self.steps)

    @property
    def timesteps(self) -> Tensor:
        """The sampling-schedule times at which the loop's iterations call the model (float64; descending unless a
        listed spacing tells the network shifted times: ``plan.t_x`` holds the times x stands at)."""
        return self.plan.t

    @property
    def nfe(self) -> int:
        """Network calls per sample (each cfg call evaluates the network on two rows)."""
        return self.plan.nfe

    @property
    def iterations(self) -> int:
        """Loop iterations of one run (progress ticks per batch)."""
        return len(self.plan)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.predictor.sample_shape)

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Shape of one returned sample: the data's (decoded) for a latent pipeline, else sample_shape."""
        return tuple(self.latent.data_shape) if self.latent is not None else self.sample_shape

    @property
    def value_range(self) -> tuple[float, float] | None:
        """The range samples are clamped to: (-1, 1) for images; None for data with no fixed range (its checkpoint
        records data.range null, e.g. standardized 2-D toys), whose samples are returned as they come."""
        return None if _no_fixed_range(self.config) else (-1.0, 1.0)

    @property
    def num_classes(self) -> int | None:
        """Labels accepted: the guidance's (a classifier's classes) or the predictor's."""
        if optional.guidance_classes(self.guidance) is not None:
            return self.guidance.num_classes
        return self.predictor.num_classes

    @property
    def mean_shift(self) -> bool:
        """Guidance applied to the mean with the sampler's Σ (Algorithm 1) rather than in ε-space."""
        from toolkit.sampling import is_v2

        return (isinstance(self.guidance, GradientGuidance) and isinstance(self.sampler, HasLogVariance)
                and is_v2(self.sampler))

    def model_times(self) -> Tensor | None:
        """Training-schedule time for each sampling-schedule t (None when the schedules agree)."""
        if self.train_schedule is None or _same_schedule(self.schedule, self.train_schedule):
            return None
        return diffusion.model_time(diffusion.log_snr(self.train_schedule), diffusion.log_snr(self.schedule))

    def model_time_fn(self) -> Callable[[Tensor], Tensor]:
        """Sampling-schedule t → the time to query the predictor (and a classifier) at."""
        times = self.model_times()
        if times is None:
            return lambda t: t
        times = times.to(self.device, torch.float32)

        def to_model_time(t: Tensor) -> Tensor:
            return diffusion.interp(times, t) if t.is_floating_point() else times[t]

        return to_model_time

    def model_fn(self, labels: Tensor | None, scale: Tensor | float | None = None,
                 time_map: Callable[[Tensor], Tensor] | None = None) -> ModelFn:
        """(x_t, t) → ε (and the variance output) with time mapping, labels and ε-space guidance applied.

        ``time_map`` is a precomputed ``model_time_fn()`` (exporters build it once, outside the trace).
        """
        predictor = self.predictor
        if self.guidance is not None and not self.mean_shift:
            predictor = self.guidance.wrap(self.predictor, scale)
        elif self.guidance is not None:
            labels = None  # mean shift: the model itself samples unconditionally (∅)
        to_model_time = time_map or self.model_time_fn()
        prediction = optional.prediction(predictor)
        alpha_bar = diffusion.alpha_bar_fn(self.schedule, self.device) if prediction != "epsilon" else None

        def fn(x_t: Tensor, t: Tensor) -> Tensor:
            if t.ndim == 0:
                t = t.expand(x_t.shape[0])
            out = predictor(x_t, to_model_time(t), labels)
            if prediction == "epsilon":
                return out
            C = x_t.shape[1]
            head, rest = out[:, :C], out[:, C:]
            head = diffusion.eps_from_output(prediction, alpha_bar(t, x_t), x_t, head)
            return torch.cat([head, rest], dim=1) if rest.shape[1] else head

        return fn

    def sampler_for(self, labels: Tensor | None, scale: Tensor | float | None) -> Sampler:
        """The sampler, wrapped to add the mean shift Σ·s∇log p(y|x_t) when the guidance asks for it."""
        if not self.mean_shift:
            return self.sampler
        from toolkit.sampling import MeanShifted

        to_model_time = self.model_time_fn()
        guidance = self.guidance
        s = guidance.scale if scale is None else scale

        def gradient_fn(x_t: Tensor, t: Tensor) -> Tensor:
            return guidance.gradient(x_t, to_model_time(t), labels, s)

        return MeanShifted(self.sampler, gradient_fn)

    def check_labels(self, n: int, labels: int | Sequence[int] | Tensor | None) -> Tensor | None:
        """Labels as a [n] long tensor (cycled if shorter), the null label when None, checked in range."""
        y = self._label_cycle(n, labels)
        return None if y is None else y.repeat((n + y.numel() - 1) // y.numel())[:n]

    def _label_cycle(self, n: int, labels: int | Sequence[int] | Tensor | None) -> Tensor | None:
        """The labels checked but not expanded: sample i takes label i mod len (memory bounded by the input)."""
        K = self.num_classes
        if labels is None:
            if self.guidance is not None:
                raise ToolkitError(f"{self.guidance.name} guidance needs class labels (--class)")
            return None if K is None else torch.tensor([K], dtype=torch.long)
        if K is None:
            raise ToolkitError("this model is unconditional: it takes no class labels")
        y = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if y.numel() == 0:
            raise ToolkitError("labels must not be empty")
        if int(y.min()) < 0 or int(y.max()) >= K:
            bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
            raise ToolkitError(f"class label {bad} is out of range: this model has classes 0..{K - 1}")
        return y

    @torch.no_grad()
    def sample(
        self,
        n: int,
        seed: int = 0,
        labels: int | Sequence[int] | Tensor | None = None,
        noise: Tensor | None = None,
        *,
        scale: float | Sequence[float] | Tensor | None = None,
        offset: int = 0,
        batch_size: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Tensor:
        """n samples [n, *sample_shape] in [-1, 1]; sample i depends only on (seed, i, labels[i]).

        ``noise`` is an optional x_T of shape [n, *sample_shape]; the step noise still comes from
        the per-sample streams of ``seed``. ``scale`` overrides the guidance scale: one number, or
        one per sample (a guidance sweep in one batch). ``offset`` numbers this call's samples
        offset..offset+n-1, so shards of a large run reproduce a single run exactly.
        """
        return torch.cat(list(self.batches(n, seed, labels, noise, scale=scale, offset=offset,
                                           batch_size=batch_size, progress=progress)))

    def invert(self, x0: Any, labels: Any = None, **kw: Any) -> Tensor:
        """x_T of images x0 by running the deterministic sampler backwards (DDIM inversion); ``sample(noise=x_T)``
        gives the images back (``toolkit.editing.invert``)."""
        from toolkit import editing

        return editing.invert(self, x0, labels, **kw)

    def edit(self, x0: Any, strength: float, seed: int = 0, labels: Any = None, **kw: Any) -> Tensor:
        """img2img (SDEdit): noise images to level ``strength`` in (0, 1] and denoise them with this pipeline's
        sampler and guidance, e.g. towards ``labels`` (``toolkit.editing.edit``)."""
        from toolkit import editing

        return editing.edit(self, x0, strength, seed, labels, **kw)

    def inpaint(self, image: Any, mask: Any, seed: int = 0, labels: Any = None, **kw: Any) -> Tensor:
        """Fill in images where ``mask`` is 1 (RePaint: the known region replaced between steps, with resampling
        jumps ``resample`` × ``jump``), with this pipeline's sampler and guidance (``toolkit.inpainting.inpaint``)."""
        from toolkit import inpainting

        return inpainting.inpaint(self, image, mask, seed, labels, **kw)

    def interpolate(self, a: Any, b: Any, frames: int, labels: Any = None, **kw: Any) -> Tensor:
        """``frames`` images from a to b along the spherical path between their inverted x_T."""
        from toolkit import editing

        return editing.interpolate(self, a, b, frames, labels, **kw)

    def save(self, path: str | os.PathLike, n: int, seed: int = 0,
             labels: int | Sequence[int] | Tensor | None = None, *, nrow: int | None = None,
             batch_size: int | None = None, progress: Callable[[int], None] | None = None, **kwargs: Any) -> Path:
        """Sample n into ``path``: a .npy is written batch by batch (memory bounded by the batch, whatever n),
        a .png grid is refused beyond a size a viewer can open. Nothing is left at ``path`` on failure."""
        from toolkit.images import save_stream

        return save_stream(path, (n, *self.output_shape), lambda: self.batches(
            n, seed, labels, batch_size=batch_size, progress=progress, **kwargs), nrow=nrow)

    @torch.no_grad()
    def batches(
        self,
        n: int,
        seed: int = 0,
        labels: int | Sequence[int] | Tensor | None = None,
        noise: Tensor | None = None,
        *,
        scale: float | Sequence[float] | Tensor | None = None,
        offset: int = 0,
        batch_size: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Iterator[Tensor]:
        """The samples of :meth:`sample`, one batch at a time (on the CPU): what a large run streams to disk."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ToolkitError(f"n must be a positive integer, got {n!r}")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ToolkitError(f"offset must be a non-negative integer, got {offset!r}")
        shape = self.sample_shape
        if noise is not None and tuple(noise.shape) != (n, *shape):
            raise ToolkitError(f"noise must have shape {(n, *shape)}, got {tuple(noise.shape)}")
        y = self._label_cycle(n, labels)
        scales = None
        if scale is not None:
            if self.guidance is None:
                raise ToolkitError("scale given but the pipeline has no guidance")
            scales = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
            if scales.numel() not in (1, n):
                raise ToolkitError(f"scale must be one number or one per sample ({n}), got {scales.numel()}")
            if bool((scales < 0).any()):
                raise ToolkitError("guidance scale must not be negative")
        bs = batch_size or self.batch_size
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
            raise ToolkitError(f"batch_size must be a positive integer, got {bs!r}")
        bs = min(bs, n)
        limits.fits_memory(f"a batch of {bs} samples of shape {list(shape)}", 4 * bs * math.prod(shape) * 4,
                           "lower the batch size")
        return self._batches(n, seed, y, noise, scales, offset, bs, progress)

    @torch.no_grad()
    def _batches(self, n, seed, y, noise, scales, offset, bs, progress) -> Iterator[Tensor]:
        from toolkit.sampling import is_v2, run_plan, stream_noise_fn

        shape = self.sample_shape
        plan = self.plan if is_v2(self.sampler) else None
        for start in range(0, n, bs):
            stop = min(n, start + bs)
            streams = NoiseStreams(seed, range(offset + start, offset + stop), shape, self.device)
            x_T = streams.draw()
            if noise is not None:
                x_T = noise[start:stop].to(self.device, torch.float32)
            yb = y[torch.arange(start, stop) % y.numel()].to(self.device) if y is not None else None
            sb = (scales[start:stop] if scales.numel() > 1 else scales.expand(stop - start)).to(self.device) \
                if scales is not None else None
            if plan is not None and self.cuda_graphs:
                x0 = self._graphed_run(plan, streams, x_T, yb, sb)
                if progress is not None:
                    progress(len(plan))
            elif plan is not None:
                sampler = self.sampler_for(yb, sb)
                x0 = run_plan(sampler, self.model_fn(yb, sb), plan, x_T,
                              noise_fn=stream_noise_fn(streams.draw, plan.draws_per_step), progress=progress)
            else:  # plugin API 1: the sampler's own loop
                sampler = self.sampler_for(yb, sb)
                x0 = sampler.sample(self.model_fn(yb, sb), self.schedule, x_T, steps=self.steps,
                                    noise_fn=lambda i, s=streams: s.draw(), progress=progress)
                if not isinstance(x0, Tensor) or x0.shape != x_T.shape:
                    got = tuple(x0.shape) if isinstance(x0, Tensor) else type(x0).__name__
                    raise ToolkitError(f"sampler {sampler.name!r}: sample() returned {got}, expected {tuple(x_T.shape)}")
            if self.latent is not None:
                x0 = self.latent.decode(x0)
            if not torch.isfinite(x0).all():
                raise ToolkitError("sampling produced NaN or infinite values")
            yield (x0.clamp(*self.value_range) if self.value_range is not None else x0).cpu()

    def _graphed_run(self, plan: Plan, streams: NoiseStreams, x_T: Tensor, yb: Tensor | None,
                     sb: Tensor | None) -> Tensor:
        """One batch through the captured loop of its size (captured on first use); the step noise is drawn
        up front from the same streams, in the eager loop's order."""
        from toolkit.cuda_graphs import capture

        B = x_T.shape[0]
        graphed = self._graphed.get(B)
        if graphed is None:
            graphed = self._graphed[B] = capture(self, plan, B)
        D = plan.draws_per_step
        noise = torch.stack([torch.stack([streams.draw() for _ in range(D)]) for _ in range(len(plan))]) if D else None
        return graphed(x_T, noise, yb, sb)


def _resolve(kind: str, obj: Any, **options: Any) -> Any:
    if isinstance(obj, str):
        return create(kind, obj, **options)
    if options:
        raise ToolkitError(f"options {sorted(options)} apply only when the {kind} is given by name")
    return obj


def load_predictor(model: Any, device: torch.device | str = "cpu"
                   ) -> tuple[NoisePredictor, Schedule | None, dict[str, Any]]:
    """The predictor, its training schedule and config: from a checkpoint of any noise-predictor task (a path or a
    shipped name; None: the default model) or an object following the protocol."""
    from toolkit.checkpoint import load_checkpoint, network_kind

    device = parse_device(device)
    if model is None or isinstance(model, (str, os.PathLike)):
        ckpt = load_checkpoint(DEFAULT_MODEL if model is None else model, device=device)
        if network_kind(ckpt.kind) != "model":  # a noise predictor, from the built-in task or a plugin's
            raise ToolkitError(f"checkpoint {str(ckpt.path)!r} holds a {ckpt.kind} checkpoint, not a noise predictor")
        return ckpt.model, ckpt.schedule, ckpt.config
    missing = missing_attributes(model, NoisePredictor)
    if missing:
        raise ToolkitError(f"model does not follow the NoisePredictor protocol: missing {', '.join(missing)}")
    if isinstance(model, nn.Module):
        model.to(device).eval()
    return model, None, {}


def _no_fixed_range(config: dict[str, Any] | None) -> bool:
    """Whether a checkpoint records data.range null (standardized vectors such as moons); older checkpoints record
    no range: they are images in [-1, 1]."""
    data = (config or {}).get("data") or {}
    return "range" in data and data["range"] is None


def _unbounded_data(config: dict[str, Any], sampler: Sampler, options: dict[str, Any]) -> Sampler:
    """A model of data with no fixed range: x̂_0 is left unguarded by default, and a clip or threshold asked for
    without a clip_range is refused."""
    if not _no_fixed_range(config) or "clip_range" in options:
        return sampler  # images in [-1, 1], or the user chose a range for the guard
    asked = [k for k in ("clip_x0", "threshold") if k in options and optional.option(sampler, k)]
    if asked:
        name = config["data"].get("name") or "its data"
        raise ToolkitError(f"{asked[0]} guards x̂_0 to a range, but this model's data ({name}) has none (its values are "
                           "not confined to [-1, 1]): leave the guard off, or give clip_range=R")
    return attrs.evolve(sampler, clip_x0=False) if optional.clip_x0(sampler) else sampler


def _paired_latent(latent: Any, config: dict[str, Any], predictor: NoisePredictor, sampler: Sampler,
                   clip_given: bool, device: torch.device, range_given: bool = False) -> tuple[Any, Sampler]:
    """The autoencoder of a latent model (the one it records, or ``latent``, checked to be that one), and the
    sampler with x̂_0 clipping off unless the user set it."""
    from toolkit.latent import Latent, check_pairing, load_latent

    if latent is None:
        latent_obj = load_latent(config["latent"]["autoencoder"], device)
    else:
        latent_obj = latent if isinstance(latent, Latent) else load_latent(latent, device)
    if config:
        check_pairing(config, latent_obj)
    if tuple(latent_obj.sample_shape) != tuple(predictor.sample_shape):
        raise ToolkitError(f"the autoencoder's latents have shape {latent_obj.sample_shape}, the model "
                           f"samples {tuple(predictor.sample_shape)}")
    if optional.clip_x0(sampler) and not clip_given and attrs.has(type(sampler)):
        # latents are unit-variance, not confined to the data range [-1, 1]: clipping x̂_0 would distort them
        sampler = attrs.evolve(sampler, clip_x0=False)
    if latent_obj.range is not None and not range_given and attrs.has(type(sampler)) \
            and "clip_range" in attrs.fields_dict(type(sampler)):
        # a clip (clip_x0=true) or dynamic threshold the user asks for keeps x̂_0 within the real latents' range
        sampler = attrs.evolve(sampler, clip_range=latent_obj.range)
    return latent_obj, sampler


def _check_guidance(guidance: Guidance, predictor: NoisePredictor, latent: Any, train_schedule: Schedule) -> None:
    """A guidance trained on another data space (LatentAware), or that says it does not fit (ChecksModel), is refused."""
    if isinstance(guidance, LatentAware):

        def space(fp: str | None) -> str:
            return f"the latents of autoencoder {fp}" if fp else "the data"

        mine = latent.fingerprint if latent is not None else None
        if guidance.latent_fingerprint != mine:
            raise ToolkitError(f"the {guidance.name} guidance was trained on {space(guidance.latent_fingerprint)}, "
                               f"the model samples {space(mine)}")
    if isinstance(guidance, ChecksModel):
        guidance.check(predictor, train_schedule)


def compose(
    schedule: str | Schedule | None = None,
    sampler: str | Sampler = "ddim",
    guidance: str | Guidance | None = None,
    model: str | os.PathLike | NoisePredictor | None = None,
    *,
    steps: int | None = None,
    num_timesteps: int | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 500,
    schedule_options: dict[str, Any] | None = None,
    guidance_options: dict[str, Any] | None = None,
    latent: str | os.PathLike | Any | None = None,
    cuda_graphs: bool = False,
    **options: Any,
) -> Pipeline:
    """Build a Pipeline from plugin names (or objects); ``options`` go to the sampler (eta, spacing, ...).

    ``model``: a checkpoint directory, a shipped pretrained name ("digits", the default), or any
    object following the NoisePredictor protocol (e.g. your own nn.Module). ``schedule`` defaults
    to the model's training schedule. A latent model samples latents and decodes them with the
    autoencoder it was trained with; ``latent`` (an autoencoder checkpoint or a ``Latent``) pairs it
    explicitly, and must be that same autoencoder (checked by fingerprint). ``cuda_graphs`` (CUDA only)
    captures the whole sampling loop once per batch size and replays it (``toolkit.cuda_graphs``).
    """
    device = parse_device(device)
    if not isinstance(cuda_graphs, bool):
        raise ToolkitError(f"cuda_graphs must be True or False, got {cuda_graphs!r}")
    if cuda_graphs and device.type != "cuda":
        raise ToolkitError(f"CUDA graphs need a CUDA device: sample on cuda, not {device}")
    if num_timesteps is not None and (isinstance(num_timesteps, bool) or num_timesteps < 1):
        raise ToolkitError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
    sampler_obj = _resolve("sampler", sampler, **options)
    guidance_obj = None
    if guidance is not None:
        guidance_obj = _resolve("guidance", guidance, **(guidance_options or {}))
    predictor, train_schedule, config = load_predictor(model, device)
    latent_obj = None
    if latent is not None or config.get("latent"):
        latent_obj, sampler_obj = _paired_latent(latent, config, predictor, sampler_obj, "clip_x0" in options, device,
                                                 "clip_range" in options)
    elif attrs.has(type(sampler_obj)):  # defaults the checkpoint implies, e.g. a diffusers scheduler's clip_sample
        sampler_obj = _unbounded_data(config, sampler_obj, options)
        fields = attrs.fields_dict(type(sampler_obj))
        implied = {k: v for k, v in config.get("sampling", {}).items()
                   if k not in options and k in fields and fields[k].init}
        if implied:
            sampler_obj = attrs.evolve(sampler_obj, **implied)
    if schedule is None:
        if train_schedule is None:
            raise ToolkitError("schedule is required for a model given as an object")
        schedule = train_schedule if num_timesteps is None and not schedule_options else train_schedule.name
    if isinstance(schedule, str):
        T = num_timesteps or (train_schedule.num_timesteps if train_schedule is not None else 1000)
        recorded: dict[str, Any] = {}
        spec = config.get("schedule")
        if train_schedule is not None and schedule == train_schedule.name and isinstance(spec, dict):
            from toolkit.checkpoint import qualified  # the model's own schedule at another T: keep its options

            schedule, recorded = qualified(spec), {k: v for k, v in spec.get("options", {}).items()
                                                   if k != "num_timesteps"}
        schedule = create("schedule", schedule, **{**recorded, "num_timesteps": T, **(schedule_options or {})})
    if guidance_obj is not None:
        _check_guidance(guidance_obj, predictor, latent_obj, train_schedule or schedule)
    from toolkit.sampling import is_v2, listed_times, sampler_plan

    if steps is None:  # a listed spacing (a tuned grid) sets its own number of steps
        listed = listed_times(optional.option(sampler_obj, "spacing"))
        steps = len(listed) if listed is not None else optional.default_steps(sampler_obj) or schedule.num_timesteps

    sampler_plan(sampler_obj, schedule, steps)  # validates steps against T now, not mid-run
    if cuda_graphs and not is_v2(sampler_obj):
        raise ToolkitError(f"sampler {optional.name(sampler_obj)!r} runs its own loop (plugin API 1): it cannot be "
                           "captured as a CUDA graph")
    return Pipeline(schedule=schedule, predictor=predictor, sampler=sampler_obj, steps=int(steps),
                    guidance=guidance_obj, latent=latent_obj, train_schedule=train_schedule, device=device,
                    batch_size=batch_size, config=config, cuda_graphs=cuda_graphs)
