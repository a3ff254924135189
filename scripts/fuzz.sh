#!/usr/bin/env bash
# The differential fuzzer's long profile: random change sequences and faults against real
# streams until the time is up, stopping at the first divergence with its shrunk SQL script.
#   ./scripts/fuzz.sh --minutes 60 [--engine pgoutput|debezium|both] [--steps 40] [--seed N]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python -m rosetta_dagster.harness.fuzz "$@"
