"""TOOLKIT_BUDGET=small: every command at a token size, to try a command line in seconds.

The README test runs every block of the README with it; a user can too, to check a long command
before spending the real time on it. Training takes 1 step per 1000 asked (so 4000 → 4, and a resume
to 8000 → 8 still continues), sampling and evaluation at most a few dozen samples or points.
Unset (the default), nothing changes.
"""

from __future__ import annotations

import math
import os

SMALL = {"samples": 20, "points": 4}


def active() -> bool:
    return os.environ.get("TOOLKIT_BUDGET", "").strip().lower() == "small"


def steps(n: int) -> int:
    """Training steps (and checkpoint intervals): 1 per 1000 under the small budget."""
    return max(1, math.ceil(n / 1000)) if active() and n > 0 else n


def samples(n: int) -> int:
    """Samples to draw or to score."""
    return min(n, SMALL["samples"]) if active() and n > 0 else n


def points(n: int | None) -> int | None:
    """Data points of an nll evaluation (None: all of them)."""
    if not active():
        return n
    return SMALL["points"] if n is None else min(n, SMALL["points"])
