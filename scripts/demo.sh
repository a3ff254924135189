#!/usr/bin/env bash
# Set everything up, start local PostgreSQL (config store + Dagster storage) and `dg dev`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/rosetta dev "$@"
