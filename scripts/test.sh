#!/usr/bin/env bash
# Set everything up, lint, and run the whole test suite against real PostgreSQL servers.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff check rosetta_dagster rosetta_dagster_tests benchmarks
# Three pytest-xdist workers by default (ROSETTA_TEST_WORKERS=N for another count, 0 for one
# process), a test file being the unit (its tests in order, with their module-scoped servers),
# the slowest files first (see conftest.py). On two cores, two workers leave a core idle while
# tests wait on servers and Dagster ticks; three keep it busy (see docs/development.md).
# pytest exits 5 when it collects nothing; that is a failure here, as is any other non-zero code.
exec .venv/bin/python -m pytest -n "${ROSETTA_TEST_WORKERS:-3}" --dist loadfile --no-loadscope-reorder "$@"
