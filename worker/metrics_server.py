"""Serve `worker.metrics` to Prometheus, summed over every process of a Celery worker.

A prefork worker counts in its child processes, which Prometheus cannot scrape one by one.
With PROMETHEUS_MULTIPROC_DIR set (before Python starts: prometheus_client reads it at import)
each process writes its values to files there and the parent serves their sum. Environment:

- METRICS_PORT: port of `/metrics` on a Celery worker; unset = do not serve (tests, beat).
  docker-compose.yml uses DEFAULT_PORT, 9847: 9100 is node_exporter's, and the ports of the
  usual neighbours (redis_exporter 9121, postgres_exporter 9187, celery-exporter 9808,
  Flower 5555) are avoided too.
- METRICS_ADDR: address to bind, default 127.0.0.1 (loopback: nothing is reachable from
  outside unless asked for; a container sets 0.0.0.0 and publishes no port).
- PROMETHEUS_MULTIPROC_DIR: a folder private to ONE worker instance (it is emptied when that
  worker starts, so counters of a previous run or a recycled pid are not added in).

Celery wiring (worker/celery_app.py): `connect_celery_signals()` once at import of the app.
Standalone: `python -m worker.metrics_server --port 9847` serves whatever the folder holds.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_started_lock = threading.Lock()
_started_on: int | None = None  # the port this process serves, once started

DEFAULT_PORT = 9847
DEFAULT_ADDR = "127.0.0.1"


def multiproc_dir() -> Path | None:
    value = os.environ.get(MULTIPROC_ENV) or os.environ.get(MULTIPROC_ENV.lower())
    return Path(value) if value else None


def registry() -> CollectorRegistry:
    """The registry to expose: every process's files in multiprocess mode, else this process."""
    folder = multiproc_dir()
    if folder is None:
        return REGISTRY
    reg = CollectorRegistry()
    MultiProcessCollector(reg, path=str(folder))  # type: ignore[no-untyped-call]
    return reg


def reset_multiproc_dir() -> None:
    """Drop the files of earlier processes (a previous run, recycled pids) before the pool
    starts. This process's own files stay: it has them open since it imported the metrics."""
    folder = multiproc_dir()
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    own = f"_{os.getpid()}.db"
    for stale in folder.glob("*.db"):
        if not stale.name.endswith(own):
            stale.unlink(missing_ok=True)


def serve(port: int, addr: str = DEFAULT_ADDR) -> int:
    """Start `/metrics` on a daemon thread (once per process); returns the bound port."""
    global _started_on
    with _started_lock:
        if _started_on is not None:
            return _started_on
        server, _thread = start_http_server(port, addr=addr, registry=registry())
        _started_on = int(server.server_port)
        return _started_on


# -- Celery signal handlers -----------------------------------------------------------------


def on_worker_init(**_kwargs: Any) -> None:
    """worker_init (parent process, before the pool forks): drop stale files, serve."""
    port = os.environ.get("METRICS_PORT")
    if not port:
        return
    if multiproc_dir() is None:
        log.warning("metrics_without_multiproc_dir")  # children's counts would be invisible
    reset_multiproc_dir()
    bound = serve(int(port), os.environ.get("METRICS_ADDR") or DEFAULT_ADDR)
    log.info("metrics_serving", extra={"port": bound})


def on_worker_process_shutdown(pid: int | None = None, **_kwargs: Any) -> None:
    """worker_process_shutdown (in the exiting child): drop its live gauges from the sum."""
    folder = multiproc_dir()
    if folder is not None:
        mark_process_dead(pid or os.getpid(), str(folder))  # type: ignore[no-untyped-call]


def connect_celery_signals() -> None:
    """Connect the handlers above; call once where the Celery app is built."""
    from celery.signals import worker_init, worker_process_shutdown

    worker_init.connect(on_worker_init, weak=False, dispatch_uid="midas_recon_metrics_init")
    worker_process_shutdown.connect(
        on_worker_process_shutdown, weak=False, dispatch_uid="midas_recon_metrics_child_exit"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve midas-recon's Prometheus metrics.")
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("METRICS_PORT") or DEFAULT_PORT)
    )
    parser.add_argument("--addr", default=os.environ.get("METRICS_ADDR") or DEFAULT_ADDR)
    args = parser.parse_args(argv)
    import worker.metrics  # noqa: F401  (registers the metrics in this process too)

    bound = serve(args.port, args.addr)
    print(f"serving metrics on {args.addr}:{bound}/metrics", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
