"""The `toolkit` command: a thin click layer over the Python API, one module per command or group.

Plugins add commands through the ``register_commands`` hook (``toolkit.hookspecs``); they are loaded only
when a command that is not built in is asked for (or the command list is shown).
"""

from toolkit.cli import edit, evaluate, export, plugins, sample, show, train, tune  # noqa: F401  (each attaches its commands)
from toolkit.cli.base import cli, main
from toolkit.registry import BUILTIN_COMMANDS

BUILTIN_COMMANDS.update(cli.commands)  # a plugin adding one of these names is refused, naming both

__all__ = ["cli", "main"]
