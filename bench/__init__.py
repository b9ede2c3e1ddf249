"""Benchmarks of midas-recon (issue 6): `python -m bench.run_all` (`make bench`) runs them all,
prints their figures and writes them as JSON to docs/benchmarks/; docs/benchmarks.md reads them.

Each benchmark needs the local Postgres and Redis (BENCH_PG_ADMIN_URL, BENCH_REDIS_URL) and
starts its own simulator and, where it says so, real Celery worker processes.
"""
