"""What only the pgoutput engine promises: a position kept with the data (a stream resumes
anywhere, nothing applied twice), destinations that fail independently, and transactions
larger than its memory bound."""

from __future__ import annotations

import dataclasses
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg2
import pytest

from rosetta_dagster.core.local_postgres import LocalPostgresCluster
from rosetta_dagster.core.pipeline_config import Destination
from rosetta_dagster.core.streaming import StreamingSession
from rosetta_dagster.harness import (
    EventInserter,
    StreamingEnv,
    count_rows,
    execute,
    fetch,
    streaming,
    table_fingerprint,
    wait_until,
)
from rosetta_dagster_tests.conftest import TEST_PASSWORD

# Counts every row written into the destination table: a change applied twice shows as 2.
APPLICATION_COUNTER = """
CREATE SCHEMA IF NOT EXISTS replica;
CREATE TABLE replica.events (id bigint PRIMARY KEY, payload text, at timestamptz);
CREATE TABLE replica.applied (id bigint PRIMARY KEY, times int NOT NULL);
CREATE FUNCTION replica.count_application() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO replica.applied VALUES (NEW.id, 1)
    ON CONFLICT (id) DO UPDATE SET times = replica.applied.times + 1;
    RETURN NEW;
END $$;
CREATE TRIGGER count_application AFTER INSERT OR UPDATE ON replica.events
    FOR EACH ROW EXECUTE FUNCTION replica.count_application();
"""


@pytest.fixture
def engine() -> str:
    return "pgoutput"  # this module is about that engine (the shared ``env`` uses it)


def _stream_process(env: StreamingEnv, workdir: Path, config_url: str) -> subprocess.Popen[bytes]:
    workdir.mkdir(parents=True, exist_ok=True)
    pipeline_file = env.write_pipeline_file(workdir / "rosetta.yaml", "moving", ["public.events"],
                                            {"heartbeat_interval_ms": 1000})
    environment = {**env.pipeline_env(pipeline_file, config_url),
                   "ROSETTA_OFFSETS_DIR": "tmp/offsets"}  # relative: inside this workdir
    return subprocess.Popen([sys.executable, "-m", "rosetta_dagster.cli", "stream", "moving"],
                            cwd=workdir, env=environment, stdout=(workdir / "stream.log").open("ab"),
                            stderr=subprocess.STDOUT)


def test_kill_9_mid_stream_then_another_host_resumes_without_applying_anything_twice(
    env: StreamingEnv, pg_root: Path
) -> None:
    execute(env.source_url, "CREATE TABLE public.events (id bigint PRIMARY KEY, payload text, "
            "at timestamptz)", "INSERT INTO public.events SELECT g, 'initial', now() "
            "FROM generate_series(1, 1000) g")
    execute(env.destination_url, APPLICATION_COUNTER)
    config_db = f"cfg_{env.source_db}"
    env.cluster.create_database(config_db)
    config_url = env.cluster.dsn(config_db)
    first_host, second_host = pg_root / f"host-a-{env.source_db}", pg_root / f"host-b-{env.source_db}"
    streams: list[subprocess.Popen[bytes]] = []
    try:
        with EventInserter(env.source_url, 1_000_001):
            streams.append(_stream_process(env, first_host, config_url))
            wait_until(lambda: count_rows(env.destination_url, "replica.events") > 3000, 60,
                       "streamed rows before the kill")
            streams[0].send_signal(signal.SIGKILL)
            streams[0].wait(10)
            time.sleep(1)  # the writer goes on while nothing streams
            # "Another host": a fresh working directory; nothing of the first one is kept.
            shutil.rmtree(first_host)
            streams.append(_stream_process(env, second_host, config_url))
            time.sleep(2)  # and goes on while the second host streams
        wait_until(lambda: env.converged("public.events"), 60, "the resumed stream on host b")
    finally:
        for stream in streams:
            if stream.poll() is None:
                stream.send_signal(signal.SIGTERM)
                stream.wait(30)
    log = (second_host / "stream.log").read_text()
    assert "Initial load" not in log, log[-2000:]  # resumed from the destination's position
    assert not (second_host / "tmp").exists()  # and kept nothing on this host either
    # Every row was written exactly once: no replayed change reached the destination.
    assert fetch(env.destination_url, "SELECT times, count(*) FROM replica.applied GROUP BY times"
                 ) == [(1, count_rows(env.source_url, "public.events"))]


def _confirmed_flush(env: StreamingEnv, slot: str) -> str:
    return str(fetch(env.source_url, "SELECT confirmed_flush_lsn FROM pg_replication_slots "
                     "WHERE slot_name = %s", (slot,))[0][0])


def test_a_destination_down_for_a_while_does_not_hold_back_the_other(
    env: StreamingEnv, dedicated_cluster: LocalPostgresCluster
) -> None:
    execute(env.source_url, "CREATE TABLE public.events (id bigint PRIMARY KEY, payload text, "
            "at timestamptz)", "INSERT INTO public.events SELECT g, 'initial', now() "
            "FROM generate_series(1, 1000) g",
            "CREATE TABLE public.quiet (id int PRIMARY KEY)",
            "INSERT INTO public.quiet SELECT generate_series(1, 10)")
    far_db = f"far_{env.source_db}"
    dedicated_cluster.create_database(far_db)
    far = Destination(name="far", host="127.0.0.1", port=dedicated_cluster.port, database=far_db,
                      user=dedicated_cluster.superuser, password=TEST_PASSWORD, schema="replica")
    pipeline = env.pipeline("fanout", ["public.events", "public.quiet"])
    pipeline = dataclasses.replace(pipeline, destinations=(*pipeline.destinations, far))
    far_url = dedicated_cluster.dsn(far_db)

    def far_converged() -> bool:
        try:
            return all(table_fingerprint(env.source_url, "public", table) == table_fingerprint(
                far_url, "replica", table) for table in ("events", "quiet"))
        except psycopg2.Error:
            return False

    session = StreamingSession(pipeline, offsets_dir=env.offsets_dir)
    with streaming(session):
        wait_until(lambda: env.converged("public.events") and far_converged(), 60, "both loaded")
        with EventInserter(env.source_url, 1_000_001) as writer:
            time.sleep(1)
            dedicated_cluster.stop()
            down_since = time.monotonic()
            # Meanwhile the near destination keeps up with the writer...
            first_id = writer.next_id
            wait_until(lambda: fetch(env.destination_url, "SELECT max(id) FROM replica.events"
                                     )[0][0] > first_id + 200, 20, "the near destination to go on")
            # Found by the fuzzer: a column added while the far destination is down, and no
            # change of that table after it (nothing in the WAL tells of the column).
            execute(env.source_url, "ALTER TABLE public.quiet ADD COLUMN label text "
                    "DEFAULT 'added while far was down'")
            wait_until(lambda: env.converged("public.quiet"), 20, "the near one's new column")
            time.sleep(2)  # feedback of what both had applied before may still be under way
            held = _confirmed_flush(env, "rosetta_fanout")
            # Down for 12 s: more than two of the stream's retries (DESTINATION_RETRY_S).
            time.sleep(max(0.0, 12 - (time.monotonic() - down_since)))
            near_max = fetch(env.destination_url, "SELECT max(id) FROM replica.events")[0][0]
            # ...and the slot keeps the WAL the far one still needs.
            assert _confirmed_flush(env, "rosetta_fanout") == held
            dedicated_cluster.start()
            time.sleep(3)  # writes go on after it is back
        try:
            wait_until(lambda: env.converged("public.events") and far_converged(), 60,
                       "the far destination to catch up from the slot")
        except AssertionError as exc:
            state = {"source": fetch(env.source_url, "SELECT count(*), max(id) FROM public.events"),
                     "near": fetch(env.destination_url, "SELECT count(*), max(id) FROM replica.events"),
                     "far": fetch(far_url, "SELECT count(*), max(id) FROM replica.events"),
                     "positions": [fetch(u, "SELECT position FROM replica._rosetta_positions")
                                   for u in (env.destination_url, far_url)],
                     "slot": _confirmed_flush(env, "rosetta_fanout"),
                     "capture running": session._capture is not None and session._capture.running}  # noqa: SLF001
            raise AssertionError(f"{exc}: {state}") from None
    assert near_max > writer.next_id - 3000  # type: ignore[operator]  # kept up, not stalled


def test_a_transaction_far_larger_than_the_memory_bound_applies_whole_in_bounded_memory(
    env: StreamingEnv, pg_root: Path
) -> None:
    execute(env.source_url, "CREATE TABLE public.events (id bigint PRIMARY KEY, payload text, "
            "at timestamptz)", "INSERT INTO public.events VALUES (0, 'first', now())")
    config_db = f"cfg_{env.source_db}"
    env.cluster.create_database(config_db)
    workdir = pg_root / f"big-{env.source_db}"
    workdir.mkdir()
    pipeline_file = env.write_pipeline_file(workdir / "rosetta.yaml", "big", ["public.events"],
                                            {"max_queue_mb": 4})
    stream = subprocess.Popen(
        [sys.executable, "-m", "rosetta_dagster.cli", "stream", "big"], cwd=workdir,
        env=env.pipeline_env(pipeline_file, env.cluster.dsn(config_db)),
        stdout=(workdir / "stream.log").open("ab"), stderr=subprocess.STDOUT)
    seen: set[int] = set()
    stop = threading.Event()

    def watch() -> None:  # what readers of the destination see while it applies
        while not stop.is_set():
            seen.add(max(0, count_rows(env.destination_url, "replica.events")))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    try:
        wait_until(lambda: env.converged("public.events"), 60, "the initial load")
        before = _rss_kb(stream.pid, "VmRSS")
        watcher.start()
        # ~200k rows x 400 bytes in ONE transaction: ~80 MB of changes, 4 MB allowed in memory.
        execute(env.source_url, "INSERT INTO public.events SELECT g, repeat(md5(g::text), 12), "
                "now() FROM generate_series(1, 200000) g")
        wait_until(lambda: env.converged("public.events"), 180, "the large transaction")
        peak = _rss_kb(stream.pid, "VmHWM")
    finally:
        stop.set()
        stream.send_signal(signal.SIGTERM)
        stream.wait(30)
    assert seen <= {1, 200_001}, sorted(seen)[:10]  # never half of it: one destination transaction
    growth_mb = (peak - before) / 1024
    print(f"RSS before {before / 1024:.0f} MB, peak {peak / 1024:.0f} MB")
    assert growth_mb < 60, f"streaming process grew by {growth_mb:.0f} MB"


@pytest.mark.parametrize("message_from", ["another application", "the stream's heartbeat"])
def test_a_transaction_committing_right_after_a_logical_message_is_applied(
    env: StreamingEnv, message_from: str
) -> None:
    """pgoutput gives a message outside transactions the position where its WAL record ends:
    exactly where the next record starts, which may be the commit of a transaction already
    under way. A position taken from such a message must not pass that commit. Both kinds:
    another application's message, and the stream's own heartbeat while a transaction sits
    idle (its changes written, its commit still to come)."""
    execute(env.source_url, "CREATE EXTENSION IF NOT EXISTS pg_walinspect",
            "CREATE TABLE public.events (id bigint PRIMARY KEY, payload text, at timestamptz)",
            "INSERT INTO public.events SELECT g, 'initial', now() FROM generate_series(1, 60) g")
    writer = psycopg2.connect(env.source_url)
    other_application = psycopg2.connect(env.source_url)
    other_application.autocommit = True
    pipeline = env.pipeline("messages", ["public.events"], heartbeat_interval_ms=200)
    right_after_a_message = []
    try:
        with streaming(StreamingSession(pipeline, offsets_dir=env.offsets_dir)):
            wait_until(lambda: env.converged("public.events"), 60, "the initial load")
            # Other WAL (other databases of the cluster) may come in between: go on until the
            # commit record directly followed the message a few times.
            for key in range(1, 61):
                if sum(right_after_a_message) >= 4:
                    break
                with writer.cursor() as cursor, other_application.cursor() as other:
                    cursor.execute("DELETE FROM public.events WHERE id = %s "
                                   "RETURNING txid_current(), pg_current_wal_insert_lsn()", (key,))
                    xid, written = cursor.fetchone()  # type: ignore[misc]
                    if message_from == "another application":
                        other.execute("SELECT pg_logical_emit_message(false, 'another-app', 'x')")
                    else:  # idle longer than the heartbeat interval
                        time.sleep(0.5)
                writer.commit()
                # Which WAL record precedes the commit (the case this test is about: a message).
                right_after_a_message.append(fetch(env.source_url, (
                    "SELECT before.resource_manager FROM pg_get_wal_records_info(%s, "
                    "pg_current_wal_flush_lsn()) AS r JOIN pg_get_wal_records_info(%s, "
                    "pg_current_wal_flush_lsn()) AS before ON before.start_lsn = r.prev_lsn "
                    "WHERE r.xid = %s AND r.record_type = 'COMMIT'"),
                    (written, written, xid % 2**32)) == [("LogicalMessage",)])
            wait_until(lambda: env.converged("public.events"), 30, "every delete applied")
    finally:
        writer.close()
        other_application.close()
    assert sum(right_after_a_message) >= 4  # the case this test is about did occur


def _rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def test_a_position_psycopg2_may_have_confirmed_is_applied_apart_from_the_rows_behind_it() -> None:
    """A keepalive position (the slot may already stand there) is a batch of its own: if the
    transaction queued behind it is refused, the destinations still record it, and the next
    start does not mistake the slot for a re-created one."""
    from rosetta_dagster.core.capture.pgoutput.engine import _ByteBoundedQueue, _Unit
    from rosetta_dagster.core.events import ChangeEvent

    queue = _ByteBoundedQueue(limit=1 << 20)
    row = ChangeEvent.__new__(ChangeEvent)  # contents do not matter to the queue
    for unit in (_Unit(position=10), _Unit(position=11), _Unit(items=[row], position=20, size=1),
                 _Unit(items=[row], position=30, size=1), _Unit(position=31)):
        assert queue.put(unit, timeout_s=0)
    batches = [queue.take(0, max_size=1 << 20, max_events=100) for _ in range(3)]
    assert [[u.position for u in units] for units in batches] == [[10, 11], [20, 30], [31]]
