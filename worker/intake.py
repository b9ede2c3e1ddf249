"""For the game server: how to hand a session key to `midas_recon.record_login`.

The task accepts session keys only sealed for the worker, so that nothing that sees the
message (the broker and its disk, Flower, `celery events`, the worker's log) sees the key:

    from worker.intake import seal_session_key

    celery.send_task(
        "midas_recon.record_login",
        args=(openid, "1", seal_session_key(session_key, TRANSPORT_KEY)),
        queue="recheck",  # the game's own Celery app does not know our routes
    )

TRANSPORT_KEY is the first key of the worker's SESSION_KEY_TRANSPORT_KEY. The sealed value is
a standard Fernet token of the UTF-8 session key, so a game server written in another
language seals it with its own Fernet library (Go, Java, Node and others have one).
"""

from __future__ import annotations

from cryptography.fernet import Fernet


def seal_session_key(session_key: str, transport_key: str | bytes) -> str:
    """The session key as `record_login` accepts it: a Fernet token made with `transport_key`."""
    key = transport_key.encode("ascii") if isinstance(transport_key, str) else transport_key
    return Fernet(key).encrypt(session_key.encode("utf-8")).decode("ascii")
