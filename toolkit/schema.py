"""One validated schema for what the toolkit reads back from disk: a checkpoint's config.json, its
training_state tensors and a shard index. Types, ranges and sizes are checked before anything is built or
allocated; an error names the field (``training.step must be an integer in 0..., got 'abc'``)."""

from __future__ import annotations

import re
from typing import Any, Callable

from toolkit import limits
from toolkit.errors import ToolkitError

Check = Callable[[str, Any], Any]


def _type(kind: type | tuple[type, ...], label: str) -> Check:
    def check(name: str, value: Any) -> Any:
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise ToolkitError(f"{name} must be {label}, got {value!r}")
        if not isinstance(value, kind):
            raise ToolkitError(f"{name} must be {label}, got {value!r}")
        return value
    return check


def _integer(low: int = 0, high: int = limits.MAX_COUNT) -> Check:
    return lambda name, value: limits.integer(name, value, low, high)


def _number(low: float = 0.0) -> Check:
    return lambda name, value: limits.number(name, value, low)


def _optional(check: Check) -> Check:
    return lambda name, value: None if value is None else check(name, value)


def _list_of(check: Check) -> Check:
    def run(name: str, value: Any) -> Any:
        _type(list, "a list")(name, value)
        for i, item in enumerate(value):
            check(f"{name}[{i}]", item)
        return value
    return run


def _record(fields: dict[str, tuple[bool, Check]]) -> Check:
    """A JSON object: each field (required or not) checked; other keys are allowed (newer writers)."""
    def check(name: str, value: Any) -> Any:
        _type(dict, "an object")(name, value)
        for key, (required, field_check) in fields.items():
            where = f"{name}.{key}" if name else key
            if key not in value:
                if required:
                    raise ToolkitError(f"{where} is missing")
                continue
            field_check(where, value[key])
        return value
    return check


_str = _type(str, "a string")
_dict = _type(dict, "an object")
_shape = lambda name, value: limits.sample_shape(value, name)  # noqa: E731
_classes = lambda name, value: limits.classes(value, name)  # noqa: E731
_sha = _type(str, "a hash string")

_plugin = _record({"name": (True, _str), "dist": (False, _str), "options": (False, _dict)})
_model_options = _record({"num_classes": (False, _classes), "sample_shape": (False, _shape)})
_schedule_options = _record({"num_timesteps": (False, _integer(1, limits.MAX_TIMESTEPS))})

CONFIG = _record({
    "format_version": (True, _integer(1)),
    "kind": (False, _str),
    "toolkit_version": (False, _str),
    "model": (True, _plugin),
    "schedule": (False, _plugin),
    "data": (False, _record({"shape": (False, _shape), "latent_shape": (False, _shape),
                             "num_classes": (False, _classes), "levels": (False, _optional(_integer(2, 2**16))),
                             "class_names": (False, _optional(_list_of(_str))),
                             "options": (False, _dict)})),
    "training": (False, _record({
        "step": (True, _integer(0)),
        "config": (False, _record({"num_timesteps": (False, _integer(1, limits.MAX_TIMESTEPS)),
                                   "batch_size": (False, _integer(1)), "steps": (False, _integer(1)),
                                   "model_options": (False, _dict), "dataset_options": (False, _dict),
                                   "latent": (False, _optional(_str))})),
        "loss": (False, _optional(_type((int, float), "a number"))),
        "elapsed_s": (False, _number(0.0)),
        "world_size": (False, _integer(1, 2**20)),
        "command": (False, _optional(_str)),
        "commands": (False, _list_of(_str)),
    })),
    "latent": (False, _record({"fingerprint": (True, _sha), "scale_factor": (True, _number(1e-30)),
                               "autoencoder": (False, _str), "latent_shape": (False, _shape),
                               "data_shape": (False, _shape)})),
})


def check_config(config: Any) -> dict[str, Any]:
    """config.json of a checkpoint, checked field by field (the model and schedule options per-plugin)."""
    CONFIG("", config)
    _model_options("model.options", config["model"].get("options", {}))
    if "schedule" in config:
        _schedule_options("schedule.options", config["schedule"].get("options", {}))
    return config


_OPTIM_KEY = re.compile(r"optim\.(\d+)\.(step|exp_avg|exp_avg_sq|max_exp_avg_sq)$")


def check_training_state(state: dict[str, Any], params: list[Any]) -> None:
    """training_state.safetensors: an integer EMA count and AdamW moments shaped like the parameters.

    (The ``model.*`` weights are checked by the strict load that follows.)"""
    import torch

    n = state.get("ema.n_averaged")
    if n is None:
        raise ToolkitError("ema.n_averaged is missing")
    if n.numel() != 1 or n.dtype.is_floating_point or n.dtype == torch.bool or int(n) < 0:
        raise ToolkitError(f"ema.n_averaged must be one integer ≥ 0, got a {n.dtype} tensor of shape {list(n.shape)}")
    for key, value in state.items():
        if key.startswith("model.") or key == "ema.n_averaged":
            continue
        if key in ("importance.history", "importance.count"):  # --importance-sampling's loss history
            if value.ndim not in (1, 2) or (key == "importance.count") == value.dtype.is_floating_point:
                raise ToolkitError(f"{key} has the wrong type or shape: {value.dtype} {list(value.shape)}")
            if value.dtype.is_floating_point and not bool(torch.isfinite(value).all()):  # L_0 may be negative
                raise ToolkitError(f"{key} holds non-finite values")
            if not value.dtype.is_floating_point and bool((value < 0).any()):
                raise ToolkitError(f"{key} holds negative counts")
            continue
        match = _OPTIM_KEY.match(key)
        if match is None:
            raise ToolkitError(f"unexpected tensor {key!r}")
        index, what = int(match.group(1)), match.group(2)
        if index >= len(params):
            raise ToolkitError(f"{key}: the model has {len(params)} parameters, not {index + 1}")
        want = () if what == "step" else tuple(params[index].shape)
        if tuple(value.shape) != want or not value.dtype.is_floating_point:
            raise ToolkitError(f"{key} must be a float tensor of shape {list(want)}, got {value.dtype} "
                               f"{list(value.shape)}")
        if not bool(torch.isfinite(value).all()) or (what == "step" and float(value) < 0):
            raise ToolkitError(f"{key} holds non-finite or negative values")


_SHARD_FILE = re.compile(r"shard-\d{5}-of-\d{5}\.npy$")

SHARD_INDEX = _record({
    "n": (True, _integer(1)),
    "seed": (True, _integer(0, 2**64 - 1)),
    "world_size": (True, _integer(1, 2**20)),
    "shape": (True, _shape),
    "run": (False, _str),
    "shards": (True, _list_of(_record({"file": (True, _str), "start": (True, _integer(0)),
                                       "stop": (True, _integer(0))}))),
})


def check_shard_index(index: Any) -> dict[str, Any]:
    """index.json of a sharded run: plain shard file names (no paths), contiguous ranges covering 0..n."""
    SHARD_INDEX("", index)
    shards = index["shards"]
    if len(shards) != index["world_size"]:
        raise ToolkitError(f"shards lists {len(shards)} files for world_size {index['world_size']}")
    at = 0
    for i, s in enumerate(shards):
        if not _SHARD_FILE.match(s["file"]):
            raise ToolkitError(f"shards[{i}].file must be a shard file name (shard-R-of-W.npy), got {s['file']!r}")
        if s["start"] != at or s["stop"] < s["start"]:
            raise ToolkitError(f"shards[{i}] covers {s['start']}..{s['stop']}, expected to start at {at}")
        at = s["stop"]
    if at != index["n"]:
        raise ToolkitError(f"the shards cover {at} samples, n is {index['n']}")
    return index
