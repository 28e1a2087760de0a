"""Bounds checked before anything is allocated: one edited number must give a clear error, never a request
for terabytes (issue 14). The bounds are generous for what this toolkit trains; memory is this machine's."""

from __future__ import annotations

import math
import numbers
import os
from typing import Any, Callable

from toolkit.errors import ToolkitError

MAX_CLASSES = 100_000  # ImageNet-21k has 21 841
MAX_TIMESTEPS = 100_000  # the papers use 1000 to 4000
MAX_SIDE = 65_536  # one dimension of a sample (channels, height, width or vector length)
MAX_SAMPLE_NUMEL = 2**26  # values in one sample (a 4096×4096 RGB image is 2^25.6)
MAX_COUNT = 2**40  # samples, steps, batch sizes: bounded by memory and disk checks below as well


def integer(name: str, value: Any, low: int = 1, high: int = MAX_COUNT) -> int:
    """An integer in [low, high] (bools, floats and strings refused), or a ToolkitError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        span = f"≥ {low}" if high == MAX_COUNT else f"in {low}..{high}"
        raise ToolkitError(f"{name} must be an integer {span}, got {value!r}")
    return int(value)


def number(name: str, value: Any, low: float = -math.inf, high: float = math.inf, *, high_open: bool = False) -> float:
    """A finite real number in [low, high] (or [low, high) with ``high_open``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or not low <= value <= high or (high_open and value == high):
        if high == math.inf:
            span = "" if low == -math.inf else f" ≥ {low:g}"
        else:
            span = f" in [{low:g}, {high:g}{')' if high_open else ']'}"
        raise ToolkitError(f"{name} must be a finite number{span}, got {value!r}")
    return float(value)


def flag(name: str, value: Any) -> bool:
    """A boolean option given as True/False or as text: "true"/"false", "1"/"0", "yes"/"no" in any case."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ToolkitError(f"{name} must be true or false, not {value!r}")


def classes(value: Any, name: str = "num_classes") -> int | None:
    """None (unconditional) or a class count in 1..MAX_CLASSES."""
    return None if value is None else integer(name, value, 1, MAX_CLASSES)


def sample_shape(value: Any, name: str = "sample_shape") -> tuple[int, ...]:
    """A sample shape: 1 to 4 dimensions of 1..MAX_SIDE, at most MAX_SAMPLE_NUMEL values in all."""
    if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= 4:
        raise ToolkitError(f"{name} must be a list of 1 to 4 sizes, got {value!r}")
    shape = tuple(integer(name, s, 1, MAX_SIDE) for s in value)
    if math.prod(shape) > MAX_SAMPLE_NUMEL:
        raise ToolkitError(f"{name} {list(shape)} holds {math.prod(shape)} values per sample, more than "
                           f"{MAX_SAMPLE_NUMEL}")
    return shape


def physical_memory() -> int:
    """Bytes of RAM on this machine (a large number where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2**50


def human(nbytes: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if nbytes < 1000 or unit == "PB":
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    raise AssertionError


def fits_memory(what: str, nbytes: float, hint: str = "") -> None:
    """Refuse work whose tensors alone exceed this machine's memory, before allocating them."""
    total = physical_memory()
    if nbytes > total:
        raise ToolkitError(f"{what} needs {human(nbytes)} of memory, more than this machine's {human(total)}"
                           + (f"; {hint}" if hint else ""))


def fits_disk(what: str, nbytes: float, folder: str | os.PathLike) -> None:
    """Refuse an output that cannot fit in the free space of ``folder``, before computing it."""
    import shutil

    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if nbytes > free:
        raise ToolkitError(f"{what} would take {human(nbytes)} on disk; {str(folder)!r} has {human(free)} free")


def _skip_meta_normal():
    """A torch-function mode that skips ``normal_`` on meta tensors: they hold no values, and on meta it runs
    through torch._refs, whose first use imports torch._dynamo (about 1 s of CPU in every command that loads
    a model with an embedding)."""
    import torch

    class Mode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.nn.init.normal_ or func is torch.Tensor.normal_:
                tensor = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
                if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                    return tensor
            return func(*args, **kwargs)

    return Mode()


def bounded_module(what: str, factory: Callable[[], Any], copies: int = 1) -> Any:
    """Build a network only after its parameters are known to fit in memory: it is built once on the meta
    device (no storage) and counted (``copies``: 5 when training, for EMA, gradients and AdamW's two
    moments). A plugin whose constructor cannot run on meta is built directly."""
    import torch

    from toolkit.errors import PluginError

    try:
        with torch.device("meta"), _skip_meta_normal():
            probe = factory()
        params = sum(p.numel() * p.element_size() for p in probe.parameters()) if hasattr(probe, "parameters") else 0
    except PluginError:
        raise
    except ToolkitError as exc:  # an option the plugin refused: say which plugin
        raise ToolkitError(f"{what}: {exc}") from None
    except Exception:  # noqa: BLE001 - e.g. a constructor that computes with tensors: no estimate, no refusal
        params = 0
    fits_memory(what, params * copies, "choose smaller model options")
    return factory()
