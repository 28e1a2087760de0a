"""The plugin manager: loads entry points one by one, records who registered what, resolves names."""

from __future__ import annotations

import importlib.metadata as metadata
import inspect
import json
import os
import sys
import threading
import warnings
from collections import defaultdict
from types import ModuleType
from typing import Any, Callable

import pluggy
from attrs import define, field

from toolkit import hookspecs
from toolkit.errors import PluginError, ToolkitError

ENTRY_POINT_GROUP = "toolkit.plugins"
KINDS = tuple(hookspecs.HOOKS)
_PLURALS = {"schedules": "schedule", "samplers": "sampler", "models": "model",
            "datasets": "dataset", "latents": "latent", "guidances": "guidance",
            "classifiers": "classifier", "tasks": "task"}


@define(frozen=True)
class Entry:
    """One registered name: which plugin and distribution supplied it, and its factory."""

    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str
    dist: str
    version: str
    aliases: tuple[str, ...] = ()


@define(frozen=True)
class Failure:
    """A plugin that failed to load or raised inside a hook; it is skipped, the rest keep working."""

    plugin: str
    dist: str
    version: str
    error: str


@define(frozen=True)
class CommandEntry:
    """A `toolkit` subcommand added by a plugin's ``register_commands`` hook."""

    name: str
    command: Any  # a click.Command
    plugin: str
    dist: str
    version: str


@define
class Registry:
    """Every entry by kind, the plugins' commands, and the plugins that failed."""

    pm: pluggy.PluginManager
    entries: dict[str, list[Entry]] = field(factory=lambda: defaultdict(list))
    failures: list[Failure] = field(factory=list)
    commands: dict[str, CommandEntry] = field(factory=dict)

    def lookup(self, kind: str, name: str) -> Entry:
        """Resolve ``name`` or ``dist:name``; ambiguity and unknown names are clear errors."""
        kind = normalize_kind(kind)
        dist = None
        if ":" in name:
            dist, name = name.split(":", 1)
        matches = [e for e in self.entries[kind] if name == e.name or name in e.aliases]
        if dist is not None:
            matches = [e for e in matches if e.dist == dist or e.plugin == dist]
        if not matches:
            known = ", ".join(self.names(kind)) or "none"
            where = f" from distribution {dist!r}" if dist else ""
            raise PluginError(f"unknown {kind} {name!r}{where}; available: {known}")
        if len(matches) > 1:
            who = " and ".join(f"{e.dist} ({e.plugin})" for e in matches)
            options = ", ".join(f"{e.dist}:{name}" for e in matches)
            raise PluginError(
                f"{kind} {name!r} is registered by {who}; choose one with {options}"
            )
        return matches[0]

    def names(self, kind: str) -> list[str]:
        return sorted({e.name for e in self.entries[normalize_kind(kind)]})


def normalize_kind(kind: str) -> str:
    kind = _PLURALS.get(kind, kind)
    if kind not in KINDS:
        raise PluginError(f"unknown plugin kind {kind!r}; kinds: {', '.join(KINDS)}")
    return kind


def _strict() -> bool:
    return os.environ.get("TOOLKIT_STRICT_PLUGINS", "") not in ("", "0", "false", "no")


def _disabled() -> set[str]:
    raw = os.environ.get("TOOLKIT_DISABLE_PLUGINS", "")
    return {p.strip() for p in raw.split(",") if p.strip()}


def _entry_points() -> list[metadata.EntryPoint]:
    return list(metadata.entry_points(group=ENTRY_POINT_GROUP))


_lock = threading.RLock()
_registry: Registry | None = None
# Plugins added from Python (tests, notebooks): (object, name, dist, version).
_extra: list[tuple[object, str, str, str]] = []


def _fail(failures: list[Failure], plugin: str, dist: str, version: str, exc: BaseException) -> None:
    if _strict():
        raise exc
    message = f"{type(exc).__name__}: {exc}"
    failures.append(Failure(plugin, dist, version, message))
    warnings.warn(f"toolkit plugin {plugin!r} ({dist}) failed and is skipped: {message}",
                  RuntimeWarning, stacklevel=3)


def _build() -> Registry:
    pm = pluggy.PluginManager("toolkit")
    pm.add_hookspecs(hookspecs)
    failures: list[Failure] = []
    owners: dict[str, tuple[str, str]] = {}
    disabled = _disabled()

    # pluggy's own loader stops at the first broken plugin: load each entry point on its own.
    for ep in _entry_points():
        dist = ep.dist.name if ep.dist is not None else "unknown"
        version = ep.dist.version if ep.dist is not None else "unknown"
        if ep.name in disabled or f"{dist}:{ep.name}" in disabled:
            continue
        try:
            module = ep.load()
            pm.register(module, name=f"{dist}:{ep.name}")
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - isolate any failure of a third-party plugin,
            # sys.exit() at import included (it would end every command silently)
            _fail(failures, f"{dist}:{ep.name}", dist, version, exc)
            continue
        owners[f"{dist}:{ep.name}"] = (dist, version)
    for obj, name, dist, version in _extra:
        if name in disabled:
            continue
        try:
            pm.register(obj, name=name)
        except Exception as exc:  # noqa: BLE001
            _fail(failures, name, dist, version, exc)
            continue
        owners[name] = (dist, version)

    # A misspelled hook name rejects that plugin, naming it (and re-raises in strict mode).
    while True:
        try:
            pm.check_pending()
            break
        except pluggy.PluginValidationError as exc:
            name = pm.get_name(exc.plugin) or repr(exc.plugin)
            pm.unregister(exc.plugin)
            dist, version = owners.pop(name, ("unknown", "unknown"))
            known = ", ".join([*hookspecs.HOOKS.values(), hookspecs.COMMAND_HOOK])
            _fail(failures, name, dist, version,
                  PluginError(f"plugin {name!r} ({dist}) implements an unknown hook: {exc}; hooks: {known}"))

    registry = Registry(pm=pm, failures=failures)
    for kind, hook_name in hookspecs.HOOKS.items():
        hook = getattr(pm.hook, hook_name)
        for impl in hook.get_hookimpls():  # registration order
            plugin_name = impl.plugin_name
            dist, version = owners.get(plugin_name, ("unknown", "unknown"))
            if any(f.plugin == plugin_name for f in failures):
                continue
            added: list[Entry] = []

            def register(name: str, factory: Callable[..., Any], *, aliases=(),
                         _kind=kind, _plugin=plugin_name, _dist=dist, _version=version,
                         _added=added) -> None:
                if not isinstance(name, str) or not name or ":" in name:
                    raise PluginError(f"plugin {_plugin!r}: invalid {_kind} name {name!r}")
                if not callable(factory):
                    raise PluginError(f"plugin {_plugin!r}: factory for {_kind} {name!r} is not callable")
                _added.append(Entry(_kind, name, factory, _plugin, _dist, _version, tuple(aliases)))

            try:
                impl.function(register=register)
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - a hook that raises (or exits) is isolated
                _fail(failures, plugin_name, dist, version, exc)
                continue
            registry.entries[kind].extend(added)
    _collect_commands(registry, owners, failures)
    return registry


BUILTIN_COMMANDS: set[str] = set()  # filled by toolkit.cli.base: names a plugin may not take


def _collect_commands(registry: Registry, owners: dict[str, tuple[str, str]], failures: list[Failure]) -> None:
    """Each plugin's ``register_commands(cli)`` on a group of its own; a clash or a raising hook is that plugin's
    failure, as for the other hooks."""
    import click

    for impl in getattr(registry.pm.hook, hookspecs.COMMAND_HOOK).get_hookimpls():
        plugin_name = impl.plugin_name
        dist, version = owners.get(plugin_name, ("unknown", "unknown"))
        if any(f.plugin == plugin_name for f in failures):
            continue
        group = click.Group()
        try:
            impl.function(cli=group)
            for name, command in group.commands.items():
                if name in BUILTIN_COMMANDS or name in registry.commands:
                    who = "a built-in command" if name in BUILTIN_COMMANDS else registry.commands[name].plugin
                    raise PluginError(f"plugin {plugin_name!r} adds the command {name!r}, which {who} already has")
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - isolated like every other hook
            _fail(failures, plugin_name, dist, version, exc)
            continue
        for name, command in group.commands.items():
            registry.commands[name] = CommandEntry(name, command, plugin_name, dist, version)


def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _registry
    with _lock:
        if _registry is None:
            _registry = _build()
        return _registry


def reset() -> None:
    """Forget the registry so the next use reloads every plugin (tests, after pip install)."""
    global _registry
    with _lock:
        _registry = None


def register_plugin(obj: ModuleType | object, name: str, *, dist: str = "local",
                    version: str = "0") -> None:
    """Add a plugin object from Python, as an entry point would (tests, notebooks)."""
    with _lock:
        _extra.append((obj, name, dist, version))
        reset()


def unregister_plugin(name: str) -> None:
    with _lock:
        _extra[:] = [e for e in _extra if e[1] != name]
        reset()


def protocol_members(protocol: type) -> set[str]:
    """The attributes and methods a Protocol class declares (its own and its bases')."""
    names: set[str] = set()
    for base in protocol.__mro__:
        if base is object or base.__module__ == "typing":
            continue
        names |= {n for n in getattr(base, "__annotations__", {}) if not n.startswith("_")}
        names |= {n for n, v in vars(base).items()
                  if callable(v) and (not n.startswith("_") or n == "__call__")}
    return names


def missing_attributes(obj: object, protocol: type) -> list[str]:
    """Names a protocol requires that ``obj`` lacks."""
    return sorted(n for n in protocol_members(protocol) if not hasattr(obj, n))


def available(kind: str) -> list[str]:
    """The registered names of one kind (schedule, sampler, guidance, model, dataset, latent, pretrained)."""
    return get_registry().names(kind)


def option_value(text: str) -> Any:
    """The value of a KEY=VALUE plugin option: JSON when it parses (numbers, lists, true/false), else the text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def option_names(kind: str, name: str) -> list[str] | None:
    """The keyword options a plugin's factory takes (None when it takes any, or has no signature)."""
    entry = get_registry().lookup(normalize_kind(kind), name)
    try:
        params = inspect.signature(entry.factory).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if normalize_kind(kind) == "schedule":
        from toolkit.schedule import SCHEDULE_WRAPPER_OPTIONS

        names += [n for n in SCHEDULE_WRAPPER_OPTIONS if n not in names]  # the toolkit applies these to any schedule
    return names


def create(kind: str, name: str, **kwargs: Any) -> Any:
    """Build a plugin object by name; the result is checked against the kind's protocol."""
    from toolkit.protocols import PROTOCOLS

    kind = normalize_kind(kind)
    entry = get_registry().lookup(kind, name)
    zero_snr = False
    if kind == "schedule" and "zero_terminal_snr" in kwargs:  # a rescale of any schedule, not the plugin's option
        from toolkit import limits

        kwargs = dict(kwargs)
        zero_snr = limits.flag("zero_terminal_snr", kwargs.pop("zero_terminal_snr"))
    try:
        inspect.signature(entry.factory).bind(**kwargs)
    except TypeError as exc:
        takes = option_names(kind, entry.name)
        unknown = sorted(set(kwargs) - set(takes or ()))
        if takes is not None and unknown:
            raise PluginError(f"{kind} {entry.name!r} ({entry.dist}) takes no option {unknown[0]!r}; its options: "
                              f"{', '.join(takes) or 'none'}") from exc
        raise PluginError(f"{kind} {entry.name!r} ({entry.dist}): bad options {sorted(kwargs)}: {exc}") from exc
    except ValueError:  # no signature (a builtin): let the call itself complain
        pass
    try:
        obj = entry.factory(**kwargs)
    except PluginError:
        raise
    except (ValueError, TypeError) as exc:  # ToolkitError is a ValueError: keep its message as it is
        if isinstance(exc, ToolkitError):
            raise
        raise PluginError(f"{kind} {entry.name!r} ({entry.dist}): {exc}") from exc
    protocol = PROTOCOLS.get(kind)
    if protocol is not None:
        missing = missing_attributes(obj, protocol)
        if missing and kind == "sampler":
            from toolkit.protocols import SamplerV1

            if not missing_attributes(obj, SamplerV1):
                missing = []  # plugin API 1, run through the adapter
        if missing:
            raise PluginError(
                f"{kind} {entry.name!r} from {entry.dist} does not follow the {protocol.__name__} "
                f"protocol: missing {', '.join(missing)}"
            )
    if zero_snr:
        from toolkit.schedule import rescale_zero_terminal_snr

        obj = rescale_zero_terminal_snr(obj)
    return obj


if sys.version_info < (3, 10):  # pragma: no cover
    raise RuntimeError("diffusion-toolkit needs Python 3.10 or newer")
