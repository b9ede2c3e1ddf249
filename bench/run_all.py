"""Run the benchmarks: `python -m bench.run_all` (what `make bench` runs).

    python -m bench.run_all                          # all, default sizes (~20 min on 2 cores)
    python -m bench.run_all --only rate,reports      # some of them
    python -m bench.run_all --sizes 10000,100000,1000000   # scale up to a million accounts
    python -m bench.run_all --smoke                  # tiny sizes: the code paths, no figures

Each prints its figures and writes docs/benchmarks/<name>.json (or --out). They need the local
Postgres (BENCH_PG_ADMIN_URL) and a Redis database of their own (BENCH_REDIS_URL, default
db 12: it is emptied). docs/benchmarks.md explains the figures.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.common import mark_start

BENCHMARKS = (
    "rate",
    "pipeline",
    "memory",
    "scale",
    "reports",
    "console",
    "planning",
    "partitions",
)  # pipeline writes naive too


def _ints(value: str) -> list[int]:
    return [int(v) for v in value.split(",") if v]


def _floats(value: str) -> list[float]:
    return [float(v) for v in value.split(",") if v]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__.split("\n")[0])
    p.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated benchmarks")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (the tests use this)")
    p.add_argument("--out", type=Path, default=None, help="folder for the JSON results")
    p.add_argument("--rates", type=_floats, default=[100.0, 400.0], help="limits R, req/s")
    p.add_argument("--rate-workers", type=int, default=4, help="rate: worker processes")
    p.add_argument(
        "--max-in-flight", type=int, default=None, help="rate: MIDAS_MAX_IN_FLIGHT of ours"
    )
    p.add_argument("--rate-ours-only", action="store_true", help="rate: skip the Celery baselines")
    p.add_argument(
        "--baseline-concurrency", type=int, default=8, help="rate: prefork pool per baseline"
    )
    p.add_argument("--rate-seconds", type=float, default=20.0, help="seconds of work at R")
    p.add_argument(
        "--rate-margins",
        type=_floats,
        default=None,
        help="rate: ours only, once per MIDAS_RATE_MARGIN_S (default: the setting's default)",
    )
    p.add_argument("--rate-repeats", type=int, default=1, help="rate: runs of ours per margin")
    p.add_argument("--rate-name", default="rate", help="rate: the JSON file's name")
    p.add_argument("--accounts", type=int, default=10_000, help="pipeline: accounts")
    p.add_argument("--naive-accounts", type=int, default=3_000, help="naive: accounts")
    p.add_argument("--profile-accounts", type=int, default=3_000, help="stage profile: accounts")
    p.add_argument(
        "--memory-sizes", type=_ints, default=[10_000, 100_000], help="memory: accounts per run"
    )
    p.add_argument(
        "--memory-worker-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="memory: a variable for the worker (repeatable), e.g. MALLOC_ARENA_MAX=2",
    )
    p.add_argument("--sizes", type=_ints, default=[10_000, 100_000], help="scale: accounts per run")
    p.add_argument("--report-accounts", type=int, default=100_000, help="reports: accounts")
    p.add_argument("--console-accounts", type=int, default=1_000_000, help="console: accounts")
    p.add_argument("--console-cases", type=int, default=100_000, help="console: cases")
    p.add_argument("--console-repeat", type=int, default=30, help="console: calls per URL")
    p.add_argument(
        "--plan-sizes",
        type=_ints,
        default=[1_000_000, 5_000_000],
        help="planning: accounts per planned night",
    )
    p.add_argument(
        "--week-accounts", type=int, default=3_000_000, help="planning: the modelled game"
    )
    p.add_argument("--plan-rate", type=float, default=50.0, help="planning: MIDAS_RATE_LIMIT")
    p.add_argument("--part-accounts", type=int, default=20_000, help="partitions: accounts")
    p.add_argument(
        "--part-months", type=_ints, default=[1, 12, 24], help="partitions: months holding rows"
    )
    p.add_argument("--part-nights", type=int, default=4, help="partitions: nights a month")
    args = p.parse_args(argv)
    if args.smoke:
        # 0.05/s holds 895 accounts a night: the 2,000 take three nights to see.
        args.plan_sizes, args.week_accounts, args.plan_rate = [2_000], 2_000, 0.05
        args.rates, args.rate_seconds, args.rate_workers = [50.0], 1.5, 2
        args.baseline_concurrency = 2
        args.accounts, args.naive_accounts, args.profile_accounts = 300, 100, 200
        args.memory_sizes, args.sizes, args.report_accounts = [150], [200, 400], 200
        args.console_accounts, args.console_cases, args.console_repeat = 3_000, 600, 3
        args.part_accounts, args.part_months, args.part_nights = 1_000, [1, 2], 2
    unknown = set(args.only.split(",")) - set(BENCHMARKS)
    if unknown:
        p.error(f"unknown benchmarks: {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    only = args.only.split(",")
    for name in BENCHMARKS:
        if name not in only:
            continue
        started = time.monotonic()
        mark_start()
        print(f"== {name} ==", flush=True)
        if name == "rate":
            from bench import rate

            rate.main(
                args.rates,
                args.rate_seconds,
                out=args.out,
                workers=args.rate_workers,
                max_in_flight=args.max_in_flight,
                baselines=not args.rate_ours_only,
                baseline_concurrency=args.baseline_concurrency,
                margins=args.rate_margins,
                repeats=args.rate_repeats,
                name=args.rate_name,
            )
        elif name == "pipeline":
            from bench import pipeline

            pipeline.main(
                args.accounts,
                naive_n=args.naive_accounts,
                profile_n=args.profile_accounts,
                out=args.out,
            )
        elif name == "memory":
            from bench import pipeline

            extra = dict(v.split("=", 1) for v in args.memory_worker_env)
            pipeline.memory(args.memory_sizes, out=args.out, extra_env=extra)
        elif name == "scale":
            from bench import scale

            scale.main(args.sizes, out=args.out)
        elif name == "reports":
            from bench import reports

            reports.main(args.report_accounts, out=args.out)
        elif name == "console":
            from bench import console

            console.main(
                args.console_accounts,
                args.console_cases,
                repeat=args.console_repeat,
                nights=30 if args.smoke else console.NIGHTS,
                out=args.out,
            )
        elif name == "planning":
            from bench import planning

            planning.main(args.plan_sizes, args.week_accounts, rate=args.plan_rate, out=args.out)
        elif name == "partitions":
            from bench import partitions

            partitions.main(args.part_accounts, args.part_months, args.part_nights, out=args.out)
        print(f"== {name}: {time.monotonic() - started:.0f} s ==", flush=True)


if __name__ == "__main__":
    main()
