#!/usr/bin/env bash
# Set everything up, lint, and run the whole test suite against real PostgreSQL servers.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff check rosetta_dagster rosetta_dagster_tests benchmarks
# pytest exits 5 when it collects nothing; that is a failure here, as is any other non-zero code.
exec .venv/bin/python -m pytest "$@"
