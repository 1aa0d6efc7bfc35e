# The front door: `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.DEFAULT_GOAL := help
.PHONY: help venv postgres lint typecheck unit integration test-reliability test demo bench bench-app bench-worker bench-verify bench-snapshot bench-purge bench-read bench-context golden clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "cdc-audit needs Python >= 3.11")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

venv: $(VENV)/.installed ## create .venv and install the package with its dev extras

postgres: ## make sure PostgreSQL server binaries are present (apt install when root)
	@bash scripts/ensure-postgres.sh
	@bash scripts/ensure-pgbouncer.sh

lint: venv ## ruff and mypy
	$(VENV)/bin/ruff check cdc_audit tests bench
	$(VENV)/bin/ruff format --check cdc_audit tests bench
	$(VENV)/bin/mypy

typecheck: venv
	$(VENV)/bin/mypy

unit: venv ## unit tests (no database)
	$(VENV)/bin/pytest tests/unit -q

integration: venv postgres ## integration tests against a throwaway PostgreSQL
	$(VENV)/bin/pytest tests/integration -q

test-reliability: venv postgres ## faults, crashes, hostile input, concurrency (bounded; RELIABILITY=full for the fuller form)
	CDC_AUDIT_RELIABILITY=$(or $(RELIABILITY),bounded) $(VENV)/bin/pytest tests/reliability -q

test: venv postgres lint ## everything CI runs: lint, types, unit and integration tests
	$(VENV)/bin/pytest -q

demo: venv postgres ## the main job end to end on a private, throwaway PostgreSQL
	$(PY) -m cdc_audit.demo

$(VENV)/.bench-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	@touch $@

bench: venv postgres $(VENV)/.bench-installed ## every benchmark, then docs/benchmarks.md rewritten with its charts (about 40 min; BENCH_ARGS=--quick for a smoke run)
	$(PY) -m bench.suite $(BENCH_ARGS)

bench-app: venv postgres ## the cost to the application: TPC-B unaudited, cdc-audit, classic trigger (BENCH_ARGS=--quick)
	$(PY) -m bench.app_cost $(BENCH_ARGS)

bench-worker: venv postgres ## worker throughput, lag and memory on a throwaway PostgreSQL (minutes; BENCH_ARGS=--quick)
	$(PY) -m bench.worker_throughput $(BENCH_ARGS)

bench-verify: venv postgres ## verify throughput online and offline, and its scale curve (BENCH_ARGS=--quick)
	$(PY) -m bench.verify_throughput $(BENCH_ARGS)

bench-snapshot: venv postgres ## snapshot digest speed on a 1M-row table against reading it (BENCH_ARGS=--quick)
	$(PY) -m bench.snapshot_digest $(BENCH_ARGS)

bench-purge: venv postgres ## retention purge of a 1M-event month against DELETE + VACUUM (BENCH_ARGS=--quick)
	$(PY) -m bench.purge_month $(BENCH_ARGS)

bench-read: venv postgres ## read latency of the common questions on a 10M-event trail (BENCH_ARGS=--quick)
	$(PY) -m bench.read_latency $(BENCH_ARGS)

bench-context: venv postgres ## added latency per transaction of setting the audit context, direct and via pgbouncer (BENCH_ARGS=--quick)
	$(PY) -m bench.context_latency $(BENCH_ARGS)

golden: venv ## regenerate golden SQL fixtures after a reviewed change
	UPDATE_GOLDEN=1 $(VENV)/bin/pytest tests/unit/test_golden_plan.py -q

clean: ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
