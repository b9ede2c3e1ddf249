# One command per habit; CI (.ci/run) and people call the same targets.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test lint typecheck bench demo services

$(BIN)/midas-recon: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/midas-recon

services:  ## start local Postgres and Redis if they are not answering
	bash scripts/services.sh

test: install services  ## the whole suite (real Postgres, Redis, Celery workers, simulator)
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check worker tests bench migrations
	$(BIN)/ruff format --check worker tests bench migrations

typecheck: install
	$(BIN)/mypy

bench: install services
	$(BIN)/python -m bench.run_all

demo: install
	$(BIN)/midas-recon demo
