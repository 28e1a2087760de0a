"""The four interfaces every plugin implements: Schedule, NoisePredictor, Sampler, Guidance (and Classifier
and Task for the other kinds).

Time convention: t is a 0-based index (0..T-1) into the schedule's arrays; the papers' t = 1..T
maps to t - 1, and t_prev = -1 means "after the last step" (ᾱ = 1, clean data).
Data convention: images are float32 NCHW in [-1, 1].
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Schedule(Protocol):
    """The forward process q(x_t | x_{t-1}) = N(√(1-β_t) x_{t-1}, β_t I).

    Arrays are float64 of shape [T]. ``toolkit.schedule_from_betas`` builds one from β alone and
    derives everything the math needs (ᾱ, posterior coefficients, log-SNR).
    """

    name: str
    num_timesteps: int
    betas: Tensor
    alphas: Tensor
    alphas_cumprod: Tensor


@runtime_checkable
class NoisePredictor(Protocol):
    """The network ε_θ(x_t, t, y).

    ``prediction`` says what it outputs ("epsilon", "v" or "x0"); with ``learned_variance`` the
    output has 2C channels (prediction, then the interpolation v of Improved DDPM).
    ``num_classes`` is None for an unconditional model; otherwise labels are 0..K-1 and K is the
    null label ∅ (used for unconditional samples and classifier-free guidance).
    ``t`` may be fractional when the sampling schedule differs from the training schedule.
    """

    prediction: str
    learned_variance: bool
    num_classes: int | None
    sample_shape: tuple[int, ...]

    def __call__(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor: ...


# model_fn(x_t, t) -> ε (C channels), or ε and v (2C channels) for a learned-variance model.
# t is the sampling-schedule time: a 0-d tensor or one per sample, integer or fractional.
# The pipeline builds it: it converts v/x0 predictions to ε, maps time between schedules,
# binds the labels and applies guidance, so samplers see one thing only.
ModelFn = Callable[[Tensor, Tensor], Tensor]
# noise_fn(i) -> the standard normal draws of loop iteration i: [draws_per_step, B, *shape], drawn per sample.
NoiseFn = Callable[[int], Tensor]


@runtime_checkable
class Sampler(Protocol):
    """Plugin API 2: turns a model and a schedule into samples as a pure step with explicit state.

    ``plan(schedule, steps) -> toolkit.sampling.Plan``: the run's time grid (fractional t allowed),
    per-step constant tables, network calls and noise draws per step. ``init_state(x_T, plan)``: a fixed
    tuple of tensors carried between steps (e.g. the previous x̂_0 of a multistep solver; () for DDIM).
    ``step(model_fn, x, state, i, plan, noise) -> (x, state)``: iteration i (a 0-d int64 tensor) of
    the run; it calls ``model_fn`` itself (as often as ``plan.nfe_per_step``) and reads everything
    step-dependent from the plan's tables by ``i``; ``noise`` is [draws_per_step, B, ...] or None.
    Pure and traceable: no Python branching on tensor values, no hidden attributes, no randomness.
    The toolkit's loop (``toolkit.sampling.run_plan``) and the exported ONNX ``Loop`` both drive it.
    Optional ``log_variance(out, x, i, plan)`` (ddpm): Σ of the step, for classifier guidance on the mean.
    """

    name: str

    def plan(self, schedule: Schedule, steps: int) -> Any: ...

    def init_state(self, x_T: Tensor, plan: Any) -> tuple[Tensor, ...]: ...

    def step(self, model_fn: ModelFn, x: Tensor, state: tuple[Tensor, ...], i: Tensor, plan: Any,
             noise: Tensor | None) -> tuple[Tensor, tuple[Tensor, ...]]: ...


@runtime_checkable
class SamplerV1(Protocol):
    """Plugin API 1 (still accepted): ``timesteps`` and a pure ``step(out, x_t, t, t_prev, schedule, noise)``
    with integer t and one model call per step, driven by the toolkit's adapter. A ``sample`` of its own
    runs in torch; the exporter refuses it unless it is the standard loop."""

    name: str
    stochastic: bool

    def timesteps(self, schedule: Schedule, steps: int) -> Tensor: ...

    def step(self, out: Tensor, x_t: Tensor, t: Tensor, t_prev: Tensor, schedule: Schedule,
             noise: Tensor | None) -> Tensor: ...


@runtime_checkable
class Classifier(Protocol):
    """A noise-aware classifier p_φ(y | x_t, t): ``__call__(x_t, t) -> logits [B, K]``."""

    num_classes: int
    sample_shape: tuple[int, ...]

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor: ...


@runtime_checkable
class Guidance(Protocol):
    """Changes the model output at each step by wrapping the predictor, so any sampler works with it.

    ``wrap(predictor, scale)`` returns a NoisePredictor whose output is the guided one; ``scale`` is
    a [B] tensor (one guidance scale per sample). The wrapped predictor receives the requested labels.

    Optional, for guidance that steers the mean of p(x_{t-1}|x_t) (classifier guidance, Algorithm 1
    of Dhariwal & Nichol): ``gradient(x_t, t, y, scale) -> s·∇ log p(y|x_t)``. A sampler that exposes
    ``log_variance(out, x, i, plan)`` (ddpm) then gets the mean shift Σ·s·∇ added to
    its step instead of the ε-space form. Optional ``num_classes`` (labels the guidance accepts) and
    ``check(predictor, train_schedule)`` (raise ToolkitError when the guidance does not fit the model).
    """

    name: str

    def wrap(self, predictor: NoisePredictor, scale: Tensor) -> NoisePredictor: ...


@runtime_checkable
class Autoencoder(Protocol):
    """The network of a ``latent`` plugin (latent diffusion, Rombach et al.): ``encode(x) -> z`` (the posterior
    mean), ``decode(z) -> x``, and ``__call__(x, noise) -> (reconstruction, KL)`` for training with
    ``kl_weight``; latents have ``latent_shape``, data ``sample_shape``."""

    sample_shape: tuple[int, ...]
    latent_shape: tuple[int, ...]
    kl_weight: float

    def encode(self, x: Tensor) -> Tensor: ...

    def decode(self, z: Tensor) -> Tensor: ...

    def __call__(self, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]: ...


@runtime_checkable
class Task(Protocol):
    """What one kind of training run learns; the toolkit's training loop (AdamW, warm-up, EMA, clipping,
    precision, DDP, checkpoints, exact resume) does the rest. ``name`` is the checkpoint's ``kind``;
    ``network_kind`` the registry kind that builds its network again from a checkpoint ("model",
    "classifier", "latent"). Every step the loop draws, from the step's generator: the batch rows, t,
    ε of the data's shape and the label-dropout mask; then ``extra_noise(model, n, generator)``.

    ``build(config, data)``: the network for the data (``TrainConfig``, ``ArrayDataset``).
    ``loss(net, schedule, batch)``: the loss of one batch (``toolkit.training.Batch``).
    ``model_options(model, config, data)``: what config.json records to build the network again.
    ``scores(ema_model, schedule, x, y)``: held-out scores of the EMA network (e.g. accuracy, loss); {} for none.
    ``summary(ema_model, x)``: extra top-level config.json fields from the EMA network and the training data x.
    ``samples``: whether it samples (previews with --sample-every).
    """

    name: str
    network_kind: str
    samples: bool

    def build(self, config: Any, data: Any) -> Any: ...

    def extra_noise(self, model: Any, n: int, generator: Any) -> dict[str, Tensor]: ...

    def loss(self, net: Any, schedule: Schedule, batch: Any) -> Tensor: ...

    def model_options(self, model: Any, config: Any, data: Any) -> dict[str, Any]: ...

    def scores(self, model: Any, schedule: Schedule, x: Tensor, y: Tensor | None) -> dict[str, Any]: ...

    def summary(self, model: Any, x: Tensor) -> dict[str, Any]: ...


# ---------------------------------------------------------------- optional members
# What the core reads beyond the four protocols, each a named protocol checked with isinstance (never a
# getattr with a default outside toolkit/optional.py), and each with a conformance check in toolkit.testing.


@runtime_checkable
class HasLogVariance(Protocol):
    """A sampler whose step draws from a Gaussian with log Σ = ``log_variance(out, x, i, plan)`` (ddpm):
    classifier guidance then shifts its mean by Σ·s·∇ log p(y|x_t) (Algorithm 1 of Dhariwal & Nichol)."""

    def log_variance(self, out: Tensor, x: Tensor, i: Tensor, plan: Any) -> Tensor: ...


@runtime_checkable
class Invertible(Protocol):
    """A deterministic sampler that can run backwards: ``inverse_plan(schedule, steps)`` is a Plan that its own
    ``step`` (with x̂_0 unclipped) drives from the data to x_T (DDIM inversion), for editing."""

    def inverse_plan(self, schedule: Schedule, steps: int) -> Any: ...


@runtime_checkable
class HasDefaultSteps(Protocol):
    """A sampler's number of steps when none is given (ddim 50, unipc 10); None: the schedule's T."""

    default_steps: int | None


@runtime_checkable
class ClipsX0(Protocol):
    """A sampler that clips x̂_0 to [-1, 1] when ``clip_x0``; a latent pipeline turns it off (latents are not
    confined to the data range) unless the user set it."""

    clip_x0: bool


@runtime_checkable
class Stochastic(Protocol):
    """Whether a sampler draws noise in its steps (ddpm, ddim with η > 0): listed and recorded in exports."""

    stochastic: bool


@runtime_checkable
class GradientGuidance(Protocol):
    """Guidance that steers the mean: ``gradient(x_t, t, y, scale) -> s·∇_{x_t} log p(y|x_t)``. With a
    HasLogVariance sampler the pipeline adds Σ times it to the mean; it cannot be exported (autograd)."""

    def gradient(self, x_t: Tensor, t: Tensor, y: Tensor | None, scale: Any) -> Tensor: ...


@runtime_checkable
class LabelledGuidance(Protocol):
    """Guidance with labels of its own (a classifier's K), which then bound the labels the pipeline accepts."""

    num_classes: int | None


@runtime_checkable
class ChecksModel(Protocol):
    """Guidance that can tell it does not fit a model: ``check(predictor, train_schedule)`` raises ToolkitError."""

    def check(self, predictor: NoisePredictor, train_schedule: Schedule) -> None: ...


@runtime_checkable
class LatentAware(Protocol):
    """Guidance trained on some data space: ``latent_fingerprint`` names the autoencoder whose latents it saw
    (None: the data itself); composing it with a model of another space is refused."""

    latent_fingerprint: str | None


@runtime_checkable
class FeatureNetwork(Protocol):
    """A classifier whose ``features(x) -> [B, D]`` (its penultimate layer) gives the space of the Fréchet
    distance of ``toolkit evaluate --metric fid`` (the ``features`` task trains one)."""

    def features(self, x: Tensor) -> Tensor: ...


OPTIONAL_PROTOCOLS: dict[str, tuple[type, ...]] = {
    "sampler": (HasLogVariance, HasDefaultSteps, ClipsX0, Stochastic, Invertible),
    "guidance": (GradientGuidance, LabelledGuidance, ChecksModel, LatentAware),
    "classifier": (FeatureNetwork,),
}


PROTOCOLS: dict[str, type] = {
    "schedule": Schedule,
    "sampler": Sampler,
    "guidance": Guidance,
    "model": NoisePredictor,
    "classifier": Classifier,
    "latent": Autoencoder,
    "task": Task,
}
