"""W1 streaming: capacity and latency of the pipeline next to native logical replication.

Capacity: 200k inserts (1k-row transactions), 50k updates, 20k deletes are written while both
the pipeline and a native subscription are paused; each is resumed in turn and timed until its
destination equals the source. Latency: single-row commits at 20/s for 10 s while both stream;
commit -> visible in each destination (polled every 2 ms); and a restart's first applied change.
Resources: peak RSS of this process (it hosts the stream: for Debezium JVM + Python) and its
CPU seconds per 100k events during catch-up.

    .venv/bin/python -m benchmarks.w1_streaming --engine pgoutput [--inserts 200000]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import threading
import time

import psycopg2
from psycopg2 import sql

from benchmarks.support import (
    NativeSubscription,
    aggregate,
    benchmark_env,
    create_table,
    emit,
    log,
    run_main,
    wait_for,
)
from rosetta_dagster.core.streaming import StreamingSession
from rosetta_dagster.harness import StreamingEnv, execute, streaming, table_fingerprint

W1_COLUMNS = "id bigint PRIMARY KEY, i int, t text, n numeric(12,2), ts timestamptz"
LATENCY_COLUMNS = "id bigint PRIMARY KEY, i int, committed_at timestamptz"


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _write_workload(url: str, inserts: int, updates: int, deletes: int) -> int:
    for start in range(1, inserts + 1, 1000):
        execute(url, "INSERT INTO public.bench SELECT g, g, md5(g::text), g / 7.0, now() "
                "FROM generate_series(%s, %s + 999) g", params=(start, start))
    execute(url, "UPDATE public.bench SET i = i + 1 WHERE id <= %s", params=(updates,))
    execute(url, "DELETE FROM public.bench WHERE id > %s", params=(inserts - deletes,))
    return inserts + updates + deletes


def capacity(
    env: StreamingEnv, inserts: int, updates: int, deletes: int, **settings: object
) -> dict[str, float]:
    create_table(env.source_url, "public.bench", W1_COLUMNS)
    native = NativeSubscription(env, "public.bench", W1_COLUMNS, name="native_w1")
    pipeline = env.pipeline("bench", ["public.bench"], **settings)
    # First start: the (empty) initial load creates the slot; then the pipeline is paused.
    with streaming(StreamingSession(pipeline, offsets_dir=env.offsets_dir)):
        time.sleep(3)
    log("W1: writing the workload while both are paused")
    events = _write_workload(env.source_url, inserts, updates, deletes)
    target = aggregate(env.source_url, "public.bench")

    session = StreamingSession(pipeline, offsets_dir=env.offsets_dir)
    cpu_before = _cpu_seconds()
    started = time.monotonic()
    with streaming(session):
        rosetta_s = wait_for(
            lambda: aggregate(env.destination_url, "replica.bench") == target, 1800)
        cpu = _cpu_seconds() - cpu_before
    assert table_fingerprint(env.source_url, "public", "bench") == table_fingerprint(
        env.destination_url, "replica", "bench"), "the pipeline's destination differs"
    log(f"W1: pipeline caught up in {rosetta_s:.1f} s ({time.monotonic() - started:.1f} s "
        "with start and stop)")

    native.enable()
    native_s = wait_for(lambda: aggregate(native.url, "public.bench") == target, 1800)
    assert table_fingerprint(native.url, "public", "bench") == table_fingerprint(
        env.source_url, "public", "bench"), "the native subscriber differs"
    native.drop()
    log(f"W1: native logical replication caught up in {native_s:.1f} s")
    return {
        "events": events,
        "rosetta_seconds": rosetta_s,
        "rosetta_events_per_s": events / rosetta_s,
        "native_seconds": native_s,
        "native_events_per_s": events / native_s,
        "cpu_seconds_per_100k_events": cpu / events * 100_000,
    }


class _VisibilityWatcher(threading.Thread):
    """Records when each id first becomes visible in one destination (ids commit in order)."""

    def __init__(self, url: str, table: str, interval_s: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.url, self.table, self.interval_s = url, table, interval_s
        self.seen_at: dict[int, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        conn = psycopg2.connect(self.url)
        conn.autocommit = True
        newest = 0
        query = sql.SQL("SELECT coalesce(max(id), 0) FROM {}").format(
            sql.Identifier(*self.table.split(".")))
        with conn.cursor() as cursor:
            while not self.stop.is_set():
                cursor.execute(query)
                row = cursor.fetchone()
                now = time.perf_counter()
                current = int(row[0]) if row else 0
                for key in range(newest + 1, current + 1):
                    self.seen_at[key] = now
                newest = max(newest, current)
                time.sleep(self.interval_s)
        conn.close()


def latency(env: StreamingEnv, rate: int, seconds: int, **settings: object) -> dict[str, float]:
    create_table(env.source_url, "public.latency", LATENCY_COLUMNS)
    native = NativeSubscription(env, "public.latency", LATENCY_COLUMNS, name="native_lat")
    native.enable()
    pipeline = env.pipeline("lat", ["public.latency"], **settings)
    session = StreamingSession(pipeline, offsets_dir=env.offsets_dir)
    commits = rate * seconds
    committed_at: dict[int, float] = {}
    with streaming(session):
        # Warm-up: the engine is streaming once a row arrives through it (rows written before
        # its slot existed arrive by the initial load's COPY instead).
        warm_up = 0

        def streamed() -> bool:
            nonlocal warm_up
            warm_up -= 1
            execute(env.source_url, "INSERT INTO public.latency VALUES (%s, 0, now())",
                    params=(warm_up,))
            return session.progress.events_applied > 0

        wait_for(streamed, 120, interval_s=0.5)
        wait_for(lambda: aggregate(native.url, "public.latency")[0] == -warm_up, 120)
        watchers = [_VisibilityWatcher(env.destination_url, "replica.latency"),
                    _VisibilityWatcher(native.url, "public.latency")]
        for watcher in watchers:
            watcher.start()
        conn = psycopg2.connect(env.source_url)
        conn.autocommit = True
        with conn.cursor() as cursor:
            next_at = time.perf_counter()
            for key in range(1, commits + 1):
                time.sleep(max(0.0, next_at - time.perf_counter()))
                cursor.execute("INSERT INTO public.latency VALUES (%s, %s, now())", (key, key))
                committed_at[key] = time.perf_counter()
                next_at += 1 / rate
        conn.close()
        wait_for(lambda: all(len(w.seen_at) >= commits for w in watchers), 60)
        for watcher in watchers:
            watcher.stop.set()
            watcher.join()
    native.drop()
    result: dict[str, float] = {"commits": commits}
    for label, watcher in (("rosetta", watchers[0]), ("native", watchers[1])):
        delays = sorted((watcher.seen_at[k] - committed_at[k]) * 1000 for k in committed_at)
        result[f"{label}_p50_ms"] = statistics.median(delays)
        result[f"{label}_p99_ms"] = delays[min(len(delays) - 1, int(len(delays) * 0.99))]
        log(f"W1 latency {label}: slowest {[round(d) for d in delays[-5:]]} ms")
    return result


def start_to_first_change(env: StreamingEnv, **settings: object) -> dict[str, float]:
    """Milliseconds from a (re)start of a pipeline whose slot exists to its first applied
    change, the change committed right after the start."""
    create_table(env.source_url, "public.startup", LATENCY_COLUMNS)
    pipeline = env.pipeline("startup", ["public.startup"], **settings)
    with streaming(StreamingSession(pipeline, offsets_dir=env.offsets_dir)):
        time.sleep(3)  # first start: the initial load creates the slot
    session = StreamingSession(pipeline, offsets_dir=env.offsets_dir)
    started = time.perf_counter()
    with streaming(session):
        execute(env.source_url, "INSERT INTO public.startup VALUES (1, 1, now())")
        wait_for(lambda: session.progress.events_applied > 0, 120, interval_s=0.002)
        elapsed_ms = (time.perf_counter() - started) * 1000
    log(f"W1: start -> first applied change {elapsed_ms:.0f} ms")
    return {"start_to_first_change_ms": elapsed_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--engine", choices=["debezium", "pgoutput"], default="debezium")
    parser.add_argument("--inserts", type=int, default=200_000)
    parser.add_argument("--updates", type=int, default=50_000)
    parser.add_argument("--deletes", type=int, default=20_000)
    parser.add_argument("--latency-rate", type=int, default=20)
    parser.add_argument("--latency-seconds", type=int, default=10)
    parser.add_argument("--only", choices=["capacity", "latency"], help="run one part")
    parser.add_argument("--poll-interval-ms", type=int, help="override the pipeline default")
    parser.add_argument("--jvm-max-heap", help="override the pipeline default")
    args = parser.parse_args()
    settings: dict[str, object] = {"engine": args.engine}
    if args.poll_interval_ms is not None:
        settings["poll_interval_ms"] = args.poll_interval_ms
    if args.jvm_max_heap is not None:
        settings["jvm_max_heap"] = args.jvm_max_heap
    result: dict[str, float] = {}
    with benchmark_env(args.engine) as env:
        if args.only != "latency":
            result.update(capacity(env, args.inserts, args.updates, args.deletes, **settings))
        if args.only != "capacity":
            result.update(latency(env, args.latency_rate, args.latency_seconds, **settings))
            result.update(start_to_first_change(env, **settings))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    emit({"workload": "W1", "engine": args.engine, **result})


if __name__ == "__main__":
    run_main(main)
