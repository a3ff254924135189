"""Backfill speed: a whole-table backfill of N rows (default 1M) next to a plain binary COPY of
the same table into an empty copy, same machine, one run; prints both and their ratio.

The backfill runs for real: the pipeline streams, the copy goes through watermarks, destination
staging and the stream's chunk apply.

    .venv/bin/python -m benchmarks.backfill_throughput [--rows 1000000] [--chunk-rows 50000]
        [--engine debezium|pgoutput]
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg2

from benchmarks.support import (
    W2_COLUMNS,
    benchmark_env,
    binary_copy_seconds,
    create_table,
    emit,
    run_main,
)
from rosetta_dagster.core.backfill import BackfillRunner
from rosetta_dagster.core.config_store import ConfigStore, PipelineStatus
from rosetta_dagster.core.pool import PoolSettings, ResilientConnectionPool
from rosetta_dagster.core.streaming import StreamingSession
from rosetta_dagster.harness import (
    count_rows,
    execute,
    streaming,
    wait_until,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--chunk-rows", type=int, default=50_000)
    parser.add_argument("--engine", choices=("debezium", "pgoutput"), default="debezium",
                        help="the stream that applies the chunks (watermarks from either)")
    parser.add_argument("--writer-rate", type=int, default=1000,
                        help="changes/s of the concurrent writer in the second measurement")
    args = parser.parse_args()

    with benchmark_env(args.engine) as env:
        cluster = env.cluster
        cluster.create_database("bench_config")
        create_table(env.source_url, "public.bench", W2_COLUMNS)
        pipeline = env.pipeline("bench", ["public.bench"])
        with ResilientConnectionPool(cluster.dsn("bench_config"),
                                     PoolSettings.from_env(max_conn=4)) as pool:
            store = ConfigStore(pool)
            store.upgrade()
            store.sync_pipeline(pipeline)
            store.set_pipeline_status("bench", PipelineStatus.START)
            with streaming(StreamingSession(pipeline, offsets_dir=env.offsets_dir,
                                            config_store=store)):
                wait_until(lambda: count_rows(env.destination_url, "replica.bench") == 0, 60)
                # Rows written while nothing captures them: only the backfill brings them over.
                # (The stream sees them too; applying them first would be unfair, so the
                # destination is emptied again once the stream caught up.)
                execute(env.source_url, "INSERT INTO public.bench SELECT g, g, md5(g::text), "
                        "g / 7.0, now(), jsonb_build_object('g', g) FROM generate_series(1, %s) g",
                        params=(args.rows,))
                wait_until(lambda: count_rows(env.destination_url, "replica.bench") == args.rows,
                           600)
                execute(env.destination_url, "TRUNCATE replica.bench")
                job = store.create_backfill_job("bench", "public.bench")
                result = BackfillRunner(pipeline, store, job.id,
                                        chunk_rows=args.chunk_rows).run()
                # Again over the full destination, with a writer changing rows meanwhile.
                execute(env.destination_url, "TRUNCATE replica.bench")
                with _writing(env.source_url, args.rows, args.writer_rate) as written:
                    job = store.create_backfill_job("bench", "public.bench")
                    busy = BackfillRunner(pipeline, store, job.id,
                                          chunk_rows=args.chunk_rows).run()
                wait_until(lambda: env.converged("public.bench"), 300, "convergence")
            copy_seconds = binary_copy_seconds(env, env.source_url, env.destination_url,
                                               "public.bench", W2_COLUMNS)
        backfill_rate = result.rows / result.seconds
        copy_rate = args.rows / copy_seconds
        print(f"{'measure':28} {'rows':>9} {'seconds':>8} {'rows/s':>10}")
        print(f"{'backfill (whole table)':28} {result.rows:>9} {result.seconds:>8.2f} "
              f"{backfill_rate:>10.0f}")
        print(f"{'binary COPY pipe':28} {args.rows:>9} {copy_seconds:>8.2f} {copy_rate:>10.0f}")
        print(f"ratio backfill / binary COPY: {backfill_rate / copy_rate:.2f} (target >= 0.5)")
        label = f"backfill, writer {written[0] / busy.seconds:.0f}/s"
        print(f"{label:28} {busy.rows:>9} {busy.seconds:>8.2f} {busy.rows / busy.seconds:>10.0f}"
              f"  (ratio {busy.rows / busy.seconds / copy_rate:.2f}; destination == source after)")
        emit({"workload": "backfill", "engine": args.engine, "rows": args.rows,
              "chunk_rows": args.chunk_rows, "rosetta_rows_per_s": backfill_rate,
              "copy_rows_per_s": copy_rate, "writer_changes_per_s": written[0] / busy.seconds,
              "busy_rows_per_s": busy.rows / busy.seconds, "busy_converged": True})


@contextmanager
def _writing(url: str, rows: int, per_second: int) -> Iterator[list[int]]:
    """Update random rows at about ``per_second`` changes per second for the block."""
    stop = threading.Event()
    written = [0]

    def write() -> None:
        conn = psycopg2.connect(url)
        conn.autocommit = True
        rng = random.Random(1)
        batch = max(1, per_second // 100)
        with conn.cursor() as cursor:
            while not stop.is_set():
                started = time.monotonic()
                cursor.execute("UPDATE public.bench SET i = i + 1 WHERE id = ANY(%s)",
                               ([rng.randint(1, rows) for _ in range(batch)],))
                written[0] += batch
                time.sleep(max(0.0, 0.01 - (time.monotonic() - started)))
        conn.close()

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    try:
        yield written
    finally:
        stop.set()
        thread.join(30)


if __name__ == "__main__":
    run_main(main)
