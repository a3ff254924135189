#!/usr/bin/env bash
# Set everything up, lint, and run the whole test suite against real PostgreSQL servers.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff check rosetta_dagster rosetta_dagster_tests benchmarks
# Two pytest-xdist workers by default (ROSETTA_TEST_WORKERS=N for another count, 0 for one
# process), a test file being the unit (its tests in order, with their module-scoped servers),
# the slowest files first (see conftest.py). More than two on two cores starve the throughput
# tests (kill -9 recovery, the fan-out scale) into timeouts.
# pytest exits 5 when it collects nothing; that is a failure here, as is any other non-zero code.
exec .venv/bin/python -m pytest -n "${ROSETTA_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
