"""Run the benchmark suite and write its results as a table (stdout and benchmarks/RESULTS.md).

Each workload runs in its own process (peak RSS is per process) on its own throwaway cluster;
the product and its anchors run in the same process, on the same data, one after the other.

    ./scripts/benchmark.sh            # = .venv/bin/python -m benchmarks.run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.support import RESULT_PREFIX

RESULTS_FILE = Path(__file__).with_name("RESULTS.md")
TARGETS = {
    "initial_load_ratio": 0.8,
    "events_per_s": 30_000,
    "p99_ms": 150,
    "rss_mb": 500,
}


def _run(module: str, *args: str) -> dict[str, Any]:
    command = [sys.executable, "-m", module, *args]
    print(f"$ {' '.join(command)}", file=sys.stderr, flush=True)
    completed = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return dict(json.loads(line.removeprefix(RESULT_PREFIX)))
    raise RuntimeError(f"{module} printed no result line")


def _machine() -> str:
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()} cores, {memory_gib:.0f} GiB, {platform.system()} "
            f"{platform.machine()}, Python {platform.python_version()}")


def _verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def table(w1: dict[str, Any], w2: dict[str, Any]) -> str:
    rows = [
        ("W1 capacity (270k events, resumed)",
         f"{w1['rosetta_events_per_s']:,.0f} events/s",
         f"native LR {w1['native_events_per_s']:,.0f} events/s",
         f"{w1['rosetta_events_per_s'] / w1['native_events_per_s']:.2f}",
         f">= {TARGETS['events_per_s']:,} events/s: "
         + _verdict(w1["rosetta_events_per_s"] >= TARGETS["events_per_s"])),
        ("W1 latency p50 (20 commits/s, 10 s)", f"{w1['rosetta_p50_ms']:.0f} ms",
         f"native LR {w1['native_p50_ms']:.0f} ms",
         f"{w1['rosetta_p50_ms'] / max(w1['native_p50_ms'], 0.1):.1f}", ""),
        ("W1 latency p99", f"{w1['rosetta_p99_ms']:.0f} ms", f"native LR {w1['native_p99_ms']:.0f} ms",
         f"{w1['rosetta_p99_ms'] / max(w1['native_p99_ms'], 0.1):.1f}",
         f"<= {TARGETS['p99_ms']} ms: " + _verdict(w1["rosetta_p99_ms"] <= TARGETS["p99_ms"])),
        ("W2 initial load (1M rows)", f"{w2['rosetta_rows_per_s']:,.0f} rows/s",
         f"binary COPY pipe {w2['copy_rows_per_s']:,.0f} rows/s",
         f"{w2['rosetta_rows_per_s'] / w2['copy_rows_per_s']:.2f}",
         f">= {TARGETS['initial_load_ratio']}x COPY: "
         + _verdict(w2["rosetta_rows_per_s"] / w2["copy_rows_per_s"] >= TARGETS["initial_load_ratio"])),
    ]
    if "debezium_rows_per_s" in w2:
        rows.append(("W2 vs Debezium snapshot", f"{w2['rosetta_rows_per_s']:,.0f} rows/s",
                     f"Debezium snapshot {w2['debezium_rows_per_s']:,.0f} rows/s",
                     f"{w2['rosetta_rows_per_s'] / w2['debezium_rows_per_s']:.1f}", ""))
    rows += [
        ("Peak RSS of the streaming process", f"{w1['peak_rss_mb']:.0f} MB", "", "",
         f"<= {TARGETS['rss_mb']} MB: " + _verdict(w1["peak_rss_mb"] <= TARGETS["rss_mb"])),
        ("CPU per 100k events (streaming process)",
         f"{w1['cpu_seconds_per_100k_events']:.1f} s", "", "", ""),
    ]
    lines = ["| measure | Rosetta | anchor | ratio | target |", "| --- | ---: | ---: | ---: | --- |"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", default="1000000", help="W2 table size")
    parser.add_argument("--inserts", default="200000", help="W1 inserts")
    parser.add_argument("--skip-debezium", action="store_true")
    args = parser.parse_args()
    w1 = _run("benchmarks.w1_streaming", "--inserts", args.inserts)
    w2_args = ["--rows", args.rows] + (["--skip-debezium"] if args.skip_debezium else [])
    w2 = _run("benchmarks.w2_initial_load", *w2_args)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    report = f"Measured {stamp} on {_machine()}.\n\n{table(w1, w2)}\n"
    RESULTS_FILE.write_text(
        "# Benchmark results\n\nWritten by `./scripts/benchmark.sh`; raw numbers below.\n\n"
        + report + "\n```json\n" + json.dumps({"W1": w1, "W2": w2}, indent=1) + "\n```\n"
    )
    print(report)


if __name__ == "__main__":
    main()
