"""torch.distributed for training and sampling under torchrun: process group set-up from the environment
torchrun provides (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), gloo on CPU, nccl on CUDA."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from toolkit.errors import ToolkitError
from toolkit.world import World, shard, world_from_env  # noqa: F401 - re-exported: torch-free, in toolkit.world

DEFAULT_TIMEOUT_S = 600  # a collective that waits longer (a rank hung or gone) fails instead of hanging


def init(device: torch.device) -> World:
    """Join the process group torchrun set up (once); gloo for CPU, nccl for CUDA; collective timeout
    from $TOOLKIT_DIST_TIMEOUT (seconds, default 600)."""
    world = world_from_env()
    if not world.distributed:
        return world
    if not dist.is_available():
        raise ToolkitError("this torch build has no torch.distributed")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(world.local_rank)
        timeout = timedelta(seconds=float(os.environ.get("TOOLKIT_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
        dist.init_process_group(backend=backend, timeout=timeout)
    return world


def check_same(settings: dict, world: World) -> None:
    """Every rank must run with rank 0's settings (seed, batch, model, data, output...): compared at start-up,
    so ranks launched with different options stop with one line each instead of training apart or hanging."""
    if not world.distributed:
        return
    gathered: list = [None] * world.size
    dist.all_gather_object(gathered, settings)
    first = gathered[0]
    for rank, other in enumerate(gathered):
        if other != first:
            key = next((k for k in sorted(set(first) | set(other)) if first.get(k) != other.get(k)), "?")
            raise ToolkitError(f"rank {rank} runs with {key}={other.get(key)!r} but rank 0 with "
                               f"{key}={first.get(key)!r}: start every rank with the same options")


def peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another rank is gone (or timed out), not a bug here."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(m in text for m in (
        "Connection reset by peer", "Connection closed by peer", "Broken pipe", "gloo", "NCCL", "Timed out"))


def local_device(device: torch.device, world: World) -> torch.device:
    """cuda → this rank's GPU (cuda:LOCAL_RANK); cpu stays cpu."""
    if device.type == "cuda" and world.distributed:
        return torch.device("cuda", world.local_rank)
    return device


def barrier(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.barrier()


def mean(value: torch.Tensor, world: World) -> torch.Tensor:
    """The mean of a tensor over all ranks (itself when not distributed)."""
    if not (world.distributed and dist.is_initialized()):
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / world.size


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class DDP(DistributedDataParallel):
    """DistributedDataParallel that also answers the wrapped model's attributes (prediction, num_classes, ...)."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def wrap(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """The model DDP-wrapped for a distributed run (gradients averaged over ranks), else unchanged."""
    if not world.distributed:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids)
