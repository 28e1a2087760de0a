"""Sharded sampling: each rank (of torchrun, or RANK/WORLD_SIZE in the environment) writes its own .npy shard
of one run; rank 0 writes an index; ``merge`` joins them. Sample i is the same as in a single process run."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from toolkit import schema
from toolkit.errors import ToolkitError
from toolkit.files import atomic_write
from toolkit.images import write_npy
from toolkit.world import World, shard

if TYPE_CHECKING:
    import torch

INDEX = "index.json"


def run_id(n: int, seed: int, labels: Sequence[int] | None, world_size: int, scale: Any, shape,
           meta: dict[str, Any] | None) -> str:
    """What every rank of one run agrees on (settings, not time): shards of another run cannot pass for it."""
    text = json.dumps([n, seed, None if labels is None else list(labels), world_size, scale, list(shape),
                       (meta or {}).get("command")], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _digest(arr: np.ndarray, rows: int = 4096) -> str:
    """sha256 of the array's bytes, read ``rows`` at a time (a memory-mapped shard is never loaded whole)."""
    h = hashlib.sha256()
    for i in range(0, len(arr), rows):
        h.update(np.ascontiguousarray(arr[i:i + rows]).tobytes())
    return h.hexdigest()[:16]


def shard_name(rank: int, size: int) -> str:
    return f"shard-{rank:05d}-of-{size:05d}.npy"


def is_shard_folder(out: str | os.PathLike, world: World) -> bool:
    """--out names a folder (ends in a separator or is one), or the run is distributed."""
    text = os.fspath(out)
    return world.distributed or text.endswith(("/", os.sep)) or Path(text).is_dir()


def sample_shard(pipe, out: str | os.PathLike, n: int, seed: int, labels: Sequence[int] | None, world: World,
                 *, scale: float | None = None, progress=None, meta: dict[str, Any] | None = None) -> Path:
    """Sample this rank's part [start, stop) of n samples into out/shard-R-of-W.npy (and, on rank 0, the index)."""
    folder = Path(out)
    if not folder.parent.is_dir():
        raise ToolkitError(f"output folder {str(folder.parent)!r} does not exist")
    if folder.exists() and not folder.is_dir():
        raise ToolkitError(f"{str(folder)!r} exists and is not a folder")
    folder.mkdir(exist_ok=True)
    start, stop = shard(n, world)
    path = folder / shard_name(world.rank, world.size)
    h = hashlib.sha256()
    batches = []
    if stop > start:  # sample i takes label i mod len(labels), as in one process
        y = None if labels is None else [*labels[start % len(labels):], *labels[:start % len(labels)]]
        batches = pipe.batches(stop - start, seed=seed, labels=y, scale=scale, offset=start, progress=progress)
    run = run_id(n, seed, labels, world.size, scale, pipe.output_shape, meta)
    write_npy(path, (stop - start, *pipe.output_shape), batches, digest=h)
    side = json.dumps({"run": run, "rank": world.rank, "start": start, "stop": stop, "sha256": h.hexdigest()[:16]})
    atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(side))
    if world.main:
        shards = []
        for r in range(world.size):
            a, b = shard(n, World(r, world.size))
            shards.append({"file": shard_name(r, world.size), "start": a, "stop": b})
        index = {"n": n, "seed": seed, "world_size": world.size, "shape": list(pipe.output_shape),
                 "run": run, "shards": shards, **(meta or {})}
        text = json.dumps(index, indent=2)
        atomic_write(folder / INDEX, lambda tmp: Path(tmp).write_text(text))
    return path


def merge(folder: str | os.PathLike) -> torch.Tensor:
    """All shards of a sharded run in sample order, [n, *shape]; a missing or wrong shard is an error."""
    _, batches = merge_batches(folder)
    import torch

    return torch.cat(list(batches()))


def merge_batches(folder: str | os.PathLike, rows: int = 4096) -> tuple[tuple[int, ...], Callable[[], Iterator[torch.Tensor]]]:
    """The merged run's shape and its samples in order, ``rows`` at a time. Every shard is checked first
    (index schema, run id, range, content hash, shape), read memory-mapped, so nothing is written for a bad run
    and memory stays bounded whatever n is."""
    folder = Path(folder)
    index_path = folder / INDEX
    if not index_path.is_file():
        raise ToolkitError(f"{str(folder)!r} has no {INDEX}: not a sharded sampling run")
    try:
        index = schema.check_shard_index(json.loads(index_path.read_text()))
    except (ValueError, UnicodeDecodeError) as exc:  # ToolkitError is a ValueError
        raise ToolkitError(f"{str(index_path)!r} is not a valid shard index ({exc})") from None
    shape = tuple(index["shape"])
    arrays = []
    for s in index["shards"]:
        file = folder / s["file"]
        if not file.is_file():
            raise ToolkitError(f"shard {s['file']} is missing from {str(folder)!r} (did that rank finish?)")
        try:
            arr = np.load(file, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ToolkitError(f"shard {s['file']} is truncated or not a .npy array ({exc})") from None
        if arr.dtype != np.float32 or arr.shape != (s["stop"] - s["start"], *shape):
            raise ToolkitError(f"shard {s['file']} holds {arr.dtype} {list(arr.shape)}, expected float32 "
                               f"{[s['stop'] - s['start'], *shape]}")
        if index.get("run") is not None:  # since run ids: every shard must be of this run, and unchanged
            side = file.with_suffix(".json")
            try:
                info = json.loads(side.read_text())
                if not isinstance(info, dict):
                    raise ValueError("not an object")
            except (OSError, ValueError):
                raise ToolkitError(f"shard {s['file']} has no readable {side.name}: cannot tell which run it "
                                   "belongs to") from None
            if info.get("run") != index["run"] or (info.get("start"), info.get("stop")) != (s["start"], s["stop"]):
                raise ToolkitError(f"shard {s['file']} belongs to another run (other seed, samples or settings) "
                                   f"than {INDEX}: refusing to mix runs")
            if info.get("sha256") != _digest(arr):
                raise ToolkitError(f"shard {s['file']} was changed or replaced after its run wrote it")
        arrays.append(arr)

    import torch

    def batches() -> Iterator[torch.Tensor]:
        for arr in arrays:
            for i in range(0, len(arr), rows):
                yield torch.from_numpy(np.array(arr[i:i + rows]))

    return (index["n"], *shape), batches
