"""Checkpoints shipped inside the package, made by this project's own `toolkit train`."""

from importlib import resources
from pathlib import Path

from toolkit.hookspecs import hookimpl


def _shipped(name: str):
    def factory() -> Path:
        return Path(str(resources.files(__package__).joinpath(name)))

    factory.__doc__ = f"The shipped {name!r} checkpoint directory."
    return factory


@hookimpl
def register_pretrained(register):
    # digits: class-conditional UNet on the 8×8 digits, cosine schedule; see its config.json.
    register("digits", _shipped("digits"))
    # digits-classifier: noise-aware classifier p(y | x_t, t) for classifier guidance of the digits model.
    register("digits-classifier", _shipped("digits-classifier"))
    # digits-features: a clean-data CNN (99.4% on a held-out 10%) whose 128-d layer is the FD feature space.
    register("digits-features", _shipped("digits-features"))
    # latent-digits: a class-conditional UNet on the latents of latent-digits-ae (2×4×4, scaled to unit variance).
    register("latent-digits", _shipped("latent-digits"))
    register("latent-digits-ae", _shipped("latent-digits-ae"))
