"""midas-recon: reconciles Midas coin balances against the game's ledger.

`celery -A worker worker` finds the Celery app here. It is loaded lazily so that importing a
sub-package (the Midas client, the simulator) does not pull Celery and the database in.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):
        from worker.celery_app import app

        return app
    raise AttributeError(name)
