"""Built-in training tasks: what `toolkit train`, `train-classifier`, `train-features` and `train-autoencoder`
learn. Each builds its network and computes its loss; the toolkit's loop (toolkit/training.py) does the rest."""

from __future__ import annotations

from typing import Any

import torch
from attrs import define, field
from torch import Tensor, nn

from toolkit import limits
from toolkit.errors import ToolkitError
from toolkit.hookspecs import hookimpl
from toolkit.losses import (autoencoder_summary, holdout_accuracy, loss_autoencoder, loss_classifier, loss_features,
                            loss_hybrid, loss_simple, loss_vlb)
from toolkit.registry import create

TRAINING_COPIES = 5  # weights, EMA, gradients and AdamW's two moments: what memory must hold


def _network(what: str, kind: str, name: str, options: dict[str, Any]) -> nn.Module:
    model = limits.bounded_module(f"{what} {name!r}", lambda: create(kind, name, **options), TRAINING_COPIES)
    if not isinstance(model, nn.Module):
        raise ToolkitError(f"{what} {name!r} is not a torch.nn.Module and cannot be trained")
    return model


@define(frozen=True)
class NoisePredictorTask:
    """ε_θ (or v, x_0) with L_simple (Algorithm 1 of Ho et al.) or L_hybrid (Improved DDPM); class-conditional
    data drops the label to ∅ with probability p_uncond (classifier-free guidance)."""

    name: str = field(default="noise_predictor", init=False)
    network_kind: str = field(default="model", init=False)
    samples: bool = field(default=True, init=False)

    def build(self, config, data) -> nn.Module:
        conditional = config.conditional if config.conditional is not None else data.y is not None
        if conditional and data.y is None:
            raise ToolkitError(f"dataset {data.name!r} has no labels: it cannot train a class-conditional model")
        if config.loss in ("hybrid", "vlb") and not config.learned_variance:
            raise ToolkitError(f"--loss {config.loss} trains the variance through L_vlb: add --learn-variance")
        if config.loss in ("hybrid", "vlb") and config.prediction != "epsilon":
            raise ToolkitError(f"--loss {config.loss} needs --prediction epsilon")
        if config.learned_variance and config.loss == "simple":
            raise ToolkitError("--learn-variance trains Σ through L_vlb, which L_simple leaves out (an untrained Σ would "
                               "drive ddpm): use --loss hybrid or vlb, with --prediction epsilon")
        if config.importance_sampling and config.loss == "simple":
            raise ToolkitError("--importance-sampling samples t by L_vlb: use it with --loss vlb or hybrid")
        options = dict(config.model_options)
        options.update(sample_shape=data.sample_shape, num_classes=data.num_classes if conditional else None,
                       prediction=config.prediction, learned_variance=config.learned_variance)
        return _network("model", "model", config.model, options)

    def extra_noise(self, model, n: int, generator) -> dict[str, Tensor]:
        return {}

    def loss(self, net, schedule, batch) -> Tensor:
        y = batch.y
        if y is not None:  # ∅ = K with probability p_uncond
            y = torch.where(batch.drop, torch.full_like(y, batch.null_label), y)
        if batch.config.loss in ("hybrid", "vlb"):
            fn = loss_hybrid if batch.config.loss == "hybrid" else loss_vlb
            return fn(net, schedule, batch.x0, batch.t, batch.noise, y, batch.levels, batch.weights, batch.observed)
        return loss_simple(net, schedule, batch.x0, batch.t, batch.noise, y)

    def model_options(self, model, config, data) -> dict[str, Any]:
        return {**config.model_options, "sample_shape": list(data.sample_shape), "num_classes": model.num_classes,
                "learned_variance": model.learned_variance, "prediction": config.prediction}

    def scores(self, model, schedule, x, y) -> dict[str, Any]:
        from toolkit.feedback import heldout_loss

        return {"holdout_loss": heldout_loss(model, schedule, x, y)}

    def summary(self, model, x) -> dict[str, Any]:
        return {}


@define(frozen=True)
class ClassifierTask:
    """A noise-aware classifier p_φ(y | x_t, t): cross-entropy on data noised to a uniformly drawn t."""

    name: str = field(default="classifier", init=False)
    network_kind: str = field(default="classifier", init=False)
    samples: bool = field(default=False, init=False)

    def build(self, config, data) -> nn.Module:
        if data.y is None:
            raise ToolkitError(f"dataset {data.name!r} has no labels: it cannot train a classifier")
        return _network("classifier", "classifier", config.model,
                        {**config.model_options, "sample_shape": data.sample_shape, "num_classes": data.num_classes})

    def extra_noise(self, model, n: int, generator) -> dict[str, Tensor]:
        return {}

    def loss(self, net, schedule, batch) -> Tensor:
        return loss_classifier(net, schedule, batch.x0, batch.t, batch.noise, batch.y)

    def model_options(self, model, config, data) -> dict[str, Any]:
        return {**config.model_options, "sample_shape": list(data.sample_shape), "num_classes": model.num_classes}

    def scores(self, model, schedule, x, y) -> dict[str, Any]:
        return {"holdout_accuracy": holdout_accuracy(model, self.name, x, y)}

    def summary(self, model, x) -> dict[str, Any]:
        return {}


@define(frozen=True)
class FeaturesTask(ClassifierTask):
    """A classifier on the clean data, whose penultimate layer gives the features of `evaluate --metric fid`."""

    name: str = field(default="features", init=False)

    def loss(self, net, schedule, batch) -> Tensor:
        return loss_features(net, batch.x0, batch.y)


@define(frozen=True)
class AutoencoderTask:
    """The KL-regularized autoencoder of latent diffusion (Rombach et al.); records its latent scale factor."""

    name: str = field(default="autoencoder", init=False)
    network_kind: str = field(default="latent", init=False)
    samples: bool = field(default=False, init=False)

    def build(self, config, data) -> nn.Module:
        if config.latent:
            raise ToolkitError("an autoencoder trains on the data itself: drop --latent")
        return _network("autoencoder", "latent", config.model,
                        {**config.model_options, "sample_shape": data.sample_shape})

    def extra_noise(self, model, n: int, generator) -> dict[str, Tensor]:
        return {"z": torch.randn((n, *model.latent_shape), generator=generator)}

    def loss(self, net, schedule, batch) -> Tensor:
        return loss_autoencoder(net, batch.x0, batch.extra["z"])

    def model_options(self, model, config, data) -> dict[str, Any]:
        return {**config.model_options, "sample_shape": list(data.sample_shape)}

    def scores(self, model, schedule, x, y) -> dict[str, Any]:
        raise ToolkitError("--holdout applies to noise predictors, classifiers and feature networks")

    def summary(self, model, x) -> dict[str, Any]:
        return {"latent": autoencoder_summary(model, x)}


@hookimpl
def register_tasks(register):
    register("noise_predictor", NoisePredictorTask)
    register("classifier", ClassifierTask)
    register("features", FeaturesTask)
    register("autoencoder", AutoencoderTask)
