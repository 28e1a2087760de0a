"""Writing files so that a killed run leaves nothing half-written, with ordinary permissions."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


FAULT_POINTS = ("file:written", "checkpoint:written", "checkpoint:synced", "checkpoint:swapped",
                "checkpoint:old-moved", "checkpoint:new-moved")


_reached: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Fault injection for the tests: ``TOOLKIT_FAULT=NAME`` (or ``NAME#K``, the K-th time) kills this process
    with SIGKILL, as an OOM kill or a power cut would, when a write reaches point NAME, so that every instant of
    a write can be shown to lose nothing."""
    wanted = os.environ.get("TOOLKIT_FAULT")
    if not wanted or not wanted.startswith(name):
        return
    _reached[name] = _reached.get(name, 0) + 1
    if wanted in (name, f"{name}#{_reached[name]}"):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def umask_mode(base: int) -> int:
    """``base`` (0o666 for files, 0o777 for folders) less the process umask: what open() would give."""
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


def through_link(path: str | os.PathLike) -> Path:
    """A symlinked output is written through: its target is replaced and the link stays a link."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists (this process counts as alive, also as PID 1 in a container)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(path: Path) -> None:
    """Delete ``.NAME.tmp-PID-*`` files that writers of ``path`` which are gone left behind."""
    for leftover in path.parent.glob(f".{path.name}.tmp-*-*"):
        pid = leftover.name[len(path.name) + 6:].split("-")[0]
        if pid.isdigit() and leftover.is_file() and not alive(int(pid)):
            leftover.unlink(missing_ok=True)


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it into place."""
    path = through_link(path)
    remove_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", suffix=path.suffix, dir=path.parent or ".")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, umask_mode(0o666))  # mkstemp makes 0600; the result is an ordinary file
        fault_point("file:written")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
