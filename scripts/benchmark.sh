#!/usr/bin/env bash
# Set everything up and run the benchmark suite (W1 streaming, W2 initial load, each next to its
# anchors on the same machine); writes benchmarks/RESULTS.md. Takes about 5 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python -m benchmarks.run "$@"
