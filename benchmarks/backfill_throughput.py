"""Backfill speed: a whole-table backfill of N rows (default 1M) next to a plain binary COPY of
the same table into an empty copy, same machine, one run; prints both and their ratio.

The backfill runs for real: the pipeline streams, the copy goes through watermarks, destination
staging and the stream's chunk apply.

    .venv/bin/python -m benchmarks.backfill_throughput [--rows 1000000] [--chunk-rows 50000]
        [--engine debezium|pgoutput]
"""

from __future__ import annotations

import argparse

from benchmarks.support import W2_COLUMNS, benchmark_env, binary_copy_seconds, create_table
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
            copy_seconds = binary_copy_seconds(env, env.source_url, env.destination_url,
                                               "public.bench", W2_COLUMNS)
        backfill_rate = result.rows / result.seconds
        copy_rate = args.rows / copy_seconds
        print(f"{'measure':28} {'rows':>9} {'seconds':>8} {'rows/s':>10}")
        print(f"{'backfill (whole table)':28} {result.rows:>9} {result.seconds:>8.2f} "
              f"{backfill_rate:>10.0f}")
        print(f"{'binary COPY pipe':28} {args.rows:>9} {copy_seconds:>8.2f} {copy_rate:>10.0f}")
        print(f"ratio backfill / binary COPY: {backfill_rate / copy_rate:.2f} (target >= 0.5)")


if __name__ == "__main__":
    main()
