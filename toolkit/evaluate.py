"""Model evaluation: the variational bound in bits/dim (Ho et al. eq. 5, Nichol & Dhariwal §2) and a
sample-quality sweep (Fréchet distance in a feature network's space, class accuracy, class entropy)."""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import attrs
import numpy as np
import torch
from attrs import asdict, define
from torch import Tensor

from toolkit import diffusion, limits, optional
from toolkit.data import ArrayDataset
from toolkit.errors import ToolkitError
from toolkit.metrics import class_entropy, frechet_distance
from toolkit.noise import sample_seed
from toolkit.protocols import FeatureNetwork, ModelFn, Schedule

VARIANCES = ("auto", "posterior", "beta", "learned")
NOISE_CHUNK_ELEMENTS = 1 << 24  # noise drawn ahead for several timesteps, at most this many values


@define(frozen=True)
class BoundResult:
    """The bound −log p(x_0) ≤ L_T + Σ_{t≥2} L_{t−1} + L_0, each averaged over the data, in bits/dim."""

    bits_per_dim: float
    prior: float  # L_T = KL(q(x_T|x_0) ‖ N(0, I))
    diffusion: float  # Σ_{t=2..T} L_{t−1}, the KL terms of the reverse steps
    decoder: float  # L_0 = −log p_θ(x_0 | x_1)
    stderr: float  # standard error of bits_per_dim over the data points
    n: int
    levels: int | None
    variance: str
    conditioning: str
    per_timestep: list[float]  # mean L_t for t = 0..T-1 (0-based), bits/dim

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def bound_terms(model_fn: ModelFn, schedule: Schedule, x0: Tensor, *, levels: int | None,
                log_variance_fn: Callable[[Tensor, Tensor, Tensor], Tensor], clip_x0: bool = True,
                seed: int = 0, indices: Sequence[int] | None = None,
                progress: Callable[[int], None] | None = None) -> tuple[Tensor, Tensor]:
    """L_T [B] and the terms L_t [B, T] (t = 0..T−1; column 0 is L_0) of every sample, in bits/dim.

    ``model_fn(x_t, t)`` gives ε (and the raw variance channels); ``log_variance_fn(out, x_t, t)``
    gives log Σ_θ. Each x_t is a fresh draw from q(x_t | x_0) with noise from sample i's stream.
    """
    B, T = x0.shape[0], schedule.num_timesteps
    indices = list(range(B)) if indices is None else list(indices)
    gens = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in indices]
    terms = torch.zeros(B, T, dtype=torch.float64)
    C = x0.shape[1]
    dims = math.prod(x0.shape[1:])
    chunk = max(1, min(T, NOISE_CHUNK_ELEMENTS // max(1, B * dims)))  # draw the noise of many t at once
    block: Tensor | None = None
    for k, t_int in enumerate(reversed(range(T))):
        if k % chunk == 0:
            m = min(chunk, T - k)
            block = torch.stack([torch.randn((m, *x0.shape[1:]), generator=g) for g in gens], 1).to(x0.device)
        t = torch.full((B,), t_int, dtype=torch.long, device=x0.device)
        noise = block[k % chunk]
        x_t = diffusion.q_sample(schedule, x0, t, noise)
        out = model_fn(x_t, t)
        eps = out[:, :C]
        log_var = log_variance_fn(out, x_t, t).to(x0.dtype)
        terms[:, t_int] = diffusion.vlb_terms(schedule, x0, x_t, t, eps, log_var, levels, clip_x0).double().cpu()
        if progress is not None:
            progress(1)
    return diffusion.prior_kl(schedule, x0.double()).cpu(), terms


def log_variance_for(schedule: Schedule, variance: str, learned: bool) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """log Σ_θ(x_t, t) of the full-length reverse chain: learned range, or fixed β̃ / β."""
    if variance not in VARIANCES:
        raise ToolkitError(f"variance must be one of {', '.join(VARIANCES)}, not {variance!r}")
    if variance == "auto":
        variance = "learned" if learned else "posterior"
    if variance == "learned":
        if not learned:
            raise ToolkitError("variance 'learned' needs a model trained with --learn-variance")

        def learned_fn(out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
            return diffusion.learned_range_log_variance(schedule, t, out[:, x_t.shape[1]:])

        return learned_fn

    def fixed_fn(out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return diffusion.fixed_log_variance(schedule, t, x_t, variance).expand_as(x_t)

    return fixed_fn


def data_for(pipe, dataset: str | None, dataset_options: dict[str, Any] | None) -> ArrayDataset:
    """The data set to compare a pipeline with: the one named, else the one its checkpoint was trained on;
    its samples must have the pipeline's output shape."""
    from toolkit.registry import create

    data_cfg = pipe.config.get("data", {})
    if dataset is None:
        if "dataset" not in data_cfg:
            raise ToolkitError("the checkpoint does not record its data set: pass --dataset")
        dataset, dataset_options = data_cfg["dataset"], data_cfg.get("options", {})
    data: ArrayDataset = create("dataset", dataset, **(dataset_options or {}))
    if tuple(data.sample_shape) != tuple(pipe.output_shape):
        raise ToolkitError(f"dataset {data.name!r} has samples of shape {tuple(data.sample_shape)}, "
                           f"the model {tuple(pipe.output_shape)}")
    return data


def _model_and_data(model: str | os.PathLike, dataset: str | None, dataset_options: dict[str, Any] | None,
                    device: str | torch.device):
    """The pipeline of a noise-predictor checkpoint (not a latent one), with its data set checked to fit."""
    from toolkit.checkpoint import read_config, resolve_checkpoint
    from toolkit.pipeline import compose

    if read_config(resolve_checkpoint(model)).get("latent"):
        raise ToolkitError("nll is not available for a latent model: its bound is on the autoencoder's latents, "
                           "not on the data")
    pipe = compose(model=model, sampler="ddim", steps=1, device=device)
    return pipe, data_for(pipe, dataset, dataset_options)


def nll(model: str | os.PathLike, *, dataset: str | None = None, dataset_options: dict[str, Any] | None = None,
        limit: int | None = None, batch_size: int = 256, variance: str = "auto", clip_x0: bool = True,
        seed: int = 0, device: str | torch.device = "cpu", progress: Callable[[int], None] | None = None,
        on_start: Callable[[int], None] | None = None) -> BoundResult:
    """The variational bound of a checkpoint on its data set (or ``dataset``), in bits/dim.

    A class-conditional model is evaluated on p(x | y) with each point's own label. ``limit``
    takes the first N points; ``progress`` is called once per network evaluation batch, after
    ``on_start`` was told how many there will be.
    """
    pipe, data = _model_and_data(model, dataset, dataset_options, device)
    if limit is not None and limit < 1:
        raise ToolkitError(f"--limit must be positive, got {limit}")
    if batch_size < 1:
        raise ToolkitError(f"batch size must be positive, got {batch_size}")
    n = len(data) if limit is None else min(limit, len(data))
    schedule = pipe.schedule
    learned = optional.learned_variance(pipe.predictor)
    log_var_fn = log_variance_for(schedule, variance, learned)
    conditional = pipe.num_classes is not None and data.y is not None
    priors, terms = [], []
    if on_start is not None:
        on_start(-(-n // batch_size) * schedule.num_timesteps)
    with torch.no_grad():
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            x0 = data.x[start:stop].to(pipe.device, torch.float32)
            y = data.y[start:stop].to(pipe.device) if conditional else None
            if y is None and pipe.num_classes is not None:
                y = torch.full((stop - start,), pipe.num_classes, dtype=torch.long, device=pipe.device)
            prior, per_t = bound_terms(pipe.model_fn(y), schedule, x0, levels=data.levels,
                                       log_variance_fn=log_var_fn, clip_x0=clip_x0, seed=seed,
                                       indices=range(start, stop), progress=progress)
            priors.append(prior)
            terms.append(per_t)
    prior, per_t = torch.cat(priors), torch.cat(terms)
    total = prior + per_t.sum(1)
    mode = variance if variance != "auto" else ("learned" if learned else "posterior")
    return BoundResult(
        bits_per_dim=float(total.mean()), prior=float(prior.mean()), diffusion=float(per_t[:, 1:].sum(1).mean()),
        decoder=float(per_t[:, 0].mean()), stderr=float(total.std() / math.sqrt(n)) if n > 1 else math.nan,
        n=n, levels=data.levels, variance=mode,
        conditioning="labels" if conditional else ("null label" if pipe.num_classes is not None else "none"),
        per_timestep=[float(v) for v in per_t.mean(0)])


# ---------------------------------------------------------------- sample quality


@define
class FeatureSpace:
    """The space the Fréchet distance is measured in: a feature network's embedding, or the raw data."""

    name: str
    features_fn: Callable[[Tensor], Tensor]
    logits_fn: Callable[[Tensor], Tensor] | None = None
    num_classes: int | None = None
    holdout_accuracy: float | None = None

    @torch.no_grad()
    def features(self, x: Tensor, batch_size: int = 1000) -> np.ndarray:
        return np.concatenate([self.features_fn(x[i:i + batch_size].float()).double().cpu().numpy()
                               for i in range(0, len(x), batch_size)])

    @torch.no_grad()
    def probs(self, x: Tensor, batch_size: int = 1000) -> np.ndarray | None:
        if self.logits_fn is None:
            return None
        return np.concatenate([torch.softmax(self.logits_fn(x[i:i + batch_size].float()), 1).double().cpu().numpy()
                               for i in range(0, len(x), batch_size)])


DEFAULT_FEATURES = {"digits": "digits-features"}  # data set → shipped feature network


def feature_space(features: str | os.PathLike | None, dataset: str, sample_shape: tuple[int, ...]) -> FeatureSpace:
    """A feature checkpoint (directory or shipped name), "raw" (the data itself, for low-dimensional
    vectors), or None: the shipped network for the data set if there is one."""
    from toolkit.checkpoint import load_checkpoint

    if features is None:
        features = DEFAULT_FEATURES.get(dataset)
        if features is None:
            raise ToolkitError(f"no shipped feature network for dataset {dataset!r}: pass --features DIR "
                               f"(train one with `toolkit train-features --dataset {dataset} --out DIR`) "
                               f"or --features raw for low-dimensional vector data")
    if str(features) == "raw":
        return FeatureSpace("raw", lambda x: x.reshape(len(x), -1))
    ckpt = load_checkpoint(features)
    net = ckpt.model
    if ckpt.kind != "features" or not isinstance(net, FeatureNetwork):
        raise ToolkitError(f"{str(ckpt.path)!r} is a {ckpt.kind} checkpoint, not a feature network "
                           f"(make one with `toolkit train-features`)")
    if tuple(net.sample_shape) != tuple(sample_shape):
        raise ToolkitError(f"feature network {str(ckpt.path)!r} takes samples of shape {tuple(net.sample_shape)}, "
                           f"the model makes {tuple(sample_shape)}")
    return FeatureSpace(str(features), net.features, net, net.num_classes,
                        ckpt.config.get("training", {}).get("holdout_accuracy"))


@define(frozen=True)
class QualityRow:
    """One point of the sweep: a sampler (with its options) at a number of steps."""

    sampler: str
    options: dict[str, Any]
    steps: int
    fd: float | None  # None for --metric ode
    accuracy: float | None  # class-conditional samples classified as their label
    class_entropy: float | None  # unconditional samples: entropy of the mean class distribution (nats)
    samples_per_s: float
    n: int
    nfe: int = 0  # network calls per sample
    ode_error: float | None = None  # RMS distance to the 1000-NFE reference solution (deterministic samplers)
    backend: str = "torch"  # the engine that sampled the row (toolkit.backends)

    @property
    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.sampler}({opts})" if opts else self.sampler


@define(frozen=True)
class QualityReport:
    rows: list[QualityRow]
    reference_fd: float  # FD of n real points (a random subset): about what a perfect model scores
    features: str
    feature_holdout_accuracy: float | None
    dataset: str
    n: int
    seed: int

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for row, d in zip(self.rows, out["rows"]):
            d["label"] = row.label
        return out


def split_samplers(text: str) -> list[str]:
    """"ddim,unipc:spacing=999,900,640,310,86" → ["ddim", "unipc:spacing=999,900,640,310,86"]: a comma
    starts a new sampler only before a name, so listed times stay with their sampler."""
    return [s.strip() for s in re.split(r",(?=\s*[A-Za-z])", text) if s.strip()]


def parse_sampler_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """"dpmpp-2m:order=2:spacing=karras" → ("dpmpp-2m", {"order": 2, "spacing": "karras"})."""
    from toolkit.registry import option_value

    name, *parts = [p.strip() for p in spec.split(":")]
    opts: dict[str, Any] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ToolkitError(f"sampler option {part!r} in {spec!r} must be KEY=VALUE (e.g. dpmpp-2m:order=2)")
        opts[key.strip().replace("-", "_")] = option_value(value.strip())
    if not name:
        raise ToolkitError(f"sampler name missing in {spec!r}")
    return name, opts


def sampler_grid(samplers: Sequence[str], etas: Sequence[float] | None,
                 options: dict[str, Any] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(sampler, options) pairs: ``samplers`` are names with their own options ("ddim:spacing=trailing");
    ``options`` go to every sampler that takes them; each η makes its own row for samplers that take one."""
    from toolkit.registry import create, option_names

    options = dict(options or {})
    used: set[str] = set()
    grid = []
    for spec in samplers:
        name, own = parse_sampler_spec(spec)
        takes = option_names("sampler", name)
        shared = {k: v for k, v in options.items() if takes is None or k in takes}
        used |= set(shared)
        opts = {k: tuple(v) if isinstance(v, list) else v for k, v in {**shared, **own}.items()}  # hashable: keys
        base = create("sampler", name, **opts)  # validates the name and the options now
        if etas and optional.option(base, "eta") is not None and "eta" not in own:
            grid += [(name, {**opts, "eta": float(e)}) for e in etas]
        else:
            grid.append((name, opts))
    unused = sorted(set(options) - used)
    if unused:
        raise ToolkitError(f"no sampler of {', '.join(samplers)} takes the option {unused[0]!r}")
    return grid


def _sweep_pipelines(model, samplers, steps, guidance, guidance_options, device, batch_size) -> dict:
    """One pipeline per (sampler, options, steps); the checkpoint loads once per sampler."""
    from toolkit.pipeline import compose
    from toolkit.sampling import sampler_plan

    if not steps or not samplers:
        raise ToolkitError("give at least one sampler and one number of steps")
    pipes = {}
    for name, opts in samplers:
        pipe = compose(model=model, sampler=name, steps=int(steps[0]), guidance=guidance,
                       guidance_options=guidance_options, device=device, batch_size=batch_size, **opts)
        for s in steps:
            sampler_plan(pipe.sampler, pipe.schedule, int(s))  # validates s before any sampling
            pipes[(name, tuple(sorted(opts.items())), s)] = attrs.evolve(pipe, steps=int(s))
    return pipes


REFERENCE_NFE = 1000


@torch.no_grad()
def ode_reference(pipe, x_T: Tensor, labels: Tensor | None, t_start: float, clip: bool,
                  nfe: int = REFERENCE_NFE) -> Tensor:
    """The probability-flow ODE of ``pipe`` solved from x(t_start) = x_T to the data: DPM-Solver++(2M)
    (Lu et al. 2022) with ``nfe`` steps even in λ, updates in float64 (written out here, independent of
    the sampler plugins), x̂_0 clipped to [-1, 1] when ``clip``."""
    from toolkit.sampling import alpha_sigma, log_snr_at, log_snr_table, time_of_log_snr

    sched = pipe.schedule
    lam = np.linspace(float(log_snr_at(sched, t_start)), log_snr_table(sched)[0], nfe)
    t = time_of_log_snr(sched, lam)
    t[0], t[-1] = t_start, 0.0
    lam = np.append(lam, np.inf)
    alpha, sigma = alpha_sigma(lam)
    fn = pipe.model_fn(labels)
    C = x_T.shape[1]
    x, prev = x_T.double(), None
    for k in range(nfe):
        eps = fn(x.float(), torch.tensor(t[k], dtype=torch.float32, device=x.device))[:, :C].double()
        x0 = (x - sigma[k] * eps) / alpha[k]
        if clip:
            x0 = x0.clamp(-1, 1)
        d = x0
        if prev is not None and k < nfe - 1:
            r = (lam[k] - lam[k - 1]) / (lam[k + 1] - lam[k])
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * prev
        x = sigma[k + 1] / sigma[k] * x + (alpha[k + 1] - sigma[k + 1] * alpha[k] / sigma[k]) * d
        prev = x0
    return x.float()


def rms_distance(x: Tensor, reference: Tensor) -> float:
    """The ODE error: the RMS distance per sample to the reference, averaged over samples."""
    return float((x - reference).reshape(len(x), -1).pow(2).mean(1).sqrt().mean())


def ode_errors(model: str | os.PathLike | None, samplers: Sequence[tuple[str, dict[str, Any]]],
               steps: Sequence[int], *, n: int = 100, seed: int = 0, guidance: str | None = None,
               guidance_options: dict[str, Any] | None = None, conditional: bool = True, batch_size: int = 500,
               device: str | torch.device = "cpu", reference_nfe: int = REFERENCE_NFE,
               progress: Callable[[int], None] | None = None,
               on_start: Callable[[int], None] | None = None) -> list[QualityRow]:
    """How far each deterministic sampler lands from the exact ODE solution from the same x_T: the RMS
    distance per sample (mean over n) to ``ode_reference`` started at the sampler's first time with the
    sampler's clipping. Far less noisy than FD for telling solvers apart; stochastic samplers get None."""
    from toolkit.noise import NoiseStreams
    from toolkit.sampling import as_v2, run_plan

    if n < 1:
        raise ToolkitError(f"-n must be positive, got {n}")
    pipes = _sweep_pipelines(model, samplers, steps, guidance, guidance_options, device, batch_size)
    if on_start is not None:
        on_start(sum(p.iterations for p in pipes.values()))
    first = next(iter(pipes.values()))
    K = first.num_classes
    labels = torch.arange(n) % K if K is not None and (conditional or guidance is not None) else None
    if labels is None and K is not None:
        labels = torch.full((n,), K)
    x_T = NoiseStreams(seed, range(n), first.sample_shape, first.device).draw()
    y = None if labels is None else labels.to(first.device)
    references: dict[tuple[float, bool], Tensor] = {}
    rows = []
    for (name, opts, s), pipe in pipes.items():
        sampler = as_v2(pipe.sampler)
        plan = sampler.plan(pipe.schedule, pipe.steps)
        clip = optional.clip_x0(pipe.sampler)
        err, rate = None, float("nan")
        if plan.draws_per_step == 0 and not pipe.mean_shift:
            t0 = time.perf_counter()
            x = run_plan(sampler, pipe.model_fn(y), plan, x_T, progress=progress)
            rate = n / (time.perf_counter() - t0)
            key = (float(plan.t_x[0]), clip)
            if key not in references:
                references[key] = ode_reference(pipe, x_T, y, key[0], clip, reference_nfe)
            err = rms_distance(x, references[key])
        rows.append(QualityRow(name, dict(opts), int(s), None, None, None, rate, n, pipe.nfe, err))
    return rows


def sample_quality(model: str | os.PathLike | None, samplers: Sequence[tuple[str, dict[str, Any]]],
                   steps: Sequence[int], *, n: int = 1000, seed: int = 0, guidance: str | None = None,
                   guidance_options: dict[str, Any] | None = None, features: str | os.PathLike | None = None,
                   dataset: str | None = None, dataset_options: dict[str, Any] | None = None,
                   conditional: bool = True, batch_size: int = 500, device: str | torch.device = "cpu",
                   progress: Callable[[int], None] | None = None,
                   on_start: Callable[[int], None] | None = None, backend: str = "auto",
                   threads: int | None = None) -> QualityReport:
    """Sample n points per (sampler, steps) and score them against the data set in a feature space.

    ``backend``: the engine of each row (``toolkit.backends.select``: auto takes onnxruntime where the
    pipeline's exported graph matches torch); the samples, and so the scores, are the same either way.

    A class-conditional model draws balanced labels (i mod K) and reports how many samples the
    feature network classifies as their label; with ``conditional=False`` it samples from the null
    label and reports the class entropy instead (log K when all classes appear equally).
    """
    if n < 2:
        raise ToolkitError(f"-n must be at least 2 for a Fréchet distance, got {n}")
    pipes = _sweep_pipelines(model, samplers, steps, guidance, guidance_options, device, batch_size)
    shape = next(iter(pipes.values())).output_shape
    limits.fits_memory(f"-n {n} samples of shape {list(shape)}", 2 * n * math.prod(shape) * 4, "lower -n")
    if on_start is not None:
        on_start(sum(p.iterations * -(-n // batch_size) for p in pipes.values()))
    first = next(iter(pipes.values()))
    data = data_for(first, dataset, dataset_options)
    space = feature_space(features, data.name, data.sample_shape)
    real = space.features(data.x)
    K = first.num_classes
    labels = None
    if guidance is not None and K is None:
        raise ToolkitError("guidance needs a class-conditional model or classifier")
    if K is not None and (conditional or guidance is not None):
        labels = torch.arange(n) % K
    if labels is not None and space.num_classes is not None and space.num_classes != K:
        raise ToolkitError(f"the feature network knows {space.num_classes} classes, the model {K}")
    from toolkit.backends import select

    rows = []
    for (name, opts, s), pipe in pipes.items():
        engine = select(pipe, backend, threads=threads)
        t0 = time.perf_counter()
        x = engine.sample(n, seed=seed, labels=labels, progress=progress)
        rate = n / (time.perf_counter() - t0)
        feats = space.features(x)
        probs = space.probs(x)
        acc = ent = None
        if probs is not None and labels is not None:
            acc = float((probs.argmax(1) == labels.numpy()).mean())
        elif probs is not None:
            ent = class_entropy(probs)
        rows.append(QualityRow(name, dict(opts), int(s), frechet_distance(real, feats), acc, ent, rate, n, pipe.nfe,
                               backend=engine.label))
    g = torch.Generator().manual_seed(seed)
    idx = (torch.randperm(len(real), generator=g)[:n] if n <= len(real)
           else torch.randint(len(real), (n,), generator=g)).numpy()
    return QualityReport(rows, frechet_distance(real, real[idx]), space.name, space.holdout_accuracy,
                         data.name, n, seed)


def plot_quality(report: QualityReport, path: str | os.PathLike, metric: str = "fd") -> None:
    """Quality against network calls, one line per sampler and options (needs matplotlib: the `plot` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ToolkitError("--plot needs matplotlib: pip install 'diffusion-toolkit[plot]'") from None
    from toolkit.files import atomic_write

    lines: dict[str, list[QualityRow]] = {}
    for row in report.rows:
        lines.setdefault(row.label, []).append(row)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, rows in lines.items():
        rows = sorted((r for r in rows if getattr(r, metric) is not None), key=lambda r: r.nfe or r.steps)
        if rows:
            ax.plot([r.nfe or r.steps for r in rows], [getattr(r, metric) for r in rows], marker="o", label=label)
    if metric == "fd" and math.isfinite(report.reference_fd):
        ax.axhline(report.reference_fd, color="grey", linestyle=":", label=f"real data (n={report.n})")
    ax.set_xscale("log")
    if metric == "ode_error":
        ax.set_yscale("log")
    ax.set_xlabel("network calls per sample (NFE)")
    ax.set_ylabel({"fd": "Fréchet distance", "ode_error": "distance to the ODE solution"}.get(metric, metric))
    ax.set_title(f"{report.dataset}: {metric} in {report.features} features, n={report.n}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
