"""Fast initial load: COPY under the slot's exported snapshot, then an exact hand-off to the
stream (first start, dropped slot, added table, crash during the load)."""

from __future__ import annotations

import logging
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg2
import pytest
from psycopg2 import sql

from rosetta_dagster.core.config_store import ConfigStore
from rosetta_dagster.core.destination.postgres import POSTGRES
from rosetta_dagster.core.initial_load import TableLoadReport
from rosetta_dagster.core.load_fences import SnapshotVisibility
from rosetta_dagster.core.local_postgres import LocalPostgresCluster
from rosetta_dagster.core.pipeline_config import TableRef
from rosetta_dagster.core.streaming import StreamingSession
from rosetta_dagster.core.table_schema import read_table_schema
from rosetta_dagster.harness import (
    BackgroundWriter,
    StreamingEnv,
    count_rows,
    execute,
    fetch,
    new_streaming_env,
    streaming,
    table_fingerprint,
    wait_until,
)


class _Writer(BackgroundWriter):
    """Inserts, updates and deletes on ``table`` in single-row transactions until stopped."""

    def __init__(self, url: str, table: str, first_new_id: int, existing: int) -> None:
        self.url, self.table = url, table
        self.next_id, self.existing = first_new_id, existing
        self.commits = 0
        # WAL position just before each insert: an insert whose position is past a slot's
        # consistent point committed after that slot's snapshot was taken.
        self.insert_lsns: list[int] = []
        super().__init__()

    def write(self) -> None:
        conn = psycopg2.connect(self.url)
        conn.autocommit = True
        pick = random.Random(8)
        table = sql.Identifier(*self.table.split("."))
        with conn.cursor() as cursor:
            while not self.stopping:
                cursor.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")
                row = cursor.fetchone()
                assert row is not None
                self.insert_lsns.append(int(row[0]))
                cursor.execute(sql.SQL("INSERT INTO {} VALUES (%s, 0, 'new')").format(table),
                               (self.next_id,))
                self.next_id += 1
                cursor.execute(sql.SQL("UPDATE {} SET v = v + 1 WHERE id = %s").format(table),
                               (pick.randint(1, self.existing),))
                cursor.execute(sql.SQL("DELETE FROM {} WHERE id = %s").format(table),
                               (pick.randint(1, self.existing),))
                self.commits += 3
        conn.close()


def _create_table(url: str, name: str, rows: int) -> None:
    conn = psycopg2.connect(url)
    conn.autocommit = True
    table = sql.Identifier("public", name)
    with conn.cursor() as cursor:
        cursor.execute(sql.SQL("CREATE TABLE {} (id bigint PRIMARY KEY, v int, s text)").format(table))
        cursor.execute(sql.SQL("INSERT INTO {} SELECT g, 0, md5(g::text) "
                               "FROM generate_series(1, %s) g").format(table), (rows,))
        cursor.execute(sql.SQL("ANALYZE {}").format(table))
    conn.close()


def _assert_identical(env: StreamingEnv, name: str) -> None:
    """Count and ordered checksum over every column, source against destination."""
    source = table_fingerprint(env.source_url, "public", name)

    def identical() -> bool:
        try:  # the destination table appears when the session has prepared it
            return table_fingerprint(env.destination_url, "replica", name) == source
        except psycopg2.errors.UndefinedTable:
            return False

    wait_until(identical, 120, f"replica.{name} == public.{name}")


def test_snapshot_visibility_follows_pg_snapshot_rules() -> None:
    snapshot = SnapshotVisibility.parse("100:105:101,103")
    assert [x for x in range(98, 108) if snapshot.includes(x)] == [98, 99, 100, 102, 104]
    # 32-bit xids from the WAL against a snapshot in a later epoch, both sides of the boundary.
    epoch = 3 << 32
    wrapped = SnapshotVisibility(epoch + 5, epoch + 10)
    assert wrapped.includes(2**32 - 3)  # epoch 2, before the wrap: committed earlier
    assert wrapped.includes(7)
    assert not wrapped.includes(12)
    assert str(SnapshotVisibility.parse("7:9:8")) == "7:9:8"


def test_rows_written_during_the_copy_are_neither_lost_nor_applied_twice(
    env: StreamingEnv, caplog: pytest.LogCaptureFixture
) -> None:
    _create_table(env.source_url, "busy", 200_000)
    pipeline = env.pipeline("busy", ["public.busy"], initial_load_range_rows=20_000,
                            initial_load_workers=2)
    reports: list[TableLoadReport] = []
    writes_when_loaded: list[int] = []
    inserts_when_loaded: list[int] = []
    with _Writer(env.source_url, "public.busy", 200_001, 200_000) as writer:

        def loaded(report: TableLoadReport) -> None:
            reports.append(report)
            writes_when_loaded.append(writer.commits)
            inserts_when_loaded.append(len(writer.insert_lsns))

        session = StreamingSession(pipeline, offsets_dir=env.offsets_dir, on_table_loaded=loaded)
        caplog.set_level(logging.INFO, logger="rosetta")
        with streaming(session):
            wait_until(lambda: reports, 120, "the initial load")
            wait_until(lambda: writer.commits > writes_when_loaded[0] + 300, 60, "later writes")
            writer.__exit__()
            _assert_identical(env, "busy")
    (report,) = reports
    # Inserts committed after the slot's snapshot and before the load completed: written
    # during the copy, so only the stream can have brought them.
    during_copy = [lsn for lsn in writer.insert_lsns[:inserts_when_loaded[0]]
                   if lsn > report.consistent_lsn]
    assert during_copy, "nothing was written while the table was being copied"
    assert report.mode == "direct" and report.rows >= 200_000
    # The slot decodes exactly what its snapshot did not see: nothing to skip.
    assert session.progress.fenced_events_skipped == 0
    # Streamed events: the writes after the snapshot, none of the 200k copied rows.
    assert 0 < session.progress.events_applied < 200_000
    progress_lines = [r.getMessage() for r in caplog.records if "public.busy -> dst" in r.getMessage()]
    assert any("%)" in line and "rows/s" in line for line in progress_lines)
    assert any("complete: " in line and "(100%)" in line for line in progress_lines)


def test_table_added_to_a_streaming_pipeline_hands_off_exactly(env: StreamingEnv) -> None:
    _create_table(env.source_url, "first", 100)
    first = env.pipeline("grow", ["public.first"])
    with streaming(StreamingSession(first, offsets_dir=env.offsets_dir)):
        _assert_identical(env, "first")
    # While the pipeline is stopped, the new table joins the publication and then changes:
    # the stream (resuming from its older offset) will deliver these changes, and the new
    # table's snapshot, taken later, already contains them.
    _create_table(env.source_url, "second", 5_000)
    execute(env.source_url, "ALTER PUBLICATION rosetta_grow ADD TABLE public.second")
    for _ in range(5):
        execute(env.source_url, "UPDATE public.second SET v = v + 1 WHERE id <= 10")
    execute(env.source_url, "UPDATE public.first SET v = 7 WHERE id = 1")
    # The destination already has a `second` from an earlier life: rows the source never had
    # (below and above its key span) and a stale one must not survive the load.
    execute(env.destination_url,
            "CREATE TABLE replica.second (id bigint PRIMARY KEY, v int, s text)",
            "INSERT INTO replica.second VALUES (-1, 0, 'below'), (0, 0, 'zero'), "
            "(1, 99, 'stale'), (1000000, 0, 'above')")

    grown = env.pipeline("grow", ["public.first", "public.second"])
    reports: list[TableLoadReport] = []
    session = StreamingSession(grown, offsets_dir=env.offsets_dir, on_table_loaded=reports.append)
    with streaming(session):
        _assert_identical(env, "second")
        _assert_identical(env, "first")
        execute(env.source_url, "UPDATE public.second SET v = v + 100 WHERE id <= 3",
                "DELETE FROM public.second WHERE id = 4")
        _assert_identical(env, "second")
    assert [r.table for r in reports] == [TableRef("public", "second")]
    # 5 transactions x 10 rows, all inside the snapshot: skipped, not applied a second time.
    assert session.progress.fenced_events_skipped == 50
    stored = session.positions.read()
    assert stored is not None and stored.loads is not None
    assert set(stored.loads.tables) == set(grown.tables)
    # The pipeline's own slot is the only one left (the load's slot was temporary).
    slots = fetch(env.cluster.dsn(), "SELECT slot_name FROM pg_replication_slots WHERE database = %s",
                  (env.source_db,))
    assert slots == [("rosetta_grow",)]


@pytest.mark.parametrize("engine", ["pgoutput"])  # above the capture (test_capture_contract)
def test_columns_added_by_a_transaction_the_slot_waits_for_are_loaded(env: StreamingEnv) -> None:
    """Found by the fuzzer: the stream read the table's columns, then creating the slot waited
    for an open transaction that added a column and wrote rows with it; the snapshot holds
    those rows, and their values of the new column must be copied too (not NULL)."""
    _create_table(env.source_url, "grown", 50)
    writer = psycopg2.connect(env.source_url)
    with writer.cursor() as cursor:  # a transaction left open while the stream starts
        cursor.execute("UPDATE public.grown SET v = 1 WHERE id = 1")  # holds an xid
    session = StreamingSession(env.pipeline("widened", ["public.grown"]),
                               offsets_dir=env.offsets_dir)
    with streaming(session):
        time.sleep(2)  # the session has read the columns and waits for the slot
        with writer.cursor() as cursor:
            cursor.execute("ALTER TABLE public.grown ADD COLUMN label text")
            cursor.execute("UPDATE public.grown SET label = 'label ' || id WHERE id <= 10")
        writer.commit()
        _assert_identical(env, "grown")
    writer.close()
    assert fetch(env.destination_url, "SELECT count(label) FROM replica.grown") == [(10,)]


def test_resync_after_a_dropped_slot_swaps_in_a_fresh_copy(env: StreamingEnv) -> None:
    _create_table(env.source_url, "kept", 3_000)
    pipeline = env.pipeline("resync", ["public.kept"])
    with streaming(StreamingSession(pipeline, offsets_dir=env.offsets_dir)):
        _assert_identical(env, "kept")
    wait_until(lambda: not fetch(env.cluster.dsn(), "SELECT 1 FROM pg_replication_slots WHERE "
                                 "slot_name = 'rosetta_resync' AND active"), 60)
    execute(env.source_url, "SELECT pg_drop_replication_slot('rosetta_resync')",
            "DELETE FROM public.kept WHERE id % 3 = 0", "UPDATE public.kept SET v = 9 WHERE id < 50",
            "INSERT INTO public.kept VALUES (5000, 1, 'while dropped')")
    reports: list[TableLoadReport] = []
    session = StreamingSession(pipeline, offsets_dir=env.offsets_dir, on_table_loaded=reports.append)
    with streaming(session):
        _assert_identical(env, "kept")
    assert [r.mode for r in reports] == ["swap"]
    assert count_rows(env.destination_url, "replica._rosetta_load_kept") == -1


def test_crash_during_the_initial_load_is_recovered_by_the_next_start(
    pg_cluster: LocalPostgresCluster, pg_root: Path, caplog: pytest.LogCaptureFixture, engine: str
) -> None:
    env = new_streaming_env(pg_cluster, pg_root, engine)
    workdir = pg_root / f"load-crash-{env.source_db}"
    workdir.mkdir()
    # Many small ranges copied one at a time: the load takes seconds, committing as it goes.
    streaming_settings = {"initial_load_workers": 1, "initial_load_range_rows": 1000}
    pipeline_file = env.write_pipeline_file(workdir / "rosetta.yaml", "crashload",
                                            ["public.big"], streaming_settings)
    _create_table(env.source_url, "big", 300_000)
    process_env = env.pipeline_env(pipeline_file, pg_cluster.dsn(f"cfg_{env.source_db}"))
    pg_cluster.create_database(f"cfg_{env.source_db}")
    stream = subprocess.Popen(
        [sys.executable, "-m", "rosetta_dagster.cli", "stream", "crashload"], cwd=workdir,
        env=process_env, stdout=(workdir / "stream.log").open("ab"), stderr=subprocess.STDOUT,
    )
    wait_until(lambda: count_rows(env.destination_url, "replica.big") > 20_000, 180, "load progress")
    stream.send_signal(signal.SIGKILL)
    stream.wait(10)
    copied = count_rows(env.destination_url, "replica.big")
    assert 0 < copied < 300_000, "the kill did not land during the load"
    pipeline = env.pipeline("crashload", ["public.big"])
    assert not env.positions(pipeline).exists()

    reports: list[TableLoadReport] = []
    session = StreamingSession(pipeline, offsets_dir=env.offsets_dir, on_table_loaded=reports.append)
    caplog.set_level(logging.INFO, logger="rosetta")
    try:
        with _Writer(env.source_url, "public.big", 300_001, 300_000), streaming(session):
            wait_until(lambda: reports, 120, "the repeated load")
        with streaming(StreamingSession(pipeline, offsets_dir=env.offsets_dir)):
            _assert_identical(env, "big")
    finally:
        wait_until(lambda: not fetch(pg_cluster.dsn(), "SELECT 1 FROM pg_replication_slots "
                                     "WHERE active AND database = %s", (env.source_db,)), 60)
        execute(pg_cluster.dsn(), "SELECT pg_drop_replication_slot(slot_name) FROM "
                "pg_replication_slots WHERE database = %s", params=(env.source_db,))
    assert [r.mode for r in reports] == ["swap"]  # the half-copied table was replaced whole
    assert any("exists without a recorded offset" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("engine", ["pgoutput"])  # above the capture (test_capture_contract)
def test_slot_creation_waiting_on_an_open_transaction_keeps_heartbeating(
    env: StreamingEnv, store: ConfigStore, caplog: pytest.LogCaptureFixture
) -> None:
    """CREATE_REPLICATION_SLOT waits for transactions open on the source; the run must stay
    alive for the supervisor meanwhile, and the load must see the transaction's rows after."""
    _create_table(env.source_url, "waits", 100)
    pipeline = env.pipeline("waits", ["public.waits"])
    store.sync_pipeline(pipeline)
    blocker = psycopg2.connect(env.source_url)
    with blocker.cursor() as cursor:  # open, with a transaction id, until committed below
        cursor.execute("INSERT INTO public.waits VALUES (101, 0, 'open transaction')")
    caplog.set_level(logging.INFO, logger="rosetta")
    session = StreamingSession(pipeline, offsets_dir=env.offsets_dir, config_store=store)
    try:
        with streaming(session):
            wait_until(lambda: any("waits for transactions open on source src" in r.getMessage()
                                   for r in caplog.records), 30, "the waiting notice")
            first_beat = store.get_pipeline("waits").heartbeat_at
            wait_until(lambda: store.get_pipeline("waits").heartbeat_at != first_beat, 15,
                       "a heartbeat while the slot waits")
            blocker.commit()
            _assert_identical(env, "waits")
    finally:
        blocker.close()
    assert count_rows(env.destination_url, "replica.waits") == 101


@pytest.mark.parametrize("engine", ["pgoutput"])  # the destination side only
def test_a_load_that_widens_a_table_gives_a_retyped_column_its_new_type(
    env: StreamingEnv
) -> None:
    """A load of a table the destination already holds (a re-sync, a table added back) first
    gives it the source's columns; a column whose type changed is converted in a transaction
    (a cast that fails is retried under a savepoint). The load's connection was in
    autocommit: 'SAVEPOINT can only be used in transaction blocks', and the stream restarted
    until the writer had converted it (found by the fuzzer: a slow example)."""
    execute(env.source_url, "CREATE TABLE public.lines (id int PRIMARY KEY, qty bigint)",
            "INSERT INTO public.lines VALUES (1, 9223372036854775807)")
    execute(env.destination_url, "CREATE SCHEMA replica",
            "CREATE TABLE replica.lines (id int PRIMARY KEY, qty integer)",
            "INSERT INTO replica.lines VALUES (1, 5)")
    pipeline = env.pipeline("widen", ["public.lines"])
    conn = psycopg2.connect(env.source_url)
    schema = read_table_schema(conn, TableRef("public", "lines"), "source src")
    conn.close()
    load = POSTGRES.open_table_load(pipeline, pipeline.destinations[0], schema, widen=True)
    assert load.mode == "swap"
    assert fetch(env.destination_url, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                 "WHERE attrelid = 'replica.lines'::regclass AND attname = 'qty'") == [("bigint",)]
