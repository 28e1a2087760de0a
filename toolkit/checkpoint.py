"""Checkpoint directories: config.json + model.safetensors (+ training_state.safetensors to resume).

No pickle is ever loaded. A checkpoint is written into a temporary sibling directory and renamed
into place, so a killed run never leaves a half-written checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Iterator

import torch
from attrs import define
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from toolkit import limits, schema
from toolkit.errors import CheckpointError, ToolkitError
from toolkit.files import alive, fault_point, through_link, umask_mode

FORMAT = "diffusion-toolkit-checkpoint"
FORMAT_VERSION = 1
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TRAINING_STATE = "training_state.safetensors"
def network_kind(kind: str) -> str | None:
    """The registry kind that builds the network of a checkpoint of ``kind``: the ``network_kind`` of the
    training task of that name (toolkit plugins), None for a kind no installed task knows."""
    from toolkit.registry import get_registry

    try:
        entry = get_registry().lookup("task", kind)
    except ToolkitError:
        return None
    return entry.factory().network_kind


@define(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the network (eval mode, EMA weights), its config and its training schedule."""

    path: Path
    config: dict[str, Any]
    model: nn.Module
    schedule: Any

    @property
    def kind(self) -> str:
        return self.config.get("kind", "noise_predictor")


def _fsync_tree(folder: Path) -> None:
    """Every file of a new checkpoint on disk before it replaces the old one."""
    for f in folder.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux") or os.environ.get("TOOLKIT_NO_EXCHANGE"):  # the latter: tests
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    return False  # e.g. a file system without RENAME_EXCHANGE: fall back to two renames


def recover(path: str | os.PathLike) -> Path:
    """Put back a checkpoint stranded by a kill between the two renames of a write (``.NAME.old-PID`` of a
    process that is gone, and no ``NAME``); stale temporary folders of dead writers are removed."""
    path = through_link(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        return path
    for leftover in sorted(parent.glob(f".{path.name}.*-*")):
        kind, _, rest = leftover.name[len(path.name) + 2:].partition("-")
        pid = rest.split("-")[0]
        if kind not in ("old", "tmp") or not pid.isdigit() or not leftover.is_dir() or alive(int(pid)):
            continue
        if kind == "old" and not path.exists():
            os.rename(leftover, path)
        else:
            shutil.rmtree(leftover, ignore_errors=True)
    return path


def write_checkpoint(path: str | os.PathLike, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                     extra: dict[str, dict[str, torch.Tensor]] | None = None,
                     files: dict[str, bytes] | None = None) -> Path:
    """Write config.json and model.safetensors (and extra .safetensors files, and other ``files`` such as a
    run's metrics.jsonl and previews) atomically: all of them are the old or the new version together."""
    path = through_link(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ToolkitError(f"output folder {str(parent)!r} does not exist")
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, **config}
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=parent))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS))
        for name, group in (extra or {}).items():
            save_file({k: v.detach().contiguous().cpu() for k, v in group.items()}, str(tmp / name))
        for name, data in (files or {}).items():
            if Path(name).name != name or name in (CONFIG, WEIGHTS, *(extra or {})):
                raise ToolkitError(f"checkpoint file name {name!r} is not a plain, free file name")
            (tmp / name).write_bytes(data)
        with open(tmp / CONFIG, "w") as fh:
            json.dump(config, fh, indent=2, sort_keys=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, umask_mode(0o777))  # mkdtemp makes 0700
        for f in tmp.iterdir():
            os.chmod(f, umask_mode(0o666))
        fault_point("checkpoint:written")
        _fsync_tree(tmp)
        fault_point("checkpoint:synced")
        if path.exists() and _exchange(tmp, path):  # Linux: one atomic swap, old or new at every instant
            fault_point("checkpoint:swapped")
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old version
        else:
            old = None
            if path.exists():  # elsewhere: two renames; a kill between them is undone by recover()
                old = parent / f".{path.name}.old-{os.getpid()}-{os.urandom(4).hex()}"
                os.rename(path, old)
                fault_point("checkpoint:old-moved")
            os.rename(tmp, path)
            fault_point("checkpoint:new-moved")
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def weights_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """A short hash of a state dict: a latent model remembers its autoencoder by it; the ONNX cache keys on it."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name, as the Hugging Face Hub names models


def foreign_format(path: Path) -> Any:
    """The format plugin that reads ``path`` (a folder that is not a toolkit checkpoint, e.g. a diffusers one), or None."""
    cfg_file = Path(path) / CONFIG
    if cfg_file.is_file():
        try:
            if json.loads(cfg_file.read_text()).get("format") == FORMAT:
                return None
        except (OSError, ValueError, AttributeError, UnicodeDecodeError):
            return None
    from toolkit.registry import available, create

    for name in available("format"):
        fmt = create("format", name)
        if fmt.detect(Path(path)):
            return fmt
    return None


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """config.json of a checkpoint directory, with clear errors for what is missing or corrupt; a folder a format
    plugin reads (a diffusers UNet or pipeline) gives the config it maps to."""
    path = recover(path)
    if not path.exists():
        hint = ""
        if HUB_ID.match(str(path)):
            hint = (": it looks like a Hugging Face Hub id, and the toolkit never downloads; download the folder "
                    "first (e.g. `huggingface-cli download " + str(path) + " --local-dir DIR`) and pass DIR")
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist{hint}")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a directory")
    fmt = foreign_format(path)
    if fmt is not None:
        try:
            return schema.check_config(fmt.config(path))
        except CheckpointError:
            raise
        except ToolkitError as exc:
            raise CheckpointError(f"{fmt.name} folder {str(path)!r}: {exc}") from None
    cfg_file = path / CONFIG
    if not cfg_file.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} has no {CONFIG}")
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r}: {CONFIG} is corrupt ({exc})") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {str(path)!r}: {CONFIG} is not a diffusion-toolkit checkpoint")
    version = config.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} was written by a newer toolkit "
                              f"(format {config['format_version']}); upgrade diffusion-toolkit")
    try:
        return schema.check_config(config)
    except ToolkitError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r}: {CONFIG} field {exc}") from None


def read_tensors(path: str | os.PathLike, name: str = WEIGHTS, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    if name == WEIGHTS:
        fmt = foreign_format(Path(path))
        if fmt is not None:
            return fmt.tensors(Path(path), device)
    file = Path(path) / name
    if not file.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} has no {name}")
    try:
        return load_file(str(file), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r}: {name} is corrupt ({exc})") from exc


def build_model(config: dict[str, Any]) -> nn.Module:
    from toolkit.registry import create

    kind = network_kind(config.get("kind", "noise_predictor"))
    if kind is None:
        raise CheckpointError(f"checkpoint holds an unknown kind {config.get('kind')!r}")
    spec = config["model"]
    name = qualified(spec)
    try:
        return limits.bounded_module(f"{kind} {name!r}", lambda: create(kind, name, **spec.get("options", {})))
    except TypeError as exc:
        raise CheckpointError(f"checkpoint config has no valid model entry ({exc})") from exc


def qualified(spec: dict[str, Any]) -> str:
    """``dist:name`` of a recorded plugin, so that a second plugin of the same name cannot make it ambiguous."""
    return f"{spec['dist']}:{spec['name']}" if spec.get("dist") else spec["name"]


def build_schedule(config: dict[str, Any]):
    from toolkit.registry import create

    try:
        spec = config["schedule"]
        return create("schedule", qualified(spec), **spec.get("options", {}))
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint config has no valid schedule entry ({exc})") from exc


def load_state(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {where!r}: weights do not fit the model ({first})") from exc


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint directory (or a shipped pretrained name) for sampling."""
    path = resolve_checkpoint(path)
    config = read_config(path)
    try:
        model = build_model(config)
    except CheckpointError:
        raise
    except ToolkitError as exc:  # the plugin refused the recorded options: say which checkpoint holds them
        raise CheckpointError(f"checkpoint {str(path)!r}: {exc}") from None
    load_state(model, read_tensors(path, WEIGHTS), str(path))
    model.to(device).eval().requires_grad_(False)
    if network_kind(config.get("kind", "noise_predictor")) == "model" and model.num_classes:
        # the null label ∅ is only meaningful when training dropped labels (--p-uncond > 0)
        p_uncond = config.get("training", {}).get("config", {}).get("p_uncond", 0.1)
        model.null_label_trained = bool(p_uncond and p_uncond > 0)
    return Checkpoint(path=path, config=config, model=model, schedule=build_schedule(config))


_reads: ContextVar[list[tuple[str, Path, dict[str, Any]]] | None] = ContextVar("checkpoint_reads", default=None)


@contextmanager
def recording_reads() -> Iterator[list[tuple[str, Path, dict[str, Any]]]]:
    """Every checkpoint resolved meanwhile, as (name or path given, folder, its files' stamps then): what a result
    remembered from them depends on (``toolkit.graph_index``)."""
    reads: list[tuple[str, Path, dict[str, Any]]] = []
    token = _reads.set(reads)
    try:
        yield reads
    finally:
        _reads.reset(token)


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """A directory path, or the name of a shipped pretrained checkpoint (``toolkit plugins``)."""
    path = _resolve(name_or_path)
    reads = _reads.get()
    if reads is not None:
        from toolkit.graph_index import folder_stamps

        reads.append((os.fspath(name_or_path), path, folder_stamps(path)))
    return path


def _resolve(name_or_path: str | os.PathLike) -> Path:
    path = Path(name_or_path)
    if os.sep in str(name_or_path) or str(name_or_path).startswith(".") or not path.exists():
        recover(path)
    if path.exists() or os.sep in str(name_or_path) or str(name_or_path).startswith("."):
        return path
    from toolkit.registry import available, get_registry

    if str(name_or_path).split(":")[-1] in available("pretrained"):
        return Path(get_registry().lookup("pretrained", str(name_or_path)).factory())
    raise CheckpointError(
        f"no checkpoint directory {str(name_or_path)!r} and no pretrained model of that name; "
        f"pretrained: {', '.join(available('pretrained')) or 'none'}"
    )
