#!/usr/bin/env bash
# Set everything up, lint, and run the whole test suite against real PostgreSQL servers.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff check rosetta_dagster rosetta_dagster_tests benchmarks
# ROSETTA_TEST_WORKERS=N runs the suite in N pytest-xdist workers (a module whose tests share
# servers stays on one worker: xdist_group). One process by default: on two cores more workers
# starve the throughput tests (kill -9 recovery, the scale of the fan-out tests) into timeouts.
# pytest exits 5 when it collects nothing; that is a failure here, as is any other non-zero code.
exec .venv/bin/python -m pytest -n "${ROSETTA_TEST_WORKERS:-0}" --dist loadgroup "$@"
