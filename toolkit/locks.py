"""One writer per output: an exclusive lock (flock on PARENT/.NAME.lock) held while a command writes it,
so two runs into the same --out cannot both report success with one of them lost."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from toolkit.errors import ToolkitError
from toolkit.files import through_link


@contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold the lock of ``path`` (a checkpoint folder or an output file); fail at once if another process does."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        yield
        return
    path = through_link(path)  # two names of one output share its lock
    parent = path.parent if str(path.parent) else Path(".")
    lock = parent / f".{path.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ToolkitError(f"{str(path)!r} is being written by another toolkit process (pid {owner}); "
                               "wait for it to finish or choose another output") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino  # not unlinked by a previous holder meanwhile
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        try:
            os.unlink(lock)
        except FileNotFoundError:
            pass
        os.close(fd)  # closing releases the lock
