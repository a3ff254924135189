"""W1 streaming capacity: 200k inserts, 50k updates, 20k deletes, then catch-up.

The changes are written while the pipeline is paused (after its initial snapshot of an empty
table), then the pipeline is resumed; we time from resume until destination == source.

    .venv/bin/python -m benchmarks.streaming_throughput [--inserts 200000]
"""

from __future__ import annotations

import argparse
import resource
import threading
import time

from benchmarks.support import benchmark_env
from rosetta_dagster.core.streaming import StreamingSession
from rosetta_dagster_tests.streaming_support import (
    count_rows,
    execute,
    streaming,
    wait_until,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--inserts", type=int, default=200_000)
    parser.add_argument("--updates", type=int, default=50_000)
    parser.add_argument("--deletes", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=8192)
    args = parser.parse_args()

    with benchmark_env() as env:
        execute(env.source_url, "CREATE TABLE public.bench (id bigint PRIMARY KEY, i int, "
                "t text, n numeric(12,2), ts timestamptz)")
        pipeline = env.pipeline("bench", ["public.bench"], max_batch_size=args.batch_size,
                                max_queue_size=args.batch_size * 4)
        # First start: empty snapshot, creates the slot; then stop (the pipeline is paused).
        with streaming(StreamingSession(pipeline, offsets_dir=env.offsets_dir)):
            wait_until(lambda: count_rows(env.destination_url, "replica.bench") == 0, 60)
            time.sleep(2)

        for start in range(1, args.inserts + 1, 1000):
            execute(env.source_url, "INSERT INTO public.bench SELECT g, g, md5(g::text), g / 7.0, "
                    "now() FROM generate_series(%s, %s + 999) g", params=(start, start))
        execute(env.source_url, "UPDATE public.bench SET i = i + 1 WHERE id <= %s",
                params=(args.updates,))
        execute(env.source_url, "DELETE FROM public.bench WHERE id > %s",
                params=(args.inserts - args.deletes,))
        events = args.inserts + args.updates + args.deletes

        session = StreamingSession(pipeline, offsets_dir=env.offsets_dir)
        started = time.monotonic()
        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        with streaming(session):
            wait_until(lambda: session.progress.events_applied >= events, 1800, "catch-up")
            wait_until(lambda: env.converged("public.bench"), 600, "convergence")
        elapsed = time.monotonic() - started
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
        print("| workload | events | catch-up s | events/s | CPU s per 100k events | peak RSS MB |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        print(f"| W1 capacity | {events} | {elapsed:.1f} | {events / elapsed:,.0f} | "
              f"{cpu / events * 100_000:.1f} | {cpu_after.ru_maxrss / 1024:.0f} |")
        print(f"(threads alive: {threading.active_count()})")


if __name__ == "__main__":
    main()
