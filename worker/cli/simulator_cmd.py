"""`midas-recon simulator`: the Midas stand-in in the foreground, for the demo and staging."""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

import click

from worker.cli.base import UsageError, cli, handle_errors
from worker.simulator import FAULT_KINDS, SimConfig, Simulator


@cli.command("simulator")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="Port to listen on; 0 picks a free one (printed).",
)
@click.option(
    "--api-base-host",
    default=None,
    help="Host name the worker reaches the simulator by, for the printed MIDAS_API_BASE "
    "(default: the listening address; e.g. the compose service name).",
)
@click.option(
    "--players",
    type=click.IntRange(0, 1_000_000),
    default=100,
    show_default=True,
    help="Synthetic players with random counters (GET /__sim/players lists them).",
)
@click.option(
    "--expired-session-ratio",
    type=click.FloatRange(0.0, 1.0),
    default=0.1,
    show_default=True,
    help="Share of the synthetic players without a live session_key.",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Random seed (players, faults)."
)
@click.option(
    "--rate-limit",
    type=click.FloatRange(min=0.0, min_open=True),
    default=None,
    help="Requests per second over the Midas endpoints; above it they get 45011. Default: none.",
)
@click.option(
    "--latency-ms",
    type=click.FloatRange(0.0, 60_000.0),
    default=0.0,
    show_default=True,
    help="Added to every Midas answer.",
)
@click.option(
    "--fault-rate",
    type=click.FloatRange(0.0, 1.0),
    default=0.0,
    show_default=True,
    help="Probability that a Midas request gets the --fault-kind fault.",
)
@click.option(
    "--fault-kind",
    type=click.Choice(sorted(FAULT_KINDS)),
    default="minus1",
    show_default=True,
    help="The fault --fault-rate injects (minus1 = errcode -1 'system error').",
)
@click.option(
    "--env",
    "midas_env",
    type=click.Choice(["sandbox", "production"]),
    default="sandbox",
    show_default=True,
    help="Which environment's AppKey to print as MIDAS_APP_KEY (the simulator serves both).",
)
@handle_errors
def simulator(
    host: str,
    port: int,
    api_base_host: str | None,
    players: int,
    expired_session_ratio: float,
    seed: int,
    rate_limit: float | None,
    latency_ms: float,
    fault_rate: float,
    fault_kind: str,
    midas_env: str,
) -> None:
    """Run the Midas simulator in the foreground until Ctrl-C or SIGTERM.

    It serves v1 and v2 getbalance, pay, cancelpay and present, stable_token and token,
    verifies every signature and answers with Midas' error codes. It prints the base URL and,
    as NAME=value lines (usable as an env file), the settings a worker needs to talk to it.
    The credentials printed are the simulator's own fake ones, so printing them is safe; never
    point a worker holding real credentials at it. Control endpoints under /__sim/ (stats,
    faults, players, moves) are described in `worker/simulator/__init__.py`.
    """
    config = SimConfig(
        host=host,
        port=port,
        players=players,
        expired_session_ratio=expired_session_ratio,
        seed=seed,
        rate_limit=rate_limit,
        latency_ms=latency_ms,
    )
    sim = Simulator(config)
    if fault_rate > 0:
        sim.inject(fault_kind, rate=fault_rate)
    try:
        base_url = sim.start()
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    if api_base_host:
        base_url = f"http://{api_base_host}:{sim.port}"

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        click.echo(f"# Midas simulator on {base_url}: {players} players; Ctrl-C stops it.")
        click.echo("# Fake credentials of this simulator (not secrets):")
        for name, value in (
            ("MIDAS_API_BASE", base_url),
            ("MIDAS_ENV", midas_env),
            ("MIDAS_APPID", config.appid),
            ("MIDAS_APP_SECRET", config.app_secret),
            ("MIDAS_OFFER_ID", config.offer_id),
            ("MIDAS_APP_KEY", config.app_key(midas_env)),
        ):
            click.echo(f"{name}={value}")
        # Flushed at once, so a parent process reading our stdout sees the URL right away.
        sys.stdout.flush()
        # Wake up now and then: a signal handler only runs between bytecodes of this thread.
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sim.stop()
    stats = sim.stats()
    click.echo(
        f"# stopped after {stats['requests']} requests "
        f"(max {stats['max_per_second']} Midas requests in one second)",
        err=True,
    )
