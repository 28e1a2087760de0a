"""Errors a user can cause: the CLI prints their message as one line and exits with status 2."""


class ToolkitError(ValueError):
    """Bad input from a user: an unknown name, an out-of-range option, a corrupt checkpoint."""


class PluginError(ToolkitError):
    """A plugin is missing, ambiguous, broken or does not follow its protocol."""


def parse_device(device):
    """torch.device(device), with a clear error for a bad name or a missing CUDA."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ToolkitError(f"unknown device {device!r}; use cpu or cuda") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ToolkitError("device cuda requested but CUDA is not available")
    return dev


class CheckpointError(ToolkitError):
    """A checkpoint directory is missing, incomplete or does not fit what it is used with."""
