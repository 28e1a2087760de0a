"""The one place that reads members a plugin may leave out, with their defaults (see the optional protocols
in toolkit/protocols.py); everything else asks ``isinstance(obj, SomeProtocol)``."""

from __future__ import annotations

from typing import Any

from toolkit.protocols import ClipsX0, HasDefaultSteps, LabelledGuidance, Stochastic


def name(obj: Any) -> str:
    """A plugin object's registered name, or its class name."""
    value = getattr(obj, "name", None)
    return value if isinstance(value, str) else type(obj).__name__


def prediction(model: Any) -> str:
    """What a network predicts ("epsilon", "v", "x0"); a classifier or a plain module: "epsilon"."""
    return getattr(model, "prediction", "epsilon")


def learned_variance(model: Any) -> bool:
    """Whether a network also outputs Improved DDPM's variance interpolation (2C channels)."""
    return bool(getattr(model, "learned_variance", False))


def default_steps(sampler: Any) -> int | None:
    return sampler.default_steps if isinstance(sampler, HasDefaultSteps) else None


def clip_x0(sampler: Any) -> bool:
    return isinstance(sampler, ClipsX0) and bool(sampler.clip_x0)


def stochastic(sampler: Any) -> bool:
    return isinstance(sampler, Stochastic) and bool(sampler.stochastic)


def guidance_classes(guidance: Any) -> int | None:
    return guidance.num_classes if isinstance(guidance, LabelledGuidance) else None


def option(obj: Any, key: str, default: Any = None) -> Any:
    """A plugin's option (an attrs field such as a sampler's η or a guidance's scale), or ``default``."""
    return getattr(obj, key, default)


def has_methods(obj: Any, *names: str) -> bool:
    """Whether ``obj`` has each of these methods: how a plugin-API-1 sampler is told from a version-2 one."""
    return all(callable(getattr(obj, n, None)) for n in names)
