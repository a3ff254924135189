"""Tables without a key: the cost of an UPDATE or DELETE on a REPLICA IDENTITY FULL table of N
rows (default 100,000), next to the same table with a primary key, same stream, same run.

Without a key, each batch that updates or deletes rows finds them with one hash join over the
whole destination table (one column's text as the probe, the whole row's text compared only for
the rows it matches); with a key, by the primary key's index. Two measurements per table, with
either engine (``--engine``; Debezium also tells each record's place in what it delivers again,
see core.streaming.redelivery, which a keyed table does not pay for):

* isolated: one single-row UPDATE at a time, waited for at the destination (a batch of one: the
  latency of a lone change, mostly that join);
* burst: ``--burst`` single-row UPDATE/DELETE transactions back to back (the stream folds them
  into few batches): changes/s until the destination equals the source;
* inserts: ``--inserts`` rows in 1,000-row transactions (a batch that only inserts is COPYed
  straight into the table in both cases): rows/s until the destination equals the source.

    .venv/bin/python -m benchmarks.keyless [--engine pgoutput|debezium] [--rows 100000]
        [--isolated 20] [--burst 2000] [--inserts 50000] [--write-results]
"""

from __future__ import annotations

import argparse
import statistics
import time

import psycopg2
import psycopg2.errors

from benchmarks.support import benchmark_env, emit, log, run_main, wait_for, write_results_section
from rosetta_dagster.core.streaming import StreamingSession
from rosetta_dagster.harness import StreamingEnv, execute, fetch, streaming

COLUMNS = "id bigint, i int, t text, n numeric(12,2), ts timestamptz, j jsonb"
FILL = ("INSERT INTO public.{table} SELECT g, g % 1000, md5(g::text), g / 7.0, "
        "'2024-01-01'::timestamptz + g * interval '1 second', jsonb_build_object('g', g) "
        "FROM generate_series(1, {rows}) g")


def _digest(url: str, table: str) -> tuple[object, ...] | None:
    try:
        return fetch(url, f"SELECT count(*), sum(i), sum(id) FROM {table}")[0]  # noqa: S608
    except psycopg2.errors.UndefinedTable:  # not created yet
        return None


def _measure(env: StreamingEnv, table: str, isolated: int, burst: int, inserts: int
             ) -> dict[str, float]:
    source, destination = f"public.{table}", f"replica.{table}"

    def equal() -> bool:
        return _digest(env.source_url, source) == _digest(env.destination_url, destination)

    conn = psycopg2.connect(env.source_url)
    conn.autocommit = True
    latencies = []
    with conn.cursor() as cursor:
        for step in range(isolated):
            cursor.execute(f"UPDATE {source} SET i = i + 1 WHERE id = %s", (step * 997 + 1,))  # noqa: S608
            latencies.append(wait_for(equal, 60, interval_s=0.005))
        started = time.monotonic()
        for step in range(burst):
            key = (step * 7919) % 90_000 + 1
            if step % 4 == 3:
                cursor.execute(f"DELETE FROM {source} WHERE id = %s", (key,))  # noqa: S608
            else:
                cursor.execute(f"UPDATE {source} SET i = i + 1 WHERE id = %s", (key,))  # noqa: S608
        wait_for(equal, 600, interval_s=0.05)
        seconds = time.monotonic() - started
        started = time.monotonic()
        for first in range(1_000_001, 1_000_001 + inserts, 1000):
            cursor.execute(f"INSERT INTO {source} SELECT g, g %% 1000, md5(g::text), g / 7.0, "  # noqa: S608
                           "now(), NULL FROM generate_series(%s, %s) g", (first, first + 999))
        wait_for(equal, 600, interval_s=0.05)
        insert_seconds = time.monotonic() - started
    conn.close()
    return {"isolated_p50_ms": 1000 * statistics.median(latencies),
            "isolated_max_ms": 1000 * max(latencies),
            "burst_changes_per_s": burst / seconds, "burst_seconds": seconds,
            "inserts_per_s": inserts / insert_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--engine", choices=("pgoutput", "debezium"), default="pgoutput")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--isolated", type=int, default=20)
    parser.add_argument("--burst", type=int, default=2000)
    parser.add_argument("--inserts", type=int, default=50_000)
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    with benchmark_env(args.engine) as env:
        for table, identity in (("keyed", "PRIMARY KEY"), ("keyless", "FULL")):
            execute(env.source_url, f"CREATE TABLE public.{table} ({COLUMNS})",  # noqa: S608
                    FILL.format(table=table, rows=int(args.rows)))
            if identity == "FULL":
                # A plain (non-unique) index, so the source's own UPDATEs do not scan the table:
                # the destination copy has none (it is not the replica identity).
                execute(env.source_url, f"ALTER TABLE public.{table} REPLICA IDENTITY FULL",
                        f"CREATE INDEX ON public.{table} (id)")
            else:
                execute(env.source_url, f"ALTER TABLE public.{table} ADD PRIMARY KEY (id)")
            pipeline = env.pipeline(f"bench_{table}", [f"public.{table}"])
            with streaming(StreamingSession(pipeline, offsets_dir=env.offsets_dir)):
                wait_for(lambda t=table: _digest(env.source_url, f"public.{t}")  # type: ignore[misc]
                         == _digest(env.destination_url, f"replica.{t}"), 300)
                log(f"{table}: loaded {args.rows} rows; measuring")
                results[table] = _measure(env, table, args.isolated, args.burst, args.inserts)
            log(f"{table}: {results[table]}")
    emit({"benchmark": "keyless", "engine": args.engine, "rows": args.rows, **{
        f"{table}_{name}": round(value, 1) for table, values in results.items()
        for name, value in values.items()}})
    keyed, keyless = results["keyed"], results["keyless"]
    text = "\n".join([
        f"## Tables without a key ({args.rows:,} rows, {args.engine} engine)",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, one stream per table, "
        "both tables in the same run.",
        "",
        "| table | a lone UPDATE, p50 / max (ms) | burst of single-row UPDATE/DELETE "
        f"(changes/s) | {args.inserts:,} inserts in 1,000-row transactions (rows/s) |",
        "| --- | --- | --- | --- |",
        *(f"| {label} | {values['isolated_p50_ms']:.0f} / {values['isolated_max_ms']:.0f} | "
          f"{values['burst_changes_per_s']:,.0f} | {values['inserts_per_s']:,.0f} |"
          for label, values in (("primary key (anchor)", keyed),
                                ("REPLICA IDENTITY FULL, no key", keyless))),
    ])
    print(text)
    if args.write_results:
        write_results_section(f"keyless-{args.engine}", text)


if __name__ == "__main__":
    run_main(main)
