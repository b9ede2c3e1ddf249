"""`health worker|beat`: the container healthcheck (no Celery remote control needed).

Exit 0 when the process touched its liveness file (worker.liveness) within --max-age seconds,
1 otherwise, with one line saying how old it is.
"""

from __future__ import annotations

import click

from worker import liveness
from worker.cli.base import EXIT_FAILURE, cli, fail


@cli.command("health")
@click.argument("role", type=click.Choice(["worker", "beat"]))
@click.option(
    "--max-age",
    type=click.FloatRange(1, 3600),
    default=liveness.MAX_AGE_S,
    show_default=True,
    help="Seconds since the last sign of life that still count as alive.",
)
def health(role: liveness.Role, max_age: float) -> None:
    """Is the worker (or beat) in this container alive? For docker compose healthchecks."""
    age = liveness.age(role)
    if age is None:
        fail(f"{role}: no sign of life yet ({liveness.path(role)})", EXIT_FAILURE)
    if age > max_age:
        fail(f"{role}: last sign of life {age:.0f}s ago (over {max_age:.0f}s)", EXIT_FAILURE)
    click.echo(f"{role}: alive ({age:.0f}s ago)")
