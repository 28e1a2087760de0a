"""Built-in networks: a UNet for images and an MLP for vectors (2-D toys)."""

from toolkit.hookspecs import hookimpl

from .mlp import MLP
from .unet import UNet


@hookimpl
def register_models(register):
    register("unet", UNet)
    register("mlp", MLP)


__all__ = ["MLP", "UNet"]
