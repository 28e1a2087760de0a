"""The plugin hooks (pluggy project "toolkit", entry-point group "toolkit.plugins").

Each kind's hook receives ``register(name, factory, *, aliases=())``. Register factories, not objects,
so that listing plugins stays cheap; ``toolkit.create(kind, name, **kwargs)`` calls the factory.
``register_commands(cli)`` adds ``toolkit`` subcommands (as llm's hook of that name does).
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("toolkit")
hookimpl = pluggy.HookimplMarker("toolkit")

# kind -> hook name; a new kind is one line here and one hookspec below.
HOOKS: dict[str, str] = {
    "schedule": "register_schedules",
    "sampler": "register_samplers",
    "guidance": "register_guidance",
    "model": "register_models",
    "classifier": "register_classifiers",
    "dataset": "register_datasets",
    "latent": "register_latents",
    "pretrained": "register_pretrained",
    "task": "register_tasks",
    "format": "register_formats",
}
COMMAND_HOOK = "register_commands"  # not a kind: it adds click commands, listed by `toolkit plugins`


@hookspec
def register_schedules(register):
    """Register noise schedules: factory(num_timesteps=..., **options) -> Schedule."""


@hookspec
def register_samplers(register):
    """Register samplers: factory(**options) -> Sampler."""


@hookspec
def register_guidance(register):
    """Register guidance methods: factory(**options) -> Guidance."""


@hookspec
def register_models(register):
    """Register network architectures: factory(sample_shape=..., num_classes=..., **options) -> NoisePredictor."""


@hookspec
def register_classifiers(register):
    """Register noise-aware classifiers: factory(sample_shape=..., num_classes=..., **options) -> Classifier."""


@hookspec
def register_datasets(register):
    """Register data sets: factory(**options) -> toolkit.data.ArrayDataset."""


@hookspec
def register_latents(register):
    """Register latent wrappers (autoencoders that sampling and training run through)."""


@hookspec
def register_pretrained(register):
    """Register shipped checkpoints: factory() -> path of a checkpoint directory."""


@hookspec
def register_tasks(register):
    """Register training tasks: factory() -> Task (what `toolkit train` learns: network and loss)."""


@hookspec
def register_formats(register):
    """Readers of other checkpoint folders (e.g. diffusers'): objects with ``detect(path) -> bool``, ``config(path)``
    (the folder's toolkit config) and ``tensors(path)`` (its weights in the toolkit model's names)."""


@hookspec
def register_commands(cli):
    """Add subcommands to the `toolkit` command: ``cli`` is a click group (``@cli.command("name")``). A name
    that a built-in command or another plugin already has is refused; the command is loaded only when it is
    asked for (or the command list is shown), so built-in commands never pay for plugin imports."""
