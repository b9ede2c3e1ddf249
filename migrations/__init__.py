"""Alembic scripts; installed as `worker.migrations` (see pyproject.toml)."""
