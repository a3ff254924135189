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
from typing import Any

from benchmarks.support import RESULT_PREFIX, write_results_section

# Targets per engine (the issue's, on this 2-core machine); not timed tests.
TARGETS = {
    "initial_load_ratio": 0.8,
    "backfill_ratio": 0.5,
    "debezium": {"events_per_s": 30_000, "p99_ms": 150, "rss_mb": 500},
    "pgoutput": {"events_per_s": 60_000, "native_ratio": 0.35, "p50_ms": 5, "p99_ms": 20,
                 "rss_mb": 120, "start_ms": 1000},
}
ENGINES = ("debezium", "pgoutput")


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


def _at_most(value: float, limit: float | None, unit: str) -> str:
    return "" if limit is None else f"<= {limit:,} {unit}: " + _verdict(value <= limit)


def table(w1: dict[str, dict[str, Any]], w2: dict[str, Any], w3: dict[str, dict[str, Any]],
          backfill: dict[str, Any]) -> str:
    rows: list[tuple[str, ...]] = []
    for engine in ENGINES:
        run, targets = w1[engine], TARGETS[engine]
        ratio = run["rosetta_events_per_s"] / run["native_events_per_s"]
        goal = f">= {targets['events_per_s']:,} events/s: " + _verdict(
            run["rosetta_events_per_s"] >= targets["events_per_s"])
        if "native_ratio" in targets:
            goal += f"; >= {targets['native_ratio']}x native: " + _verdict(
                ratio >= targets["native_ratio"])
        rows += [
            (f"W1 capacity, {engine} (270k events, resumed)",
             f"{run['rosetta_events_per_s']:,.0f} events/s",
             f"native LR {run['native_events_per_s']:,.0f} events/s", f"{ratio:.2f}", goal),
            (f"W1 latency p50, {engine} (20 commits/s, 10 s)", f"{run['rosetta_p50_ms']:.0f} ms",
             f"native LR {run['native_p50_ms']:.0f} ms",
             f"{run['rosetta_p50_ms'] / max(run['native_p50_ms'], 0.1):.1f}",
             _at_most(run["rosetta_p50_ms"], targets.get("p50_ms"), "ms")),
            (f"W1 latency p99, {engine}", f"{run['rosetta_p99_ms']:.0f} ms",
             f"native LR {run['native_p99_ms']:.0f} ms",
             f"{run['rosetta_p99_ms'] / max(run['native_p99_ms'], 0.1):.1f}",
             _at_most(run["rosetta_p99_ms"], targets.get("p99_ms"), "ms")),
            (f"Start -> first applied change, {engine}",
             f"{run['start_to_first_change_ms']:.0f} ms", "", "",
             _at_most(run["start_to_first_change_ms"], targets.get("start_ms"), "ms")),
            (f"Peak RSS of the streaming process, {engine}", f"{run['peak_rss_mb']:.0f} MB", "", "",
             _at_most(run["peak_rss_mb"], targets.get("rss_mb"), "MB")),
            (f"CPU per 100k events, {engine} (streaming process)",
             f"{run['cpu_seconds_per_100k_events']:.1f} s", "", "", ""),
        ]
    for engine in ENGINES:
        run = w3[engine]
        verdict = "exact" if run["exact"] else (
            f"**failed**: {run['error'][:120]}" if "error" in run else "**values differ**")
        rows.append((f"W3 wide types, {engine} ({run['columns']} type columns, {run['events']:,} "
                     "events)", f"{run['events_per_s']:,.0f} events/s", "", "", verdict))
    rows.append(("W2 initial load (1M rows)", f"{w2['rosetta_rows_per_s']:,.0f} rows/s",
                 f"binary COPY pipe {w2['copy_rows_per_s']:,.0f} rows/s",
                 f"{w2['rosetta_rows_per_s'] / w2['copy_rows_per_s']:.2f}",
                 f">= {TARGETS['initial_load_ratio']}x COPY: " + _verdict(
                     w2["rosetta_rows_per_s"] / w2["copy_rows_per_s"]
                     >= TARGETS["initial_load_ratio"])))
    if "duckdb_rows_per_s" in w2:
        rows.append(("W2 initial load into DuckDB", f"{w2['duckdb_rows_per_s']:,.0f} rows/s",
                     f"into PostgreSQL {w2['rosetta_rows_per_s']:,.0f} rows/s",
                     f"{w2['duckdb_rows_per_s'] / w2['rosetta_rows_per_s']:.2f}", ""))
    if "debezium_rows_per_s" in w2:
        rows.append(("W2 vs Debezium snapshot", f"{w2['rosetta_rows_per_s']:,.0f} rows/s",
                     f"Debezium snapshot {w2['debezium_rows_per_s']:,.0f} rows/s",
                     f"{w2['rosetta_rows_per_s'] / w2['debezium_rows_per_s']:.1f}", ""))
    ratio = backfill["rosetta_rows_per_s"] / backfill["copy_rows_per_s"]
    rows.append((f"Backfill, whole table ({backfill['rows']:,} rows, {backfill['engine']} stream)",
                 f"{backfill['rosetta_rows_per_s']:,.0f} rows/s",
                 f"binary COPY pipe {backfill['copy_rows_per_s']:,.0f} rows/s", f"{ratio:.2f}",
                 f">= {TARGETS['backfill_ratio']}x COPY: "
                 + _verdict(ratio >= TARGETS["backfill_ratio"])))
    rows.append((f"Backfill with a writer at {backfill['writer_changes_per_s']:,.0f} changes/s",
                 f"{backfill['busy_rows_per_s']:,.0f} rows/s",
                 f"binary COPY pipe {backfill['copy_rows_per_s']:,.0f} rows/s",
                 f"{backfill['busy_rows_per_s'] / backfill['copy_rows_per_s']:.2f}",
                 "destination == source after" if backfill["busy_converged"] else "**differs**"))
    lines = ["| measure | Rosetta | anchor | ratio | target |", "| --- | ---: | ---: | ---: | --- |"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", default="1000000", help="W2 table size")
    parser.add_argument("--inserts", default="200000", help="W1 inserts")
    parser.add_argument("--wide-rows", default="20000", help="W3 rows (inserted, then updated)")
    parser.add_argument("--skip-debezium", action="store_true")
    args = parser.parse_args()
    # Each engine in its own process: peak RSS and CPU are the stream's own.
    w1 = {e: _run("benchmarks.w1_streaming", "--engine", e, "--inserts", args.inserts)
          for e in ENGINES}
    w3 = {e: _run("benchmarks.w3_types", "--engine", e, "--rows", args.wide_rows) for e in ENGINES}
    w2_args = ["--rows", args.rows] + (["--skip-debezium"] if args.skip_debezium else [])
    w2 = _run("benchmarks.w2_initial_load", *w2_args)
    backfill = _run("benchmarks.backfill_throughput", "--rows", args.rows)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    report = f"Measured {stamp} on {_machine()}.\n\n{table(w1, w2, w3, backfill)}\n"
    write_results_section("suite", (
        "Written by `./scripts/benchmark.sh`; raw numbers below.\n\n"
        + report + "\n```json\n" + json.dumps({"W1": w1, "W2": w2, "W3": w3, "backfill": backfill},
                                              indent=1)
        + "\n```\n"))
    print(report)


if __name__ == "__main__":
    main()
