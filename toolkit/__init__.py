"""diffusion-toolkit: denoising diffusion models (DDPM, DDIM, guidance, latent) as composable plugins.

    >>> import toolkit
    >>> toolkit.available("sampler")
    ['ddim', 'ddpm']
    >>> pipe = toolkit.compose(schedule="cosine", sampler="ddim", steps=50)   # shipped digits model
    >>> x = pipe.sample(16, seed=0, labels=7)                                   # [16, 1, 8, 8] in [-1, 1]
"""

from toolkit._version import PLUGIN_API_VERSION, __version__
from toolkit.checkpoint import Checkpoint, load_checkpoint
from toolkit.data import ArrayDataset
from toolkit.errors import CheckpointError, PluginError, ToolkitError
from toolkit.hookspecs import hookimpl
from toolkit.pipeline import Pipeline, compose
from toolkit.protocols import Guidance, NoisePredictor, Sampler, Schedule
from toolkit.registry import available, create
from toolkit.schedule import BetaSchedule, schedule_from_alphas_cumprod, schedule_from_betas

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
    "__version__",
    "available",
    "compose",
    "create",
    "hookimpl",
    "load_checkpoint",
    "schedule_from_alphas_cumprod",
    "schedule_from_betas",
]
