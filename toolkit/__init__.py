"""diffusion-toolkit: denoising diffusion models (DDPM, DDIM, guidance, latent) as composable plugins.

    >>> import toolkit
    >>> toolkit.available("sampler")
    ['ddim', 'ddpm']
    >>> pipe = toolkit.compose(schedule="cosine", sampler="ddim", steps=50)   # shipped digits model
    >>> x = pipe.sample(16, seed=0, labels=7)                                   # [16, 1, 8, 8] in [-1, 1]
"""

from typing import TYPE_CHECKING, Any

from toolkit._version import PLUGIN_API_VERSION, __version__

# Imported on first use (PEP 562), so `import toolkit.exporters.runtime` works where torch is absent.
_LAZY = {
    "Checkpoint": "toolkit.checkpoint", "load_checkpoint": "toolkit.checkpoint",
    "ArrayDataset": "toolkit.data",
    "CheckpointError": "toolkit.errors", "PluginError": "toolkit.errors", "ToolkitError": "toolkit.errors",
    "hookimpl": "toolkit.hookspecs",
    "Pipeline": "toolkit.pipeline", "compose": "toolkit.pipeline",
    "Guidance": "toolkit.protocols", "NoisePredictor": "toolkit.protocols", "Sampler": "toolkit.protocols",
    "Schedule": "toolkit.protocols",
    "available": "toolkit.registry", "create": "toolkit.registry",
    "BetaSchedule": "toolkit.schedule", "schedule_from_alphas_cumprod": "toolkit.schedule",
    "schedule_from_betas": "toolkit.schedule",
    "TunedGrid": "toolkit.tuned_grid", "tune_grid": "toolkit.tuned_grid",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'toolkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


if TYPE_CHECKING:
    from toolkit.checkpoint import Checkpoint, load_checkpoint
    from toolkit.data import ArrayDataset
    from toolkit.errors import CheckpointError, PluginError, ToolkitError
    from toolkit.hookspecs import hookimpl
    from toolkit.pipeline import Pipeline, compose
    from toolkit.protocols import Guidance, NoisePredictor, Sampler, Schedule
    from toolkit.registry import available, create
    from toolkit.schedule import BetaSchedule, schedule_from_alphas_cumprod, schedule_from_betas
    from toolkit.tuned_grid import TunedGrid, tune_grid

__all__ = [
    "PLUGIN_API_VERSION",
    "ArrayDataset",
    "BetaSchedule",
    "Checkpoint",
    "CheckpointError",
    "Guidance",
    "NoisePredictor",
    "Pipeline",
    "PluginError",
    "Sampler",
    "Schedule",
    "ToolkitError",
    "TunedGrid",
    "__version__",
    "available",
    "compose",
    "create",
    "hookimpl",
    "load_checkpoint",
    "schedule_from_alphas_cumprod",
    "schedule_from_betas",
    "tune_grid",
]
