"""Errors a user can cause: the CLI prints their message as one line and exits with status 2."""


class ToolkitError(ValueError):
    """Bad input from a user: an unknown name, an out-of-range option, a corrupt checkpoint."""


class PluginError(ToolkitError):
    """A plugin is missing, ambiguous, broken or does not follow its protocol."""


class CheckpointError(ToolkitError):
    """A checkpoint directory is missing, incomplete or does not fit what it is used with."""
