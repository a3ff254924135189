#!/usr/bin/env bash
# Set everything up, lint, and run the whole test suite against real PostgreSQL servers.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff check rosetta_dagster rosetta_dagster_tests benchmarks
# Tests wait on servers far more than they compute: two workers (pytest-xdist; more starve the
# throughput tests on two cores);
# a module whose tests share servers stays on one worker (xdist_group). ROSETTA_TEST_WORKERS=0
# runs everything in this process.
# pytest exits 5 when it collects nothing; that is a failure here, as is any other non-zero code.
exec .venv/bin/python -m pytest -n "${ROSETTA_TEST_WORKERS:-2}" --dist loadgroup "$@"
