"""W3 wide types: streaming capacity on a table with one column of every type family.

The table has a column per family of the type matrix (``rosetta_dagster.harness.type_matrix``),
filled with that family's awkward values. With the Debezium engine the families it refuses are
left out (it would refuse the pipeline). Inserts and updates are written while the pipeline is
paused, then it is resumed and timed until the destination equals the source; every row is then
compared as text under the pinned settings.

    .venv/bin/python -m benchmarks.w3_types --engine pgoutput [--rows 20000]
"""

from __future__ import annotations

import argparse
import time

from psycopg2 import sql

from benchmarks.support import aggregate, benchmark_env, emit, log, run_main, wait_for
from rosetta_dagster.core.capture import capture_engine
from rosetta_dagster.core.errors import RosettaError
from rosetta_dagster.core.pipeline_config import TableRef
from rosetta_dagster.core.streaming import StreamingSession
from rosetta_dagster.core.table_schema import read_table_schema
from rosetta_dagster.harness import StreamingEnv, execute, streaming
from rosetta_dagster.harness.type_matrix import (
    families_for,
    pinned_connection,
    rows_as_text,
    user_types_for,
)

TEMPLATES = 8  # distinct template rows the workload cycles through


def create_wide_table(env: StreamingEnv, engine: str) -> list[str]:
    """``public.wide`` with a column per family the engine carries; returns their names."""
    conn = pinned_connection(env.source_url)
    with conn.cursor() as cursor:
        families = families_for(engine)
        cursor.execute(user_types_for(families))
        columns = [sql.SQL("{} {}").format(sql.Identifier(f"c_{f.name}"), sql.SQL(f.type_sql))
                   for f in families]
        for name in ("wide", "wide_template"):
            cursor.execute(sql.SQL("CREATE TABLE {} (id bigint PRIMARY KEY, n int NOT NULL, {})")
                           .format(sql.Identifier("public", name), sql.SQL(", ").join(columns)))
        schema = read_table_schema(conn, TableRef("public", "wide"), "benchmark source")
        values = capture_engine(engine).values
        refused = [c.name for c in schema.columns
                   if values.refusal(c, c.name in schema.key_columns) is not None]
        for name in refused:
            for table in ("wide", "wide_template"):
                cursor.execute(sql.SQL("ALTER TABLE {} DROP COLUMN {}").format(
                    sql.Identifier("public", table), sql.Identifier(name)))
        kept = [f for f in families if f"c_{f.name}" not in refused]
        for row in range(TEMPLATES):
            names = [sql.Identifier(f"c_{f.name}") for f in kept]
            cells = [f.values[row % len(f.values)] if f.values and row % 4 != 3 else None
                     for f in kept]
            cursor.execute(sql.SQL("INSERT INTO public.wide_template (id, n, {}) VALUES (%s, 0, {})")
                           .format(sql.SQL(", ").join(names), sql.SQL(", ").join(
                               sql.SQL("%s::{}").format(sql.SQL(f.type_sql)) for f in kept)),
                           (row, *cells))
    conn.close()
    if refused:
        log(f"W3 {engine}: {len(refused)} column(s) left out (refused by the engine): "
            + ", ".join(refused))
    return [f"c_{f.name}" for f in kept]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--engine", choices=["debezium", "pgoutput"], default="pgoutput")
    parser.add_argument("--rows", type=int, default=20_000)
    args = parser.parse_args()
    with benchmark_env(engine=args.engine) as env:
        columns = create_wide_table(env, args.engine)
        pipeline = env.pipeline("wide", ["public.wide"])
        with streaming(StreamingSession(pipeline, offsets_dir=env.offsets_dir)):
            time.sleep(3)  # the (empty) initial load creates the slot; then paused
        log(f"W3 {args.engine}: writing {args.rows} inserts and {args.rows} updates")
        for start in range(0, args.rows, 1000):
            execute(env.source_url, sql.SQL(
                "INSERT INTO public.wide SELECT g, 0, {columns} FROM generate_series(%s, %s) g "
                "JOIN public.wide_template t ON t.id = mod(g, {templates})").format(
                    columns=sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(c))
                                               for c in columns),
                    templates=sql.Literal(TEMPLATES)),
                params=(start, min(start + 999, args.rows - 1)))
        execute(env.source_url, "UPDATE public.wide SET n = n + 1")
        target = aggregate(env.source_url, "public.wide", "n")
        session = StreamingSession(pipeline, offsets_dir=env.offsets_dir)
        events = 2 * args.rows
        try:
            with streaming(session) as thread:
                seconds = wait_for(lambda: not thread.is_alive() or aggregate(
                    env.destination_url, "replica.wide", "n") == target, 1800)
        except RosettaError as exc:  # the engine could not carry the values at all
            log(f"W3 {args.engine}: the stream failed: {exc}")
            emit({"workload": "W3", "engine": args.engine, "columns": len(columns),
                  "events": events, "events_per_s": 0.0, "exact": False,
                  "error": str(exc)[:300]})
            return
        exact = rows_as_text(env.source_url, "public", "wide") == rows_as_text(
            env.destination_url, "replica", "wide")
    log(f"W3 {args.engine}: {events} events in {seconds:.1f} s; exact: {exact}")
    emit({"workload": "W3", "engine": args.engine, "columns": len(columns), "events": events,
          "seconds": seconds, "events_per_s": events / seconds, "exact": exact})


if __name__ == "__main__":
    run_main(main)
