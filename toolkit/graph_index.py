"""The ONNX cache's folder, and an index from a compose request to the verified graph it ran.

Sampling a cached graph needs only onnxruntime and numpy, yet building the pipeline to find the graph
imports torch: about 2 s of CPU at every command. So once ``compose`` has run a request through its
exported graph (``--backend auto``, the graph checked against torch), it records what the choice
depended on, and the same request later samples that graph without importing torch. The record is used
only while nothing it depended on has changed; anything else (a miss) takes the full path, which checks
everything again and records afresh:

- the request: every option that composes the pipeline, the working directory, the Python installation (``sys.prefix``, PYTHONPATH), the plugin switches
  (TOOLKIT_DISABLE_PLUGINS, TOOLKIT_STRICT_PLUGINS), the toolkit version and the installed plugins (entry
  points, with their distributions' versions);
- the code: the stamp (size, modification and change time, inode) of the file of every module the
  recording process had loaded (torch, onnxruntime, the toolkit, its plugins): about 1200 files, 5 ms;
- the checkpoints it read (the model, a classifier, an autoencoder): the folder each name given resolved
  to, and the stamp of every file in it, as git's index does;
- the graph: its SHA-256, which must equal the one recorded beside it and in its torch check.

A run records nothing when what it read may differ from what is on disk when it ends (a checkpoint
replaced meanwhile, a file changed within 2 s of its start) or when a plugin failed to load.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from attrs import define

from toolkit.errors import ToolkitError
from toolkit.files import atomic_write

VERIFY_TOLERANCE = 1e-4  # largest |torch - onnxruntime| over the check's samples (toolkit.backends binds it too)
INDEX_VERSION = 1


def cache_dir() -> Path:
    """Where graphs exported on the fly are kept: $TOOLKIT_CACHE_DIR or ~/.cache/diffusion-toolkit."""
    root = os.environ.get("TOOLKIT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "diffusion-toolkit")
    return Path(root) / "onnx"


def private_dir(folder: Path) -> Path:
    """The cache folder, made 0700 if new; refused unless it belongs to this user and no one else can write it
    (a graph planted there would run as this user's sampler)."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not hasattr(os, "getuid"):
        return folder
    for part in (folder, folder.parent):
        st = part.stat()
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            raise ToolkitError(f"refusing the ONNX cache {str(folder)!r}: {str(part)!r} belongs to another user or "
                               "others can write to it; set TOOLKIT_CACHE_DIR to a private folder")
    return folder


def digest_file(path: Path) -> str:
    """SHA-256 of a file's bytes, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@define(frozen=True)
class Entry:
    """What a recorded request ran: its graph, and what the command reports about it."""

    graph: Path
    reason: str  # why auto chose the graph, as the first run said it
    describe: dict[str, Any]  # sampler, steps, nfe, schedule, iterations: the result line and progress bar


def _stamp(path: str | os.PathLike) -> list[int] | None:
    """Size, modification and change time, inode: a copy that keeps the mtime (cp -a) or a file renamed over
    this one changes the stamp."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def folder_stamps(folder: Path) -> dict[str, list[int] | None]:
    """The stamp of every file under a checkpoint folder, by relative path."""
    out: dict[str, list[int] | None] = {}
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            out[os.path.relpath(full, folder)] = _stamp(full)
    return out


def _plugins() -> list[list[str]]:
    from importlib import metadata

    from toolkit.registry import ENTRY_POINT_GROUP

    eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
    return sorted([ep.name, ep.value, getattr(ep.dist, "name", "") or "", getattr(ep.dist, "version", "") or ""]
                  for ep in eps)


def request_key(request: dict[str, Any]) -> str:
    """The index key of a compose request: its options and everything around them that could resolve the same
    options to another pipeline (what each name given resolves to is checked by ``lookup``)."""
    from toolkit._version import __version__

    env = {k: os.environ.get(k, "") for k in ("TOOLKIT_DISABLE_PLUGINS", "TOOLKIT_STRICT_PLUGINS", "PYTHONPATH")}
    key = {"version": INDEX_VERSION, "request": request, "cwd": os.getcwd(), "prefix": sys.prefix,
           "python": sys.version, "toolkit": __version__, "env": env, "plugins": _plugins()}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _index_file(key: str) -> Path:
    return private_dir(cache_dir()) / "requests" / f"{key}.json"


def record(key: str, graph: Path, reason: str, describe: dict[str, Any],
           checkpoints: list[tuple[str, Path, dict[str, Any]]], started_ns: int) -> Path | None:
    """Remember that request ``key`` ran ``graph`` (verified against torch), with what it depended on.

    ``checkpoints``: (name or path given, folder, its stamps when it was resolved) from
    ``checkpoint.recording_reads``; ``started_ns``: when the command started (``time.time_ns()``). Nothing is
    recorded (None) when what was read may not be what is on disk now: a checkpoint folder whose files changed
    since it was resolved, a module or checkpoint file changed within 2 s of the start or later (git's racy
    rule: timestamps that coarse cannot tell before from after), or a plugin that failed to load.
    """
    from toolkit.registry import get_registry

    if get_registry().failures:
        return None
    graph = Path(graph).resolve()
    modules: dict[str, dict[str, list[int] | None]] = {}  # folder → file → stamp: a third of the size of flat paths
    for f in sorted({f for m in list(sys.modules.values())
                     if isinstance(f := getattr(m, "__file__", None), str) and os.path.isabs(f)}):
        modules.setdefault(os.path.dirname(f), {})[os.path.basename(f)] = _stamp(f)
    folders: dict[str, dict[str, list[int] | None]] = {}
    for _, p, read in checkpoints:
        folder = str(Path(p).resolve())
        folders[folder] = folder_stamps(Path(folder))
        if folders[folder] != read:
            return None
    stamps = [st for files in (*modules.values(), *folders.values()) for st in files.values()]
    if any(st is None or max(st[1], st[2]) >= started_ns - 2 * 10**9 for st in stamps):
        return None
    paths = {given: str(Path(given).resolve()) if os.path.exists(given) else None for given, _, _ in checkpoints}
    entry = {"version": INDEX_VERSION, "graph": str(graph), "sha256": digest_file(graph), "reason": reason,
             "describe": describe, "modules": modules, "checkpoints": folders, "paths": paths}
    path = _index_file(key)
    path.parent.mkdir(exist_ok=True, mode=0o700)
    text = json.dumps(entry, sort_keys=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def lookup(key: str) -> Entry | None:
    """The recorded graph of request ``key`` if nothing it depended on changed since, else None."""
    try:
        entry = json.loads(_index_file(key).read_text())
        if entry.get("version") != INDEX_VERSION:
            return None
        if any(_stamp(os.path.join(d, f)) != s for d, files in entry["modules"].items() for f, s in files.items()):
            return None
        if any(folder_stamps(Path(p)) != files for p, files in entry["checkpoints"].items()):
            return None
        for given, was in entry["paths"].items():  # each name given still means the same folder: a folder of a
            if (str(Path(given).resolve()) if os.path.exists(given) else None) != was:  # pretrained name's name
                return None  # appeared here (or went), or a symlink was pointed elsewhere
        graph = Path(entry["graph"])
        digest = digest_file(graph)
        verified = json.loads(graph.with_suffix(".verified.json").read_text())
        if not (digest == entry["sha256"] == graph.with_suffix(".sha256").read_text().strip() == verified["sha256"]
                and float(verified["max_abs_diff"]) <= VERIFY_TOLERANCE):
            return None
        return Entry(graph, str(entry["reason"]), dict(entry["describe"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
