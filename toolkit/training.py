"""One training loop (AdamW, warm-up, EMA, clipping, atomic checkpoints, exact resume) for every task:
a noise predictor with Algorithm 1 of Ho et al. (L_simple), a noise-aware classifier p_φ(y|x_t, t), or
a clean-data classifier whose features the Fréchet distance of `toolkit evaluate` uses."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
import attrs
from attrs import asdict, define, field, validators
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from toolkit import checkpoint, distributed, limits, optional, schema
from toolkit._version import __version__
from toolkit.errors import CheckpointError, ToolkitError, parse_device
from toolkit.noise import sample_seed
from toolkit.registry import create

PRECISIONS = ("fp32", "bf16", "fp16")
SYNC_EVERY = 10  # steps between reading the loss back (progress bar, divergence check)
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "sample_every")  # everything else must match the checkpoint to resume


def _positive(instance, attribute, value) -> None:
    if value is None or not value > 0 or not math.isfinite(value):  # NaN and inf too
        raise ToolkitError(f"{attribute.name.replace('_', '-')} must be a positive finite number, got {value!r}")


def _non_negative(instance, attribute, value) -> None:
    if value is None or not value >= 0 or not math.isfinite(value):
        raise ToolkitError(f"{attribute.name.replace('_', '-')} must be a finite number ≥ 0, got {value!r}")


def _seed(instance, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise ToolkitError(f"seed must be an integer in 0..2^63-1, got {value!r}")


def _count(high: int = limits.MAX_COUNT, low: int = 1):
    def check(instance, attribute, value) -> None:
        limits.integer(attribute.name.replace("_", "-"), value, low, high)
    return check


def _unit(instance, attribute, value) -> None:
    if not 0.0 <= value < 1.0:
        raise ToolkitError(f"{attribute.name.replace('_', '-')} must lie in [0, 1), got {value!r}")


@define(frozen=True)
class TrainConfig:
    """Everything that defines a training run; recorded in the checkpoint's config.json."""

    task: str = "noise_predictor"  # a registered task (toolkit plugins): what the run learns
    dataset: str = "digits"
    dataset_options: dict[str, Any] = field(factory=dict)
    model: str = "unet"
    model_options: dict[str, Any] = field(factory=dict)
    schedule: str = "cosine"
    num_timesteps: int = field(default=1000, validator=_count(limits.MAX_TIMESTEPS))
    # None: v (Salimans & Ho 2022) for latent models and zero-terminal-SNR schedules (L_simple), where x̂_0 from ε divides ε's
    # error by √ᾱ ≈ 0 at high noise (Lin et al. 2024); ε otherwise (Ho et al.)
    prediction: str | None = field(default=None, validator=validators.optional(validators.in_(("epsilon", "v", "x0"))))
    loss: str = field(default="simple", validator=validators.in_(("simple", "hybrid", "vlb")))
    importance_sampling: bool = False  # t drawn ∝ √E[L_t²] (Improved DDPM §3.3), for the vlb and hybrid losses
    learned_variance: bool = False
    conditional: bool | None = None  # None: class-conditional when the data set has labels
    p_uncond: float = field(default=0.1, validator=_unit)
    steps: int = field(default=4000, validator=_count())
    batch_size: int = field(default=128, validator=_count())
    lr: float = field(default=1e-3, validator=_positive)
    weight_decay: float = field(default=0.0, validator=_non_negative)
    warmup: int = field(default=100, validator=_count(low=0))
    ema_decay: float = field(default=0.999, validator=_unit)
    grad_clip: float = field(default=1.0, validator=_non_negative)  # 0: no clipping (NaN would silently be the same)
    seed: int = field(default=0, validator=_seed)
    checkpoint_every: int = field(default=1000, validator=_count())
    holdout: float = field(default=0.0, validator=_unit)  # data kept out: held-out accuracy (classifiers) or loss
    sample_every: int = field(default=0, validator=_count(low=0))  # steps between preview grids (0: none)
    latent: str | None = None  # autoencoder checkpoint: train on its (scaled) latents of the data
    schedule_options: dict[str, Any] = field(factory=dict)  # e.g. {"zero_terminal_snr": True} (any schedule)

    def __attrs_post_init__(self) -> None:
        from toolkit.schedule import has_zero_terminal_snr

        if "num_timesteps" in self.schedule_options:
            raise ToolkitError("give T as --num-timesteps, not as a schedule option")
        zero_snr = has_zero_terminal_snr(self.schedule_options)
        if self.prediction is None:
            v = (zero_snr or bool(self.latent)) and self.loss == "simple"  # L_vlb's terms are written for ε
            object.__setattr__(self, "prediction", "v" if v else "epsilon")
        if zero_snr and self.loss != "simple":
            raise ToolkitError(f"--loss {self.loss} is written for ε-prediction, which a zero-terminal-SNR schedule rules "
                               "out: use --loss simple with --prediction v")
        if zero_snr and self.prediction == "epsilon":
            raise ToolkitError("a zero-terminal-SNR schedule needs --prediction v (or x0): at SNR 0 the input holds no "
                               "signal, so ε is x_T itself and x̂_0 cannot be formed from it (Lin et al. 2024)")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@define(frozen=True)
class Batch:
    """One step's share of the batch, as a task's loss sees it (everything on the training device)."""

    x0: Tensor
    y: Tensor | None  # the data's labels (None for a model without classes)
    t: Tensor  # timesteps (uniform, or importance-sampled)
    noise: Tensor  # ε of the data's shape
    drop: Tensor  # where the label is replaced by the null label ∅ (probability p_uncond)
    extra: dict[str, Tensor]  # the task's own draws (extra_noise)
    null_label: int | None  # K
    levels: int | None  # the data's number of levels (the discretized decoder of L_vlb)
    config: "TrainConfig"
    weights: Tensor | None = None  # importance weights 1/(T p_t) of each sample (None: uniform t)
    observed: dict[str, Tensor] = field(factory=dict)  # what the loss reports per sample ("loss": its L_t)


@define
class TrainResult:
    path: Path
    step: int
    loss: float
    steps_per_second: float


def _ema(model: nn.Module, decay: float) -> AveragedModel:
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, Tensor]:
    out = {}
    for idx, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            out[f"optim.{idx}.{key}"] = torch.as_tensor(value)
    return out


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, Tensor]) -> None:
    state: dict[int, dict[str, Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


def _recorded(kind: str, name: str) -> dict[str, str]:
    """The plugin's own name and its distribution: the checkpoint finds the same plugin again (``dist:name``)
    even when another installed plugin registers the same name later."""
    from toolkit.registry import get_registry

    entry = get_registry().lookup(kind, name)
    return {"name": entry.name, "dist": entry.dist}


def _holding_output_lock(fn):
    """Rank 0 holds the output lock of ``out`` for the whole run: a second run into the same --out fails at once."""
    @functools.wraps(fn)
    def wrapper(config: TrainConfig, out: str | os.PathLike, **options):
        out = Path(out)
        parent = out.parent if str(out.parent) else Path(".")
        if not parent.is_dir() or not distributed.world_from_env().main:
            return fn(config, out, **options)
        from toolkit.locks import output_lock

        with output_lock(out):
            return fn(config, out, **options)

    return wrapper


def _check_run(config: TrainConfig, out: Path, resume: bool, overwrite: bool, device: torch.device,
               precision: str) -> None:
    """Everything about the options and --out that can be refused before any process group or data exists."""
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ToolkitError(f"output folder {str(parent)!r} does not exist")
    if precision not in PRECISIONS:
        raise ToolkitError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ToolkitError("--precision fp16 needs --device cuda (use bf16 or fp32 on the CPU)")
    world = distributed.world_from_env()
    if config.batch_size % world.size:
        raise ToolkitError(f"--batch-size {config.batch_size} (the global batch) must divide evenly over "
                           f"{world.size} processes")
    checkpoint.recover(out)  # a checkpoint stranded by a killed writer is put back first
    if out.exists() and not resume and not overwrite:
        raise ToolkitError(f"{str(out)!r} already exists; pass --resume to continue it or --overwrite")
    if out.exists() and overwrite and not resume:  # --overwrite replaces a checkpoint, never other files
        try:
            checkpoint.read_config(out)
        except CheckpointError:
            if not (out.is_dir() and not out.is_symlink() and not any(out.iterdir())):
                raise ToolkitError(f"{str(out)!r} is not a toolkit checkpoint: --overwrite replaces only a "
                                   "checkpoint (or an empty folder); choose another --out") from None


@define(frozen=True)
class Resumed:
    """What a checkpoint continued with --resume brings: its config (merged), state, record and step."""

    config: TrainConfig
    saved: dict[str, Any] = field(factory=dict)
    state: dict[str, Tensor] | None = None
    step: int = 0
    history: list[str] = field(factory=list)


def _resumed(config: TrainConfig, out: Path, resume: bool) -> Resumed:
    """The checkpoint to continue (or a fresh start); any option but RESUMABLE_CHANGES must match it."""
    if not resume:
        return Resumed(config)
    if not out.exists():
        raise CheckpointError(f"cannot resume: {str(out)!r} does not exist")
    saved = checkpoint.read_config(out)
    old = saved.get("training", {}).get("config", {})
    new = config.to_json()
    if old.get("conditional") is not None and config.conditional is None:
        new["conditional"] = old["conditional"]
    changed = [k for k in new if k in old and k not in RESUMABLE_CHANGES and old[k] != new[k]]
    if changed:
        k = changed[0]
        raise CheckpointError(f"cannot resume {str(out)!r}: it was trained with {k}={old[k]!r}, not {new[k]!r}")
    state = checkpoint.read_tensors(out, checkpoint.TRAINING_STATE)
    if "training" not in saved:
        raise CheckpointError(f"cannot resume {str(out)!r}: its {checkpoint.CONFIG} has no training record")
    return Resumed(TrainConfig(**new), saved, state, saved["training"]["step"],
                   list(saved["training"].get("commands") or [saved["training"].get("command")]))


class TrainLoop:
    """One run: the task's network, its EMA and AdamW, the data; ``run`` takes the steps (warm-up, clipping,
    precision, DDP, metrics, previews) and writes the checkpoints. What is learned is the task's alone."""

    def __init__(self, config: TrainConfig, out: Path, resumed: Resumed, world, device: torch.device, *,
                 precision: str, compile: bool, command: str | None, log: str | None) -> None:
        self.out, self.world, self.device, self.precision, self.command = out, world, device, precision, command
        self.start_step, self.history = resumed.step, resumed.history
        task = self.task = create("task", config.task)
        data = create("dataset", config.dataset, **config.dataset_options)
        self.latent = self.pixels = None
        if config.latent and task.network_kind == "latent":
            raise ToolkitError("an autoencoder trains on the data itself: drop --latent")
        if config.latent:
            from toolkit.latent import check_pairing, encode_dataset, load_latent

            self.latent = load_latent(config.latent, device)
            if resumed.saved:  # the latents must mean what they meant: same autoencoder, never re-recorded
                check_pairing(resumed.saved, self.latent)
            self.pixels, data = data, encode_dataset(self.latent, data, device)  # once, kept in memory
        self.data = data
        pixels = self.pixels if self.latent is not None else data
        # images live in [-1, 1]; standardized vectors (moons, swissroll) have no fixed range: null, and samplers
        # then leave x̂_0 unguarded (a clip to ±1 would cut the data off)
        self.data_range = [-1, 1] if float(pixels.x.abs().max()) <= 1 + 1e-6 else None
        self.schedule = create("schedule", config.schedule, num_timesteps=config.num_timesteps,
                               **config.schedule_options)
        torch.manual_seed(config.seed)
        if config.holdout > 0 and task.network_kind == "latent":
            raise ToolkitError("--holdout applies to noise predictors, classifiers and feature networks")
        if config.sample_every and not task.samples:
            raise ToolkitError("--sample-every previews what a noise predictor samples; this task samples nothing")
        model = self.model = task.build(config, data).to(device)
        self.model_options = task.model_options(model, config, data)  # what config.json records: fixed for the run
        self.recorded = {"model": _recorded(task.network_kind, config.model),
                         "schedule": _recorded("schedule", config.schedule)}  # dist:name, resolved once
        self.null_label = optional.option(model, "num_classes")  # K, the label ∅ (None: unconditional)
        self.conditional = self.null_label is not None
        self.config = config = TrainConfig(**{**config.to_json(), "conditional": self.conditional})
        self.ema = _ema(model, config.ema_decay)
        self.opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.importance = None
        if config.importance_sampling:
            if world.size > 1:
                raise ToolkitError("--importance-sampling runs in one process (its loss history is not shared "
                                   "between ranks)")
            from toolkit.importance import LossSecondMoment

            self.importance = LossSecondMoment(config.num_timesteps)
        if resumed.state is not None:
            self._load(resumed.state)
        # the batch, its noise and x_t alone: activations need more, but a batch that cannot even hold this is refused
        limits.fits_memory(f"--batch-size {config.batch_size}", 3 * config.batch_size * data.x[0].numel() * 4,
                           "lower --batch-size")
        self.x_all = data.x.to(device)
        self.y_all = data.y.to(device) if self.conditional else None
        self.pool, self.held = self._split(len(data))
        self.params = sum(p.numel() for p in model.parameters())
        from toolkit.feedback import RunLog

        self.run_log = RunLog(out, self.start_step if resumed.saved else None, log) if world.main else None
        self.scores: dict[str, Any] = {}  # the task's held-out scores at the last checkpoint
        self.net = distributed.wrap(model, world, device)
        if compile:
            self.net = torch.compile(self.net)
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
                         if precision != "fp32" else contextlib.nullcontext())
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        self.rows = slice(world.rank * config.batch_size // world.size,
                          (world.rank + 1) * config.batch_size // world.size)
        self.prev_elapsed = float(resumed.saved["training"].get("elapsed_s", 0.0)) if resumed.step else 0.0

    def _load(self, state: dict[str, Tensor]) -> None:
        out, device = self.out, self.device
        try:
            schema.check_training_state(state, list(self.model.parameters()))
        except ToolkitError as exc:
            raise CheckpointError(f"cannot resume {str(out)!r}: {checkpoint.TRAINING_STATE}: {exc}") from None
        checkpoint.load_state(self.model, {k[6:]: v for k, v in state.items() if k.startswith("model.")}, str(out))
        checkpoint.load_state(self.ema.module, checkpoint.read_tensors(out, checkpoint.WEIGHTS), str(out))
        self.ema.n_averaged.fill_(int(state["ema.n_averaged"]))
        if self.importance is not None:
            if "importance.history" not in state:
                raise CheckpointError(f"cannot resume {str(out)!r} with --importance-sampling: it was trained without")
            self.importance.load(state)
        # AdamW keeps its step count on the CPU: moving it to the GPU would sync every step
        _load_optimizer(self.opt, {k: v if k.endswith(".step") else v.to(device)
                                   for k, v in state.items() if k.startswith("optim.")})

    def _split(self, N: int) -> tuple[Tensor, Tensor]:
        """Training indices and held-out indices (a seeded split with --holdout / --val-fraction)."""
        pool = torch.arange(N)
        if self.config.holdout <= 0:
            return pool, pool[:0]
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(self.config.seed))
        n_held = max(1, int(round(self.config.holdout * N)))
        if n_held >= N:
            raise ToolkitError(f"--holdout {self.config.holdout} leaves no training data")
        return perm[n_held:].sort().values, perm[:n_held]

    def lr_at(self, step: int) -> float:
        return self.config.lr * min(1.0, (step + 1) / max(1, self.config.warmup))

    def batch(self, step: int) -> Batch:
        """This rank's part of step ``step``'s batch, drawn from the step's own generator (resume is exact)."""
        config, device, rows = self.config, self.device, self.rows
        g = torch.Generator().manual_seed(sample_seed(config.seed, step))
        idx = self.pool[torch.randint(len(self.pool), (config.batch_size,), generator=g)]
        weights = None
        if self.importance is not None:
            t, weights = self.importance.sample(config.batch_size, g)
        else:
            t = torch.randint(config.num_timesteps, (config.batch_size,), generator=g)
        noise = torch.randn((config.batch_size, *self.data.sample_shape), generator=g)
        drop = torch.rand(config.batch_size, generator=g) < config.p_uncond
        extra = self.task.extra_noise(self.model, config.batch_size, g)
        idx, t, noise, drop = idx[rows].to(device), t[rows], noise[rows], drop[rows]
        return Batch(x0=self.x_all[idx], y=self.y_all[idx] if self.conditional else None, t=t.to(device),
                     noise=noise.to(device), drop=drop.to(device), extra={k: v[rows].to(device) for k, v in extra.items()},
                     null_label=self.null_label, levels=self.data.levels, config=config,
                     weights=None if weights is None else weights[rows].to(device))

    def optimize(self, step: int) -> tuple[Tensor, Tensor]:
        """One optimizer step: the task's loss, backward, clipping, AdamW, EMA. Returns (loss, gradient norm)."""
        batch = self.batch(step)
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(step)
        # dropout (and any other draw of the global RNG) depends on (seed, step, rank) alone: resume is exact
        torch.manual_seed(sample_seed(self.config.seed, (step << 16) + self.world.rank))
        with self.autocast:
            loss = self.task.loss(self.net, self.schedule, batch)
        if self.importance is not None:
            if "loss" not in batch.observed:
                raise ToolkitError(f"task {self.config.task!r} does not report per-sample losses: it cannot use "
                                   "--importance-sampling")
            self.importance.update(batch.t, batch.observed["loss"])
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
        else:
            loss.backward()
        # the gradient norm before clipping (max_norm=inf: measured, not clipped), read back only when logged
        clip = self.config.grad_clip if self.config.grad_clip > 0 else math.inf
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.ema.update_parameters(self.model)
        return loss, grad_norm

    def record(self, step: int, loss_avg: float, loss: Tensor, grad_norm: Tensor, elapsed: float,
               checkpoint_now: bool) -> None:
        """A metrics.jsonl row (rank 0), with the task's held-out scores at a checkpoint."""
        done = step + 1
        row = {"step": done, "loss": loss_avg, "loss_step": float(loss.detach()), "lr": self.lr_at(step),
               "grad_norm": float(grad_norm), "steps_per_s": (done - self.start_step) / max(elapsed, 1e-9),
               "elapsed_s": round(self.prev_elapsed + elapsed, 3)}
        if checkpoint_now and len(self.held):
            held = self.held.to(self.device)
            self.scores = self.task.scores(self.ema.module, self.schedule, self.x_all[held],
                                           self.y_all[held] if self.conditional else None)
            row.update(self.scores)
        self.run_log.add(row)

    def save(self, step: int, loss: float, elapsed: float) -> None:
        """The checkpoint of step ``step``: EMA weights, training state, config.json, metrics and previews."""
        model, ema, config, data, out = self.model, self.ema, self.config, self.data, self.out
        for name, tensor in [*model.state_dict().items(), *(("ema." + k, v) for k, v in ema.module.state_dict().items())]:
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):  # never save a diverged model
                raise ToolkitError(f"training diverged before step {step}: {name} is not finite; nothing was saved "
                                   f"(the checkpoint at {str(out)!r}, if any, is as it was); lower --lr")
        command, history = self.command, self.history
        cfg = {
            "kind": config.task,
            "toolkit_version": __version__,
            "model": {**self.recorded["model"], "options": self.model_options},
            "schedule": {**self.recorded["schedule"], "options": {**config.schedule_options,
                                                                   "num_timesteps": config.num_timesteps}},
            "data": {"dataset": config.dataset, "options": config.dataset_options, "name": data.name,
                     "shape": list(data.sample_shape), "num_classes": data.num_classes, "levels": data.levels,
                     "range": self.data_range, "class_names": list(data.class_names) if data.class_names else None},
            "training": {"step": step, "config": config.to_json(), "loss": loss, "parameters": self.params,
                         "elapsed_s": round(elapsed, 2), "world_size": self.world.size, "precision": self.precision,
                         "command": history[0] if history else command,
                         "commands": [c for c in [*history, command] if c], "torch_version": torch.__version__},
        }
        cfg.update(self.task.summary(ema.module, self.x_all))
        if self.latent is not None:
            cfg["latent"] = self.latent.to_json()
            cfg["data"].update(shape=list(self.pixels.sample_shape), levels=self.pixels.levels,
                               latent_shape=list(data.sample_shape))
        if len(self.held):
            cfg["training"].update(self.scores, holdout_size=len(self.held))
        extra = {"model." + k: v for k, v in model.state_dict().items()}
        extra.update(_optimizer_tensors(self.opt))
        extra["ema.n_averaged"] = ema.n_averaged.detach().clone()
        if self.importance is not None:
            extra.update(self.importance.state())
        checkpoint.write_checkpoint(out, cfg, ema.module.state_dict(), {checkpoint.TRAINING_STATE: extra},
                                    files=self.run_log.checkpoint_files())

    def run(self, progress: Callable[[int, float, float], None] | None = None) -> TrainResult:
        """Steps start_step..config.steps-1; the loss is read back every SYNC_EVERY steps (no GPU sync per step)."""
        from toolkit.feedback import preview_image

        config, world = self.config, self.world
        if self.start_step >= config.steps:
            return TrainResult(self.out, self.start_step, math.nan, 0.0)
        self.model.train()
        loss_avg, running, t0 = math.nan, None, time.perf_counter()
        for step in range(self.start_step, config.steps):
            loss, grad_norm = self.optimize(step)
            done = step + 1
            running = loss.detach() if running is None else 0.98 * running + 0.02 * loss.detach()
            checkpoint_now = done % config.checkpoint_every == 0 or done == config.steps
            if done % SYNC_EVERY == 0 or checkpoint_now:
                loss_avg = float(distributed.mean(running.float(), world))  # every rank sees a NaN together
                if not math.isfinite(loss_avg):
                    raise ToolkitError(f"training diverged before step {done}: loss is {loss_avg}; lower --lr")
                elapsed = time.perf_counter() - t0
                if progress is not None and world.main:
                    progress(done, loss_avg, (done - self.start_step) / max(elapsed, 1e-9))
                if world.main:
                    self.record(step, loss_avg, loss, grad_norm, elapsed, checkpoint_now)
            if world.main and config.sample_every and done % config.sample_every == 0:
                self.run_log.preview(done, preview_image(self.ema.module, self.schedule, self.latent, self.null_label))
            if checkpoint_now:
                if world.main:
                    self.save(done, loss_avg, self.prev_elapsed + time.perf_counter() - t0)
                distributed.barrier(world)
        elapsed = time.perf_counter() - t0
        return TrainResult(self.out, config.steps, loss_avg, (config.steps - self.start_step) / max(elapsed, 1e-9))

    def close(self) -> None:
        if self.run_log is not None:
            self.run_log.close()


@_holding_output_lock
def train(
    config: TrainConfig,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    device: str | torch.device = "cpu",
    quiet: bool = False,
    command: str | None = None,
    progress: Callable[[int, float, float], None] | None = None,
    precision: str = "fp32",
    compile: bool = False,
    log: str | None = None,
) -> TrainResult:
    """Train ``config`` into checkpoint directory ``out`` (resuming from it with ``resume``).

    Under torchrun every rank runs this: each draws the same global batch (``batch_size``) from the
    step's generator and trains on its own 1/world slice, DDP averages the gradients, so N processes
    take the same steps as one process with the same global batch; rank 0 writes the checkpoints.
    ``precision`` bf16/fp16 trains under autocast (fp16 with a gradient scaler; CUDA only);
    ``compile`` runs the network through torch.compile. Every checkpoint carries metrics.jsonl (a row
    every SYNC_EVERY steps: loss, lr, gradient norm, speed; the task's held-out scores at checkpoints with
    ``holdout``) and the previews of ``sample_every``; ``log="tensorboard"`` also writes TensorBoard events
    to ``OUT.tensorboard/`` (``toolkit.feedback``). What is learned is the task's (``config.task``).
    """
    from toolkit import budget

    out = Path(out)
    if budget.active():  # TOOLKIT_BUDGET=small: a token run of the same command
        config = attrs.evolve(config, steps=budget.steps(config.steps),
                              checkpoint_every=budget.steps(config.checkpoint_every))
    device = parse_device(device)
    _check_run(config, out, resume, overwrite, device, precision)
    world = distributed.init(device)
    device = distributed.local_device(device, world)
    distributed.check_same({**config.to_json(), "out": str(out.resolve()), "resume": resume,
                            "overwrite": overwrite, "precision": precision}, world)
    distributed.barrier(world)  # every rank has checked --out before rank 0 writes to it
    resumed = _resumed(config, out, resume)
    loop = TrainLoop(resumed.config, out, resumed, world, device, precision=precision, compile=compile,
                     command=command, log=log)
    try:
        return loop.run(progress)
    finally:
        loop.close()
