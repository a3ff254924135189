"""W2 initial load: a 1M-row table (bigint pk, int, text, numeric(12,2), timestamptz, jsonb)
loaded by the pipeline's first start, next to a binary COPY pipe and Debezium's own snapshot
of the same table on the same machine, in one run; and the same load into a DuckDB
destination (a database file), next to the PostgreSQL destination's.

The pipeline is timed from the session's start (slot creation included) to the moment its
table load is reported complete; Debezium's snapshot from the session's start until the
destination holds every row.

    .venv/bin/python -m benchmarks.w2_initial_load [--rows 1000000]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from benchmarks.support import (
    W2_COLUMNS,
    benchmark_env,
    binary_copy_seconds,
    create_table,
    emit,
    log,
    run_main,
    wait_for,
)
from rosetta_dagster.core.destination.duckdb.database import read_access
from rosetta_dagster.core.initial_load import TableLoadReport
from rosetta_dagster.core.pipeline_config import Destination, PipelineDefinition
from rosetta_dagster.core.streaming import StreamingSession
from rosetta_dagster.harness import count_rows, execute, streaming, table_fingerprint


def _load_seconds(pipeline: PipelineDefinition, offsets_dir: Path) -> float:
    """From the session's start (slot creation included) to its table load's report."""
    loaded: list[tuple[float, TableLoadReport]] = []
    session = StreamingSession(pipeline, offsets_dir=offsets_dir,
                               on_table_loaded=lambda r: loaded.append((time.monotonic(), r)))
    started = time.monotonic()
    with streaming(session):
        wait_for(lambda: loaded, 1800)
    return loaded[0][0] - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-debezium", action="store_true",
                        help="leave out the (slow) Debezium snapshot anchor")
    args = parser.parse_args()
    with benchmark_env() as env:
        create_table(env.source_url, "public.bench", W2_COLUMNS)
        execute(env.source_url, "INSERT INTO public.bench SELECT g, g, md5(g::text), g / 7.0, "
                "now(), jsonb_build_object('g', g, 'tag', 'w2') FROM generate_series(1, %s) g",
                "VACUUM ANALYZE public.bench", params=(args.rows,))
        result: dict[str, float | str] = {"workload": "W2", "rows": args.rows}

        pipeline = env.pipeline("bench", ["public.bench"], initial_load_workers=args.workers)
        rosetta_s = _load_seconds(pipeline, env.offsets_dir)
        assert table_fingerprint(env.source_url, "public", "bench") == table_fingerprint(
            env.destination_url, "replica", "bench"), "the loaded table differs from the source"
        result.update(rosetta_seconds=rosetta_s, rosetta_rows_per_s=args.rows / rosetta_s)
        log(f"W2: initial load {rosetta_s:.2f} s")

        copy_s = binary_copy_seconds(env, env.source_url, env.destination_url, "public.bench",
                                     W2_COLUMNS)
        result.update(copy_seconds=copy_s, copy_rows_per_s=args.rows / copy_s)
        log(f"W2: binary COPY {copy_s:.2f} s")

        duckdb_path = env.offsets_dir.parent / "w2.duckdb"
        duck = dataclasses.replace(pipeline, name="duck", destinations=(Destination(
            name="lake", host="", port=0, database="", user="", schema="replica",
            kind="duckdb", path=str(duckdb_path)),))
        duckdb_s = _load_seconds(duck, env.offsets_dir)
        with read_access(str(duckdb_path)) as conn:
            row = conn.execute("SELECT count(*) FROM replica.bench").fetchone()
        assert row is not None and row[0] == args.rows, "DuckDB lacks rows"
        result.update(duckdb_seconds=duckdb_s, duckdb_rows_per_s=args.rows / duckdb_s)
        log(f"W2: initial load into DuckDB {duckdb_s:.2f} s")

        if not args.skip_debezium:
            destination = dataclasses.replace(pipeline.destinations[0], schema="debezium")
            debezium = dataclasses.replace(
                pipeline, name="dbz", destinations=(destination,),
                settings=dataclasses.replace(pipeline.settings, initial_load="debezium"),
            )
            with streaming(StreamingSession(debezium, offsets_dir=env.offsets_dir)):
                debezium_s = wait_for(
                    lambda: count_rows(env.destination_url, "debezium.bench") == args.rows,
                    3600, interval_s=0.5)
            result.update(debezium_seconds=debezium_s,
                          debezium_rows_per_s=args.rows / debezium_s)
            log(f"W2: Debezium snapshot {debezium_s:.2f} s")
    emit(result)


if __name__ == "__main__":
    run_main(main)
