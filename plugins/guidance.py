"""Built-in guidance: classifier-free (Ho & Salimans 2022) and classifier guidance (Dhariwal & Nichol 2021)."""

from __future__ import annotations

import os
from functools import cached_property

import torch
import torch.nn.functional as F
from attrs import define, field
from torch import Tensor

from toolkit import diffusion
from toolkit.errors import ToolkitError
from toolkit.hookspecs import hookimpl
from toolkit.protocols import NoisePredictor


def _non_negative(instance, attribute, value) -> None:
    if not value >= 0:  # also rejects NaN
        raise ToolkitError(f"guidance scale must not be negative (or NaN), got {value}")


def _unit(instance, attribute, value) -> None:
    if not 0.0 <= value <= 1.0:
        raise ToolkitError(f"cfg {attribute.name} φ must lie in [0, 1], got {value}")


def _per_sample(scale: Tensor | float, like: Tensor) -> Tensor:
    s = torch.as_tensor(scale, dtype=like.dtype, device=like.device).reshape(-1)
    if s.numel() == 1:
        s = s.expand(like.shape[0])
    if s.numel() != like.shape[0]:
        raise ToolkitError(f"guidance scale has {s.numel()} values for a batch of {like.shape[0]}")
    return s.reshape(-1, *([1] * (like.ndim - 1)))


@define
class _Wrapped:
    """A NoisePredictor that forwards the protocol attributes of the predictor it wraps."""

    inner: NoisePredictor

    @property
    def prediction(self) -> str:
        return self.inner.prediction

    @property
    def learned_variance(self) -> bool:
        return self.inner.learned_variance

    @property
    def num_classes(self) -> int | None:
        return self.inner.num_classes

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.inner.sample_shape


def _std(x: Tensor) -> Tensor:
    """Each sample's standard deviation over its values (unbiased, as torch.std), shaped [B, 1, ...]."""
    dims = tuple(range(1, x.ndim))
    n = x[0].numel()
    centred = x - x.mean(dim=dims, keepdim=True)
    return (centred.square().sum(dim=dims, keepdim=True) / max(n - 1, 1)).sqrt()


def rescale_guided(guided: Tensor, cond: Tensor, phi: float) -> Tensor:
    """CFG rescale (Lin et al. 2024, §3.4): x_rescaled = x_cfg·std(x_pos)/std(x_cfg), then
    φ·x_rescaled + (1 − φ)·x_cfg; brings the guided output's spread back to the conditional one's (no overexposure)."""
    rescaled = guided * (_std(cond) / _std(guided).clamp(min=1e-12))
    return phi * rescaled + (1 - phi) * guided


@define
class CFGPredictor(_Wrapped):
    scale: Tensor | float = 0.0
    rescale: float = 0.0

    def __call__(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """ε̄ = (w+1)·ε(x_t, t, y) − w·ε(x_t, t, ∅): conditional and null rows in one batched forward; in the
        model's own output (ε, or v as in Lin et al.), then rescaled by φ = ``rescale`` when φ > 0."""
        K = self.inner.num_classes
        if y is None:
            raise ToolkitError("classifier-free guidance needs class labels (--class)")
        null = torch.full_like(y, K)
        out = self.inner(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null]))
        B = x_t.shape[0]
        cond, uncond = out[:B], out[B:]  # slices, not chunk(2): chunk pins the batch size in torch.export
        C = x_t.shape[1]
        w = _per_sample(self.scale, x_t)
        guided = (w + 1) * cond[:, :C] - w * uncond[:, :C]
        if self.rescale > 0:
            guided = rescale_guided(guided, cond[:, :C], self.rescale)
        return torch.cat([guided, cond[:, C:]], dim=1) if cond.shape[1] > C else guided


@define(frozen=True)
class ClassifierFree:
    """cfg: classifier-free guidance with weight w (w = 0: plain conditional sampling); ``rescale`` φ in [0, 1] is
    Lin et al.'s CFG rescale (0: off; they use 0.7 with zero-terminal-SNR models)."""

    scale: float = field(default=3.0, converter=float, validator=_non_negative)
    rescale: float = field(default=0.0, converter=float, validator=_unit)
    name: str = field(default="cfg", init=False)

    def check(self, predictor: NoisePredictor, train_schedule=None) -> None:
        if getattr(predictor, "num_classes", None) is None:
            raise ToolkitError("cfg needs a class-conditional model with a null label ∅ (trained with --p-uncond > 0); "
                               "this model is unconditional")
        if getattr(predictor, "null_label_trained", True) is False:
            raise ToolkitError("cfg needs a model whose null label ∅ was trained (--p-uncond > 0); "
                               "this model was trained with --p-uncond 0")

    def wrap(self, predictor: NoisePredictor, scale: Tensor | float | None = None) -> NoisePredictor:
        self.check(predictor)
        return CFGPredictor(predictor, self.scale if scale is None else scale, self.rescale)


@define
class ClassifierGuidedPredictor(_Wrapped):
    guidance: "ClassifierGuidance" = None  # type: ignore[assignment]
    scale: Tensor | float = 0.0

    @property
    def prediction(self) -> str:
        return "epsilon"  # the guided output is always ε̂, whatever the model predicts

    def __call__(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """ε̂ = ε_θ(x_t) − √(1−ᾱ_t)·s·∇_{x_t} log p_φ(y|x_t)  (Algorithm 2); ε_θ is unconditional (∅)."""
        out = self.inner(x_t, t, None)
        grad = self.guidance.gradient(x_t, t, y, self.scale)
        a = self.guidance.alpha_bar(t).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        C = x_t.shape[1]
        eps = diffusion.eps_from_output(self.inner.prediction, a, x_t, out[:, :C]) + diffusion.eps_from_score(a, grad)
        return torch.cat([eps, out[:, C:]], dim=1) if out.shape[1] > C else eps


@define(frozen=True)
class ClassifierGuidance:
    """classifier: steer an unconditional model with ∇ log p_φ(y|x_t) of a noise-aware classifier.

    With ddpm the mean is shifted, x_{t-1} ~ N(μ + s·Σ·∇, Σ) (Algorithm 1); with every other sampler
    ε̂ = ε − √(1−ᾱ_t)·s·∇ (Algorithm 2). ``classifier`` is a checkpoint directory made by
    ``toolkit train-classifier`` or a shipped name (default: the digits classifier).
    """

    classifier: str | os.PathLike | None = None
    scale: float = field(default=1.0, converter=float, validator=_non_negative)
    device: str = "cpu"
    name: str = field(default="classifier", init=False)

    @cached_property
    def _loaded(self):
        from toolkit.checkpoint import load_checkpoint

        ckpt = load_checkpoint(self.classifier or "digits-classifier", device=self.device)
        if ckpt.kind != "classifier":
            raise ToolkitError(f"checkpoint {str(ckpt.path)!r} holds a {ckpt.kind}, not a classifier")
        return ckpt

    @property
    def model(self):
        return self._loaded.model

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def latent_fingerprint(self) -> str | None:
        """The autoencoder whose latents the classifier was trained on (None: trained on the data)."""
        return (self._loaded.config.get("latent") or {}).get("fingerprint")

    def alpha_bar(self, t: Tensor) -> Tensor:
        """ᾱ at (possibly fractional) training-schedule time t: log-SNR linear in t between integer times, as
        everywhere else in the toolkit (a linear ᾱ would disagree with the sampler's own ᾱ between them)."""
        from toolkit.diffusion import interp_alpha_bar

        return interp_alpha_bar(self._loaded.schedule, t.to(torch.float64), t, torch.float64).reshape(-1)

    def check(self, predictor: NoisePredictor, train_schedule=None) -> None:
        clf = self.model
        if tuple(clf.sample_shape) != tuple(predictor.sample_shape):
            raise ToolkitError(f"classifier data shape {tuple(clf.sample_shape)} does not fit the model's "
                               f"{tuple(predictor.sample_shape)}")
        K = getattr(predictor, "num_classes", None)
        if K is not None and K != clf.num_classes:
            raise ToolkitError(f"classifier has {clf.num_classes} classes but the model has {K}")
        mine = self._loaded.schedule
        if train_schedule is not None:
            if train_schedule.num_timesteps != mine.num_timesteps:
                raise ToolkitError(f"classifier was trained with T={mine.num_timesteps} but the model with "
                                   f"T={train_schedule.num_timesteps}")
            if not torch.allclose(train_schedule.alphas_cumprod.double(), mine.alphas_cumprod.double(), atol=1e-9):
                raise ToolkitError(f"classifier was trained with the {mine.name} schedule but the model with "
                                   f"{getattr(train_schedule, 'name', 'another')}; train them with the same schedule")

    def gradient(self, x_t: Tensor, t: Tensor, y: Tensor | None, scale: Tensor | float) -> Tensor:
        """s·∇_{x_t} log p_φ(y | x_t, t)."""
        if y is None:
            raise ToolkitError("classifier guidance needs class labels (--class)")
        model = self.model.to(x_t.device)
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            logp = F.log_softmax(model(x, t), dim=-1)
            selected = logp[torch.arange(len(y), device=x.device), y.long()].sum()
            (grad,) = torch.autograd.grad(selected, x)
        return _per_sample(scale, x_t) * grad.to(x_t.dtype)

    def wrap(self, predictor: NoisePredictor, scale: Tensor | float | None = None) -> NoisePredictor:
        self.check(predictor)
        return ClassifierGuidedPredictor(predictor, self, self.scale if scale is None else scale)


@hookimpl
def register_guidance(register):
    register("cfg", ClassifierFree, aliases=("classifier-free",))
    register("classifier", ClassifierGuidance)
