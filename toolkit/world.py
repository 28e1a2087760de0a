"""This process's place in a torchrun run, read from the environment without importing torch."""

from __future__ import annotations

import os

from attrs import define


@define(frozen=True)
class World:
    """This process's place in the run: rank 0 of 1 when not launched by torchrun."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def world_from_env() -> World:
    """The world torchrun describes in the environment (without joining it)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def shard(n: int, world: World) -> tuple[int, int]:
    """The contiguous range [start, stop) of n items this rank owns (the first n % size ranks get one more)."""
    base, extra = divmod(n, world.size)
    start = world.rank * base + min(world.rank, extra)
    return start, start + base + (1 if world.rank < extra else 0)
