"""Tables without a primary key: keyed by their replica identity index, or (REPLICA IDENTITY
FULL) a multiset of rows changed one equal row at a time, as PostgreSQL's own subscriber
does; a table without any replica identity is refused before the source is touched, unless it
replicates its inserts only."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg2
import pytest
from psycopg2 import sql

from rosetta_dagster.core.backfill import BackfillError, BackfillRunner
from rosetta_dagster.core.capture.reread import UnreadableValue
from rosetta_dagster.core.config_store import ConfigStore, PipelineStatus
from rosetta_dagster.core.destination.postgres.reader import PostgresTableReader
from rosetta_dagster.core.events import ChangeEvent, Delivery
from rosetta_dagster.core.health.outcome import CheckOutcome
from rosetta_dagster.core.health.parity import content_parity, row_count_parity
from rosetta_dagster.core.pipeline_config import PipelineDefinition, TableOptions, TableRef
from rosetta_dagster.core.streaming import StreamingSession
from rosetta_dagster.core.streaming.prestream import read_schemas
from rosetta_dagster.core.streaming.redelivery import Redelivery
from rosetta_dagster.core.table_schema import SchemaError
from rosetta_dagster.harness import (
    BackgroundWriter,
    StreamingEnv,
    drop_slots,
    execute,
    fetch,
    streaming,
    wait_until,
)
from rosetta_dagster.harness.type_matrix import pinned_connection


def rows_multiset(url: str, schema: str, table: str) -> list[str]:
    """Every row as PostgreSQL's text of the whole row, sorted: equal lists are equal
    multisets (duplicates counted)."""
    conn = pinned_connection(url)
    try:
        with conn.cursor() as cursor:
            cursor.execute(f'SELECT ROW(t.*)::text FROM "{schema}"."{table}" AS t ORDER BY 1')  # noqa: S608
            return [row[0] for row in cursor.fetchall()]
    finally:
        conn.close()


def same_rows(env: StreamingEnv, table: str) -> bool:
    try:
        return rows_multiset(env.source_url, "public", table) == rows_multiset(
            env.destination_url, "replica", table)
    except Exception:  # noqa: BLE001 - not created yet
        return False


FULL_TABLE = """
CREATE TABLE public.events (n int, label text, doc json, at point, tags int[], big text);
ALTER TABLE public.events REPLICA IDENTITY FULL;
INSERT INTO public.events SELECT g % 3, 'dup', '{"a": 1}', '(1,2)', '{1,2}', NULL
    FROM generate_series(1, 6) g;
INSERT INTO public.events VALUES (NULL, NULL, NULL, NULL, NULL, NULL),
    (NULL, NULL, NULL, NULL, NULL, NULL), (7, E'quote '' back\\\\slash\\nline 🐘', '[ ]',
    '(NaN,Infinity)', '{{1,2},{3,4}}', 'x');
INSERT INTO public.events SELECT 100 + g, 'toast', NULL, NULL, NULL, repeat(md5(g::text), 400)
    FROM generate_series(1, 3) g;
"""

FULL_CHANGES = [
    # One of three equal rows changes, one of three equal rows goes: duplicates stay.
    "UPDATE public.events SET label = 'one' WHERE ctid = (SELECT min(ctid) FROM public.events "
    "WHERE n = 1)",
    "DELETE FROM public.events WHERE ctid = (SELECT min(ctid) FROM public.events WHERE n = 2)",
    # One of the two all-NULL rows, and a json / point column compared by its text.
    "UPDATE public.events SET n = 0 WHERE ctid = (SELECT min(ctid) FROM public.events "
    "WHERE n IS NULL)",
    "UPDATE public.events SET doc = '{\"a\":  2}' WHERE n = 7",
    "INSERT INTO public.events SELECT * FROM public.events WHERE n = 0",
    # A TOASTed value left untouched by the update.
    "UPDATE public.events SET n = n + 1000 WHERE label = 'toast' AND n < 103",
    "DELETE FROM public.events WHERE n = 1103",
    # Inserted and removed within one transaction.
    "BEGIN; INSERT INTO public.events (n, label) VALUES (9, 'tmp'); "
    "UPDATE public.events SET label = 'tmp2' WHERE n = 9; DELETE FROM public.events WHERE n = 9; "
    "COMMIT",
]


class _KeylessWriter(BackgroundWriter):
    """Inserts duplicates, updates and deletes single rows of public.events until stopped."""

    def __init__(self, url: str) -> None:
        self.url = url
        super().__init__()

    def write(self) -> None:
        conn = psycopg2.connect(self.url)
        conn.autocommit = True
        n = 0
        with conn.cursor() as cursor:
            while not self.stopping:
                n += 1
                cursor.execute("INSERT INTO public.events (n, label) VALUES (%s, 'w'), (%s, 'w')",
                               (n % 5, n % 5))
                cursor.execute("UPDATE public.events SET label = 'u' WHERE ctid = (SELECT "
                               "min(ctid) FROM public.events WHERE label = 'w')")
                cursor.execute("DELETE FROM public.events WHERE ctid = (SELECT max(ctid) FROM "
                               "public.events WHERE n = %s)", (n % 7,))
                time.sleep(0.002)
        conn.close()


@pytest.mark.parametrize("engine", ["pgoutput", "debezium"])
def test_a_full_table_is_a_multiset_changed_one_equal_row_at_a_time(
    env: StreamingEnv, store: ConfigStore
) -> None:
    """Duplicates, NULL in every column, json and point (no equality operator) and a TOASTed
    value left untouched: through the load, the stream, a backfill that re-copies the damaged
    table under a concurrent writer, and a re-sync after a dropped slot (kill -9: see the
    next test). Columns the engine only carries by re-reading them by key are refused in one
    sentence (Debezium: point and arrays too)."""
    execute(env.source_url, FULL_TABLE, "ALTER TABLE public.events ADD COLUMN doc_x xml")
    pipeline = env.pipeline("full", ["public.events"])
    refused = ["doc_x (xml)"] if env.engine == "pgoutput" else [
        "at (point)", "tags (integer[])", "doc_x (xml)"]
    with pytest.raises(SchemaError) as refusal:
        StreamingSession(pipeline, offsets_dir=env.offsets_dir).run()
    reason = (f"the {env.engine} engine does not carry its values exactly (they are re-read "
              "from the source by key), and the table has no key; give it one (a primary key "
              "or REPLICA IDENTITY USING INDEX) or leave the column out with exclude_columns")
    assert str(refusal.value) == (
        f"Pipeline full cannot replicate these columns exactly with the {env.engine} engine, "
        "so nothing was written: "
        + "; ".join(f"public.events.{column}: {reason}" for column in refused) + ".")
    assert fetch(env.source_url, "SELECT count(*) FROM pg_publication") == [(0,)]
    execute(env.source_url, *(f"ALTER TABLE public.events DROP COLUMN {column.split()[0]}"
                              for column in refused))
    store.sync_pipeline(pipeline)
    store.set_pipeline_status("full", PipelineStatus.START)
    session = StreamingSession(pipeline, offsets_dir=env.offsets_dir, config_store=store)
    with streaming(session):
        wait_until(lambda: same_rows(env, "events"), 60, "the initial load")
        for statement in FULL_CHANGES:
            execute(env.source_url, statement)
        wait_until(lambda: same_rows(env, "events"), 60, "the streamed changes")
        assert fetch(env.destination_url, "SELECT count(*) FROM replica.events WHERE label = "
                     "'dup'") == [(6,)]
        # Damaged behind the stream's back: a duplicate lost, a row the source never had.
        execute(env.destination_url, "DELETE FROM replica.events WHERE ctid = (SELECT "
                "min(ctid) FROM replica.events WHERE label = 'dup')",
                "INSERT INTO replica.events (n, label) VALUES (-1, 'ghost')")
        outcomes = {o.name: o for o in _parity(env, pipeline)}
        assert not outcomes["content_parity"].passed
        assert outcomes["content_parity"].description == (
            "Rows differ (a table without a key, compared as a multiset): 1 source row(s) "
            "missing and 1 extra row(s) at the destination in the first differing chunk of 14 "
            "rows. Repair: rosetta backfill request full public.events")
        filtered = store.create_backfill_job("full", "public.events", [
            {"column": "n", "operator": "=", "value": 1}])
        with pytest.raises(BackfillError, match="has no key, so a backfill re-copies the whole "
                           "table"):
            BackfillRunner(pipeline, store, filtered.id, chunk_timeout_s=60).run()
        job = store.create_backfill_job("full", "public.events", [])
        with _KeylessWriter(env.source_url):
            BackfillRunner(pipeline, store, job.id, chunk_timeout_s=60).run()
        wait_until(lambda: same_rows(env, "events"), 60, "the backfill and the writer's changes")
        assert all(o.passed for o in _parity(env, pipeline))
    # Re-sync: the slot is dropped while stopped and rows change meanwhile.
    drop_slots(env)
    execute(env.source_url, "DELETE FROM public.events WHERE n = 0",
            "INSERT INTO public.events (n, label) VALUES (5, 'dup'), (5, 'dup')")
    with streaming(StreamingSession(pipeline, offsets_dir=env.offsets_dir, config_store=store)):
        wait_until(lambda: same_rows(env, "events"), 60, "the re-sync")


@pytest.mark.parametrize("engine", ["pgoutput", "debezium"])
def test_a_full_table_stays_exact_across_a_kill_9_under_a_concurrent_writer(
    env: StreamingEnv, database_url: str, pg_root: Path
) -> None:
    """A replayed change would add or remove one row too many: the stream process is killed
    (-9) while a writer inserts duplicates, updates and deletes single rows, and restarted
    (Debezium delivers again what followed its stored offset: each destination skips what it
    recorded as taken)."""
    execute(env.source_url, FULL_TABLE)
    if env.engine == "debezium":  # refused in tables without a key (see the test above)
        execute(env.source_url, "ALTER TABLE public.events DROP COLUMN at, DROP COLUMN tags")
    workdir = pg_root / f"keyless-{env.source_db}"
    workdir.mkdir()
    # Debezium: its offset is stored once a minute, so the restart delivers again all that
    # streamed before the kill.
    path = env.write_pipeline_file(workdir / "rosetta.yaml", "crashy", ["public.events"],
                                   {"heartbeat_interval_ms": 1000,
                                    "offset_flush_interval_ms": 60_000})
    process_env = env.pipeline_env(path, database_url)

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "rosetta_dagster.cli", "stream", "crashy"],
                                cwd=workdir, env=process_env, stderr=subprocess.STDOUT,
                                stdout=(workdir / "stream.log").open("ab"))

    stream = start()
    try:
        wait_until(lambda: same_rows(env, "events"), 120, "the initial load")
        with _KeylessWriter(env.source_url):
            rows = len(rows_multiset(env.destination_url, "replica", "events"))
            wait_until(lambda: len(rows_multiset(env.destination_url, "replica", "events"))
                       > rows + 20, 60, "the writer's changes to stream")
            stream.kill()
            stream.wait(30)
            stream = start()
            wait_until(lambda: len(rows_multiset(env.destination_url, "replica", "events"))
                       > rows + 60, 60, "the restarted stream")
        wait_until(lambda: same_rows(env, "events"), 60, "the destination to equal the source")
        # A backfill request says what it will do (and takes no filter).

        def request(*extra: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "rosetta_dagster.cli", "backfill",
                                   "request", "crashy", "public.events", *extra], cwd=workdir,
                                  env=process_env, capture_output=True, text=True, timeout=120)

        filtered = request("--where", "n = 1")
        assert filtered.returncode != 0 and (
            "public.events has no key, so a backfill re-copies the whole table (one chunk, "
            "replaced at once); request it without a filter." in filtered.stderr), filtered
        whole = request()
        assert whole.returncode == 0 and whole.stdout.endswith(
            "(no key: the whole table is re-copied in one chunk and replaced at once)\n"), whole
    finally:
        stream.send_signal(signal.SIGTERM)
        stream.wait(60)
        drop_slots(env)


def _parity(env: StreamingEnv, pipeline: PipelineDefinition, table: str = "events"
            ) -> list[CheckOutcome]:
    schema = read_schemas(pipeline, psycopg2.connect(env.source_url))[TableRef("public", table)]
    with (psycopg2.connect(env.source_url) as source,
          psycopg2.connect(env.destination_url) as destination):
        source.autocommit = destination.autocommit = True
        target = sql.Identifier("replica", table)
        return [row_count_parity(PostgresTableReader(source), PostgresTableReader(destination),
                                 schema, target, 0),
                content_parity(PostgresTableReader(source), PostgresTableReader(destination),
                               schema, target, 1000, 0, pipeline="full")]


INDEX_TABLE = """
CREATE TABLE public.accounts (email text NOT NULL, region text NOT NULL, n int, big text);
CREATE UNIQUE INDEX accounts_identity ON public.accounts (email, region);
ALTER TABLE public.accounts REPLICA IDENTITY USING INDEX accounts_identity;
INSERT INTO public.accounts SELECT 'u' || g || '@x', 'eu', g, repeat(md5(g::text), 400)
    FROM generate_series(1, 20) g;
"""


def test_a_using_index_table_is_keyed_by_that_index_through_key_updates_and_toast(
    env: StreamingEnv
) -> None:
    """The replica identity index is the key: the destination gets the same unique index, and
    an UPDATE of the key that leaves a TOASTed value untouched keeps it."""
    execute(env.source_url, INDEX_TABLE)
    pipeline = env.pipeline("indexed", ["public.accounts"])
    with streaming(StreamingSession(pipeline, offsets_dir=env.offsets_dir)):
        wait_until(lambda: same_rows(env, "accounts"), 60, "the initial load")
        execute(env.source_url,
                "UPDATE public.accounts SET email = email || '.moved' WHERE n <= 5",
                "UPDATE public.accounts SET region = 'us', n = n + 100 WHERE n BETWEEN 6 AND 8",
                "UPDATE public.accounts SET n = -n WHERE n BETWEEN 9 AND 10",
                "DELETE FROM public.accounts WHERE n = 11",
                "INSERT INTO public.accounts VALUES ('u11@x', 'eu', 11, 'new')")
        wait_until(lambda: same_rows(env, "accounts"), 60, "the streamed changes")
    assert fetch(env.destination_url, "SELECT count(*) FROM replica.accounts WHERE big IS NULL"
                 ) == [(0,)]
    assert fetch(env.destination_url, "SELECT indexdef FROM pg_indexes WHERE schemaname = "
                 "'replica' AND tablename = 'accounts'") == [(
                     "CREATE UNIQUE INDEX accounts_email_region_key ON replica.accounts USING "
                     "btree (email, region)",)]


def test_a_table_without_replica_identity_is_refused_untouched_unless_it_replicates_inserts_only(
    env: StreamingEnv
) -> None:
    """Publishing a table without a replica identity would make the source application's
    UPDATEs and DELETEs fail: refused before the publication is touched; with ``replicate:
    inserts_only`` its inserts are published alone and the source keeps working."""
    execute(env.source_url, "CREATE TABLE public.audit (at int, what text)",
            "CREATE TABLE public.ok (id int PRIMARY KEY, v text)",
            "INSERT INTO public.audit VALUES (1, 'a'), (1, 'a'), (2, 'b')",
            "INSERT INTO public.ok VALUES (1, 'x')")
    pipeline = env.pipeline("audit", ["public.ok", "public.audit"])
    with pytest.raises(SchemaError) as refused:
        StreamingSession(pipeline, offsets_dir=env.offsets_dir).run()
    assert str(refused.value) == (
        "Table public.audit in source src has no replica identity (no primary key, no REPLICA "
        "IDENTITY FULL or USING INDEX), so publishing it would make every UPDATE and DELETE of "
        "it fail on the source; give it one (ALTER TABLE public.audit REPLICA IDENTITY FULL, "
        "or a unique index on NOT NULL columns and ALTER TABLE public.audit REPLICA IDENTITY "
        "USING INDEX <index>) or set replicate: inserts_only on the table to replicate its "
        "inserts only, so nothing was written.")
    assert fetch(env.source_url, "SELECT count(*) FROM pg_publication") == [(0,)]
    assert fetch(env.source_url, "SELECT count(*) FROM pg_replication_slots WHERE database = "
                 "current_database()") == [(0,)]
    execute(env.source_url, "UPDATE public.audit SET what = 'c' WHERE at = 2",
            "DELETE FROM public.audit WHERE at = 2")

    inserts_only = dataclasses.replace(pipeline, table_options=(
        (TableRef("public", "audit"), TableOptions(inserts_only=True)),))
    try:
        with streaming(StreamingSession(inserts_only, offsets_dir=env.offsets_dir)):
            wait_until(lambda: same_rows(env, "audit"), 60, "the initial load")
            execute(env.source_url, "INSERT INTO public.audit VALUES (3, 'c'), (3, 'c')",
                    "UPDATE public.audit SET what = 'changed' WHERE at = 1",
                    "DELETE FROM public.audit WHERE at = 3",
                    "INSERT INTO public.audit VALUES (4, 'd')",
                    "UPDATE public.ok SET v = 'y'")
            wait_until(lambda: env.converged("public.ok"), 60, "the keyed table's update")
            # Inserts only: the update and the delete stay on the source.
            wait_until(lambda: rows_multiset(env.destination_url, "replica", "audit") == [
                "(1,a)", "(1,a)", "(3,c)", "(3,c)", "(4,d)"], 60, "the inserts")
            for outcome in _parity(env, inserts_only, "audit"):
                assert outcome.passed and outcome.description.startswith(
                    "Not compared: public.audit replicates its inserts only"), outcome
    finally:
        drop_slots(env)


def test_a_destination_skips_the_redelivered_changes_of_keyless_tables_it_recorded() -> None:
    """Pure: what a restarted Debezium engine delivers again (see core.streaming.redelivery).
    The destination recorded record B, ordinal 2 (a COPY page's second row) as taken."""
    keyless, keyed = TableRef("public", "events"), TableRef("public", "ok")

    def change(table: TableRef, record: str, ordinal: int) -> ChangeEvent:
        return ChangeEvent(table, "c", None, {"n": 1}, delivery=Delivery(record, ordinal))

    a1, b1, b2, b3 = (change(keyless, "A", 1), change(keyless, "B", 1),
                      change(keyless, "B", 2), change(keyless, "B", 3))
    k = change(keyed, "K", 1)
    redelivery = Redelivery(Delivery("B", 2), "Z", lambda table: table == keyless)
    # A batch before the recorded record: its keyless changes are all taken.
    redelivery.begin_batch([a1.delivery, k.delivery])  # type: ignore[list-item]
    assert redelivery.untaken([a1, k]) == [k]  # a keyed change is applied again, harmlessly
    # The batch with it: what follows it is new.
    redelivery.begin_batch([b1.delivery, b2.delivery, Delivery("M", 1), b3.delivery])  # type: ignore[list-item]
    assert redelivery.untaken([b1, b2]) == [] and redelivery.untaken([b3]) == [b3]
    redelivery.begin_batch([a1.delivery])  # type: ignore[list-item]
    assert redelivery.untaken([a1]) == [a1] and redelivery.awaiting is None
    # The stored offset names the recorded record: nothing is delivered again.
    assert Redelivery(Delivery("B", 3), "B", lambda table: True).awaiting is None
    assert Redelivery(None, "B", lambda table: True).awaiting is None


@pytest.mark.parametrize("engine", ["debezium"])
def test_a_value_debezium_does_not_carry_in_a_keyless_table_stops_the_stream_naming_it(
    env: StreamingEnv
) -> None:
    """Debezium carries dates and timestamps in the ordinary range (years 1-9999) only; others
    are re-read from the source by key, which a table without a key lacks: ordinary values
    stream, and the first other one stops the stream with one sentence naming the change."""
    execute(env.source_url, "CREATE TABLE public.visits (at timestamptz, day date, note text)",
            "ALTER TABLE public.visits REPLICA IDENTITY FULL",
            "INSERT INTO public.visits VALUES ('2024-02-29 23:59:59.999999+00', '0001-01-01', "
            "'loaded'), (NULL, NULL, NULL)")
    pipeline = env.pipeline("visits", ["public.visits"])
    session = StreamingSession(pipeline, offsets_dir=env.offsets_dir)
    with pytest.raises(UnreadableValue) as stopped, streaming(session):
        wait_until(lambda: same_rows(env, "visits"), 60, "the initial load")
        execute(env.source_url, "INSERT INTO public.visits VALUES ('1970-01-01 00:00:00+00', "
                "'9999-12-31', 'streamed')")
        wait_until(lambda: same_rows(env, "visits"), 60, "the streamed row")
        execute(env.source_url, "INSERT INTO public.visits VALUES ('2000-01-01', "
                "'0044-03-15 BC', 'caesar')")
        wait_until(lambda: not session.destinations.opened, 60, "the stream to stop")
    assert str(stopped.value).startswith(
        "A change of public.visits at LSN ") and str(stopped.value).endswith(
        " has a value in column day (date) outside the range the Debezium engine carries "
        "exactly (a year before 1 or after 9999, or ±infinity), and the table has no key to "
        "read it back from the source by; give the table a key (a primary key or REPLICA "
        "IDENTITY USING INDEX) or use streaming.engine: pgoutput.")
    assert sorted(rows_multiset(env.destination_url, "replica", "visits")) == [
        '("1970-01-01 00:00:00+00",9999-12-31,streamed)',
        '("2024-02-29 23:59:59.999999+00",0001-01-01,loaded)', "(,,)"]


@pytest.mark.parametrize("engine", ["debezium"])
def test_a_keyless_table_taken_out_and_added_back_streams_its_changes(env: StreamingEnv) -> None:
    """While no table without a key is streamed, nothing records deliveries: what a
    destination recorded before is forgotten, so the table added back later does not wait for a
    record the engine will never deliver again."""
    execute(env.source_url, "CREATE TABLE public.ok (id int PRIMARY KEY, v text)",
            "CREATE TABLE public.events (n int, label text)",
            "ALTER TABLE public.events REPLICA IDENTITY FULL",
            "INSERT INTO public.events VALUES (1, 'a'), (1, 'a')")
    both = env.pipeline("again", ["public.ok", "public.events"])
    with streaming(StreamingSession(both, offsets_dir=env.offsets_dir)):
        wait_until(lambda: fetch(env.source_url, "SELECT active FROM pg_replication_slots WHERE "
                                 "slot_name = %s", (both.slot_name,)) == [(True,)],
                   message="the stream to start")
        execute(env.source_url, "INSERT INTO public.events VALUES (2, 'b')")
        wait_until(lambda: same_rows(env, "events"), 60, "the first stream")
    assert fetch(env.destination_url, "SELECT count(*) FROM replica._rosetta_deliveries") == [(1,)]
    keyed_only = env.pipeline("again", ["public.ok"])
    with streaming(StreamingSession(keyed_only, offsets_dir=env.offsets_dir)):
        execute(env.source_url, "INSERT INTO public.ok VALUES (1, 'x')")
        wait_until(lambda: env.converged("public.ok"), 60, "the keyed table")
    assert fetch(env.destination_url, "SELECT count(*) FROM replica._rosetta_deliveries") == [(0,)]
    execute(env.source_url, "DELETE FROM public.events WHERE n = 2")
    with streaming(StreamingSession(both, offsets_dir=env.offsets_dir)):
        wait_until(lambda: same_rows(env, "events"), 60, "the table added back")
        execute(env.source_url, "INSERT INTO public.events VALUES (3, 'c'), (3, 'c')",
                "DELETE FROM public.events WHERE ctid = (SELECT min(ctid) FROM public.events "
                "WHERE n = 1)")
        wait_until(lambda: same_rows(env, "events"), 60, "the changes after it")
