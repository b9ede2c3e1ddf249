"""The `midas-recon` command. Each area registers its commands in its own module."""

from __future__ import annotations

from worker.cli import (  # noqa: F401  (imported for their commands)
    alerts_cmds,
    balance_cmd,
    data_cmds,
    health_cmd,
    mismatch_cmds,
    report_cmds,
    run_cmds,
    simulator_cmd,
    web_cmds,
)
from worker.cli.base import cli


def main() -> None:
    cli(prog_name="midas-recon")
