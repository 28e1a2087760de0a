"""Built-in networks: a UNet for images and an MLP for vectors (2-D toys)."""

from toolkit.hookspecs import hookimpl

from .autoencoder import ConvAutoencoder
from .classifier import NoisyClassifier
from .features import FeatureCNN
from .mlp import MLP
from .unet import UNet


@hookimpl
def register_models(register):
    register("unet", UNet)
    register("mlp", MLP)


@hookimpl
def register_classifiers(register):
    register("unet-encoder", NoisyClassifier)
    register("cnn", FeatureCNN)  # clean-data classifier: the feature network of `evaluate --metric fid`


@hookimpl
def register_latents(register):
    register("autoencoder", ConvAutoencoder)  # KL-regularized conv autoencoder (kl_weight=0: plain)


__all__ = ["ConvAutoencoder", "MLP", "FeatureCNN", "NoisyClassifier", "UNet"]
