"""Liveness files for container healthchecks: the worker and beat touch theirs while they work.

Celery remote control is off in production (no `celery inspect ping`), so a healthcheck asks
`midas-recon health worker|beat` instead: is the file fresher than MAX_AGE_S? The worker
touches it on every event heartbeat its consumer sends (a wedged consumer stops them); beat on
every scheduler tick (leading or standing by, worker.beat).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Final, Literal

Role = Literal["worker", "beat"]

# Worker heartbeats come every 2 s and beat ticks at least every 5 s; a minute of silence is
# a process that is stuck or gone, not a slow one.
MAX_AGE_S: Final = 60.0
# Touch at most this often (the heartbeat signal fires every 2 s in every worker).
_TOUCH_EVERY_S: Final = 5.0
_last_touch: dict[str, float] = {}


def path(role: Role) -> Path:
    """RECON_LIVENESS_DIR (default: the temp folder) / midas-recon-ROLE.alive."""
    folder = os.environ.get("RECON_LIVENESS_DIR") or tempfile.gettempdir()
    return Path(folder) / f"midas-recon-{role}.alive"


def touch(role: Role) -> None:
    now = time.monotonic()
    if now - _last_touch.get(role, -_TOUCH_EVERY_S) < _TOUCH_EVERY_S:
        return
    _last_touch[role] = now
    target = path(role)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch()
    except OSError:
        pass  # a read-only or full disk must not stop the worker; the healthcheck will say


def age(role: Role) -> float | None:
    """Seconds since the role last touched its file, or None if it never did."""
    try:
        return max(0.0, time.time() - path(role).stat().st_mtime)
    except FileNotFoundError:
        return None
