"""The capture contract: the same scripted workload yields the same sequence of items from both
engines (row changes with their values as PostgreSQL text, key moves, truncates, column type
changes, backfill watermarks), in source commit order. What the session, the appliers and the
backfill protocol do with those items is therefore the same whichever engine runs, and tests of
that behaviour need one engine; tests of what an engine carries (types, faults of its own) keep
running on both.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import psycopg2
import pytest
from psycopg2 import sql

from rosetta_dagster.core.capture import CaptureBatch
from rosetta_dagster.core.capture.debezium import engine as debezium_engine
from rosetta_dagster.core.capture.debezium.engine import DebeziumCapture
from rosetta_dagster.core.capture.debezium.events import mark_key_changes
from rosetta_dagster.core.destination.postgres.applier import PostgresApplier
from rosetta_dagster.core.dsn import pinned_options
from rosetta_dagster.core.events import BACKFILL_MESSAGE_PREFIX, ChangeEvent, Watermark
from rosetta_dagster.core.local_postgres import LocalPostgresCluster
from rosetta_dagster.core.streaming import StreamingSession
from rosetta_dagster.harness import (
    StreamingEnv,
    drop_slots,
    execute,
    fetch,
    new_streaming_env,
    streaming,
)
from rosetta_dagster.harness import wait_until as wait

TABLE = """
CREATE TABLE public.contract (
    id int PRIMARY KEY, note text, amount numeric, blob bytea, doc jsonb,
    at timestamptz, big text)
"""


def _watermark(kind: str, **fields: object) -> sql.Composed:
    body = json.dumps({"job": 7, "chunk": 1, "kind": kind, "table": "public.contract", **fields})
    return sql.SQL("SELECT pg_logical_emit_message(true, {}, {})").format(
        sql.Literal(BACKFILL_MESSAGE_PREFIX), sql.Literal(body))


# Each phase is applied and waited for (the destination equals the source) before the next, so
# an engine's batching cannot reorder one phase's items with another's.
PHASES: tuple[tuple[str | sql.Composed, ...], ...] = (
    # big of row 1: 28 kB of digits, stored out of line (TOAST).
    ("""INSERT INTO public.contract VALUES
        (1, E'quote '' backslash \\\\ newline \\n emoji 🐘', 'NaN', '\\x00ff', '{"a": [1, null]}',
         '2024-02-29 23:59:59.999999+00',
         (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 900) g)),
        (2, NULL, '-0.000', NULL, 'null', NULL, NULL),
        (3, '', '1e-30', '\\x', '{}', '1970-01-01 00:00:00+00', 'small')""",),
    ("UPDATE public.contract SET note = 'n1' WHERE id = 1",  # big untouched: left out
     "UPDATE public.contract SET id = 11 WHERE id = 1",  # a key move, big untouched
     "BEGIN; UPDATE public.contract SET amount = 2 WHERE id = 2; "
     "UPDATE public.contract SET amount = 3, big = 'now small' WHERE id = 2; COMMIT",
     "DELETE FROM public.contract WHERE id = 3"),
    (_watermark("low"),
     "INSERT INTO public.contract (id, note) VALUES (4, 'inside the window')",
     _watermark("high", after_key=None, last_key=["11"], rows=3)),
    ("ALTER TABLE public.contract ALTER COLUMN amount TYPE numeric(12,3)",
     "UPDATE public.contract SET amount = 1.5 WHERE id = 2"),
    ("TRUNCATE public.contract",
     "INSERT INTO public.contract (id, note) VALUES (5, 'after the truncate')"),
)


class _Canonical:
    """A value's text as PostgreSQL stores it (an engine may hand over another input form of
    the same value, e.g. 'NAN' or an ISO 'T...Z' timestamp): cast on the source under the
    pinned settings, to the column's type without its modifier (rows from before the type
    change are compared as they were sent)."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg2.connect(url, options=pinned_options())
        with self.conn.cursor() as cursor:
            cursor.execute("SELECT attname, format_type(atttypid, NULL) FROM pg_attribute "
                           "WHERE attrelid = 'public.contract'::regclass AND attnum > 0")
            self.types = dict(cursor.fetchall())

    def row(self, values: dict[str, str | None] | None) -> dict[str, str | None] | None:
        if values is None:
            return None
        with self.conn.cursor() as cursor:
            for name, value in values.items():
                if value is not None:
                    cursor.execute(sql.SQL("SELECT %s::{}::text").format(
                        sql.SQL(self.types[name])), (value,))
                    values[name] = cursor.fetchone()[0]  # type: ignore[index]
        return values


def _normalized(items: Sequence[ChangeEvent | Watermark], applier: PostgresApplier,
                canonical: _Canonical) -> list[tuple[object, ...]]:
    """Items in an engine-neutral form: values as stored text, a key move as one item."""
    out: list[tuple[object, ...]] = []
    # Debezium's two halves of a key update may come in two engine batches, and the engine
    # pairs them within a batch: the recorded items span batches, so pair them here too.
    for item in mark_key_changes(list(items)):
        if isinstance(item, Watermark):
            out.append(("watermark", item.kind, item.job_id, item.chunk, item.table.qualified,
                        item.after_key, item.last_key, item.rows))
            continue
        if item.op in ("t", "s"):
            out.append((item.op, item.table.qualified))
            continue
        key = canonical.row(applier.key_text(item))
        if item.op == "d":
            out.append(("delete", key))
            continue
        text = applier.event_as_text(item)
        after = canonical.row(text["after"])
        before = canonical.row({k: v for k, v in (text["before"] or {}).items() if k in key})
        if before and before != key:
            if out and out[-1] == ("delete", before):
                out.pop()  # Debezium: the delete of the old key, then the create
            out.append(("move", before, key, after))
        else:
            out.append(("insert" if item.op == "c" else "update", key, after))
    return out


def _short(item: object) -> str:
    text = repr(item)
    return text if len(text) < 400 else text[:200] + " ... " + text[-150:]


def _difference(pgoutput: list[tuple[object, ...]], debezium: list[tuple[object, ...]]) -> str:
    lines = [f"{len(pgoutput)} items from pgoutput, {len(debezium)} from Debezium"]
    for index in range(max(len(pgoutput), len(debezium))):
        left = pgoutput[index] if index < len(pgoutput) else None
        right = debezium[index] if index < len(debezium) else None
        if left != right:
            lines += [f"item {index}:", f"  pgoutput {_short(left)}", f"  debezium {_short(right)}"]
    return "\n".join(lines)


def _recording(session: StreamingSession) -> list[ChangeEvent | Watermark]:
    """Every item the session's engine delivers from now on, in order (and applied)."""
    recorded: list[ChangeEvent | Watermark] = []
    apply_batch = session.batches.on_batch

    def record(batch: CaptureBatch) -> int | None:
        recorded.extend(batch.items)
        return apply_batch(batch)

    session.batches.on_batch = record  # type: ignore[method-assign]
    return recorded


def _run_workload(env: StreamingEnv) -> list[tuple[object, ...]]:
    execute(env.source_url, TABLE)
    session = StreamingSession(env.pipeline("contract", ["public.contract"]),
                               offsets_dir=env.offsets_dir)
    recorded = _recording(session)
    with streaming(session):
        # Streaming, past the load: the empty table converges before the slot exists, and
        # rows written then would reach the destination by the load's copy, not as items.
        wait(lambda: fetch(env.source_url, "SELECT active FROM pg_replication_slots WHERE "
                           "slot_name = %s", (session.pipeline.slot_name,)) == [(True,)],
             message="the stream to start")
        wait(lambda: env.converged("public.contract"), message="the initial load")
        for number, phase in enumerate(PHASES, 1):
            execute(env.source_url, *phase)
            wait(lambda: env.converged("public.contract"), message=f"phase {number}")
        canonical = _Canonical(env.source_url)
        try:
            return _normalized(recorded, session.destinations.writers[0], canonical)
        finally:
            canonical.conn.close()


def test_both_engines_deliver_the_same_items_for_the_same_workload(
    pg_cluster: LocalPostgresCluster, pg_root: Path
) -> None:
    sequences = {}
    for engine in ("pgoutput", "debezium"):
        env = new_streaming_env(pg_cluster, pg_root, engine)
        try:
            sequences[engine] = _run_workload(env)
        finally:
            drop_slots(env)
    pgoutput, debezium = sequences["pgoutput"], sequences["debezium"]
    assert pgoutput == debezium, _difference(pgoutput, debezium)
    kinds = [item[0] for item in pgoutput]
    assert kinds.count("watermark") == 2 and "move" in kinds and "s" in kinds and "t" in kinds


def test_debezium_reads_the_source_catalog_only_when_a_tables_schema_is_new(
        database_url: str) -> None:
    """Debezium does not announce type changes; its batches carry the identity of the value
    schema it built for each table (a new one after the relation message an ALTER TABLE
    causes). The catalog is read for the first batch and for a new identity only: a type
    change Debezium has not seen a relation message for yet stays for that batch."""
    from rosetta_dagster.core.capture.debezium.type_watch import TypeWatch
    from rosetta_dagster.core.pipeline_config import TableRef
    from rosetta_dagster.core.table_schema import read_table_schema

    table = TableRef("public", "watched")
    execute(database_url, "CREATE TABLE public.watched (id int PRIMARY KEY, n numeric(10,2))")
    change = ChangeEvent(table, "c", None, {"id": 1, "n": "1.50"})
    conn = psycopg2.connect(database_url)
    try:
        watch = TypeWatch({table: read_table_schema(conn, table, "the source")})

        def schema_events(tokens: dict[TableRef, list[int]]) -> list[str]:
            return [item.op for item in watch.with_schema_events(conn, [change], tokens)
                    if isinstance(item, ChangeEvent) and item.op == "s"]

        assert schema_events({table: [7]}) == []  # first batch: read, nothing changed
        execute(database_url, "ALTER TABLE public.watched ALTER COLUMN n TYPE numeric(12,4)")
        assert schema_events({table: [7]}) == []  # same schema identity: not read
        assert schema_events({table: [7, 8]}) == ["s"]  # a new one within the batch: read
        assert schema_events({table: [8]}) == []
        execute(database_url, "ALTER TABLE public.watched ALTER COLUMN n TYPE numeric(14,4)")
        assert schema_events({table: [9]}) == ["s"]
        execute(database_url, "ALTER TABLE public.watched ALTER COLUMN n TYPE numeric(16,4)")
        assert schema_events({}) == ["s"]  # a change without its table's identity: read
        # However steady the identities, the catalog is read again after recheck_s.
        watch = TypeWatch({table: read_table_schema(conn, table, "the source")}, recheck_s=0)
        assert schema_events({table: [9]}) == []
        execute(database_url, "ALTER TABLE public.watched ALTER COLUMN n TYPE numeric(18,4)")
        assert schema_events({table: [9]}) == ["s"]
    finally:
        conn.close()


@pytest.mark.parametrize("engine", ["debezium"])
def test_debezium_streams_without_per_event_summaries_or_linked_collectors(
        env: StreamingEnv) -> None:
    """Two costs measured in W1 are off while Debezium streams (docs/benchmarks.md): the
    metrics' text summary of every event (after the first batch no event reaches the
    metrics: their count and last event stay as they were) and JPype's link between Python's
    and Java's garbage collectors (its hook is not in ``gc.callbacks``)."""
    import _jpype
    import jpype

    execute(env.source_url, "CREATE TABLE public.quiet (id int PRIMARY KEY, v text)")
    session = StreamingSession(env.pipeline("quiet", ["public.quiet"]),
                               offsets_dir=env.offsets_dir)
    with streaming(session):
        wait(lambda: fetch(env.source_url, "SELECT active FROM pg_replication_slots WHERE "
                           "slot_name = %s", (session.pipeline.slot_name,)) == [(True,)],
             message="the stream to start")
        execute(env.source_url, "INSERT INTO public.quiet VALUES (0, 'first')")
        wait(lambda: env.converged("public.quiet") and fetch(
            env.destination_url, "SELECT count(*) FROM replica.quiet")[0][0] == 1,
             message="the first row to arrive")
        capture = session._capture  # noqa: SLF001 - the engine's own objects are the point
        assert isinstance(capture, DebeziumCapture), capture
        assert capture.event_summaries_off is not None
        field = jpype.JClass("io.debezium.pipeline.ChangeEventSourceCoordinator").class_ \
            .getDeclaredField("streamingMetrics")
        field.setAccessible(True)
        metrics = field.get(capture.event_summaries_off.coordinator())
        seen, last = int(metrics.getTotalNumberOfEventsSeen()), metrics.getLastEvent()
        execute(env.source_url, "INSERT INTO public.quiet SELECT g, 'v' || g "
                "FROM generate_series(1, 50) g")
        execute(env.source_url, "UPDATE public.quiet SET v = 'w' WHERE id <= 10")
        wait(lambda: env.converged("public.quiet") and fetch(
            env.destination_url, "SELECT count(*) FROM replica.quiet WHERE v = 'w'")[0][0] == 11,
             message="the changes to arrive")
        assert int(metrics.getTotalNumberOfEventsSeen()) == seen
        assert metrics.getLastEvent() == last
    assert _jpype._collect not in gc.callbacks


@pytest.mark.parametrize("engine", ["debezium"])
def test_debezium_prepares_the_next_batch_while_one_is_applied_and_a_stop_marks_both(
        env: StreamingEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine goes on (converting and preparing the next batch) while the apply thread
    applies one, which W1's capacity needed (docs/benchmarks.md); a stop that comes meanwhile
    waits for both, so the offsets stored at the stop include them: the next start does not
    deliver the first change again, whose offset the second batch marked (the second one may
    come again: its LSN group is complete only once a later record, such as a heartbeat,
    arrived; see .marking)."""
    # Every batch through the apply thread, these single rows too (a small batch is applied
    # on the engine's thread while the apply thread is idle: test_apply_thread).
    monkeypatch.setattr(debezium_engine, "SMALL_BATCH_RECORDS", 0)
    execute(env.source_url, "CREATE TABLE public.ahead (id int PRIMARY KEY, v text)")
    pipeline = env.pipeline("ahead", ["public.ahead"])
    session = StreamingSession(pipeline, offsets_dir=env.offsets_dir)
    applying, release = threading.Event(), threading.Event()
    apply_batch = session.batches.on_batch

    def held(batch: CaptureBatch) -> int | None:
        if any(isinstance(item, ChangeEvent) and (item.after or {}).get("v") == "held"
               for item in batch.items):
            applying.set()
            assert release.wait(60)
        return apply_batch(batch)

    session.batches.on_batch = held  # type: ignore[method-assign]
    try:
        with streaming(session):
            wait(lambda: fetch(env.source_url, "SELECT active FROM pg_replication_slots WHERE "
                               "slot_name = %s", (pipeline.slot_name,)) == [(True,)],
                 message="the stream to start")
            execute(env.source_url, "INSERT INTO public.ahead VALUES (1, 'held')")
            wait(applying.is_set, message="the first batch's apply")
            execute(env.source_url, "INSERT INTO public.ahead VALUES (2, 'next')")
            capture = session._capture  # noqa: SLF001 - the engine's own objects are the point
            assert isinstance(capture, DebeziumCapture), capture
            consumer = capture._consumer  # noqa: SLF001
            assert consumer is not None
            wait(lambda: consumer.applier.waiting == 1,
                 message="the next batch prepared while the first is applied")
            threading.Timer(1.0, release.set).start()  # while the stop waits
    finally:
        release.set()
    assert fetch(env.destination_url, "SELECT id, v FROM replica.ahead ORDER BY id") == [
        (1, "held"), (2, "next")]

    second = StreamingSession(pipeline, offsets_dir=env.offsets_dir)
    delivered = _recording(second)
    with streaming(second):
        execute(env.source_url, "INSERT INTO public.ahead VALUES (3, 'after the restart')")
        wait(lambda: env.converged("public.ahead") and fetch(
            env.destination_url, "SELECT count(*) FROM replica.ahead")[0][0] == 3,
             message="the row written after the restart")
    again = [(item.op, (item.after or {}).get("id")) for item in delivered
             if isinstance(item, ChangeEvent)]
    assert again in ([("c", 2), ("c", 3)], [("c", 3)]), again


def test_the_debezium_engine_starts_its_jvm_without_numpy() -> None:
    """JPype imports numpy when it can (15 MB of a stream's idle RSS, for arrays the engine
    never passes): in a process without numpy, starting the engine's JVM leaves it out, and
    numpy still imports afterwards for whoever needs it."""
    script = ("import sys\n"
              "from rosetta_dagster.core.capture.debezium.engine import DebeziumCapture\n"
              "from rosetta_dagster.core.capture.debezium.jvm import ensure_jvm\n"
              "ensure_jvm()\n"
              "import jpype\n"
              "assert str(jpype.JClass('java.lang.String')('up')) == 'up'\n"
              "assert 'numpy' not in sys.modules, 'numpy was imported'\n"
              "import numpy\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
