"""The apply path on its own, against real PostgreSQL: idempotent replay, collapse, order."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg2
import pytest
from psycopg2 import sql

from rosetta_dagster.core.capture.debezium.values import DEBEZIUM_VALUES
from rosetta_dagster.core.capture.pgoutput import PGOUTPUT_VALUES
from rosetta_dagster.core.destination.errors import ApplyError
from rosetta_dagster.core.destination.postgres.applier import PostgresApplier
from rosetta_dagster.core.destination.postgres.deliveries import DeliveryLog
from rosetta_dagster.core.events import ChangeEvent, Delivery
from rosetta_dagster.core.pipeline_config import TableRef
from rosetta_dagster.core.pool import PoolSettings, ResilientConnectionPool
from rosetta_dagster.core.position_tracking import PositionTracking
from rosetta_dagster.core.source_rows import SourceRows
from rosetta_dagster.core.table_schema import TableSchema, read_table_schema
from rosetta_dagster.harness import execute, fetch

TABLE = TableRef("public", "accounts")


@pytest.fixture
def applier(database_url: str) -> Iterator[PostgresApplier]:
    # Source and destination share a database here; the destination schema is "replica".
    execute(database_url, "CREATE TABLE public.accounts (id int PRIMARY KEY, owner text, balance int)")
    conn = psycopg2.connect(database_url)
    schema = read_table_schema(conn, TABLE, "test source")
    conn.close()
    pool = ResilientConnectionPool(database_url, PoolSettings(max_conn=2)).open()
    source_rows = SourceRows(lambda: psycopg2.connect(database_url))
    applier = PostgresApplier(pool, "replica", lambda _table: schema, values=DEBEZIUM_VALUES,
                              source_rows=source_rows)
    applier.prepare([schema])
    yield applier
    source_rows.close()
    pool.close()


def _event(op: str, id_: int, owner: str | None = None, balance: int | None = None) -> ChangeEvent:
    row = {"id": id_, "owner": owner, "balance": balance}
    if op == "d":
        return ChangeEvent(TABLE, "d", {"id": id_, "owner": None, "balance": None}, None)
    return ChangeEvent(TABLE, op, None, row)


def _rows(url: str) -> list[tuple[object, ...]]:
    return fetch(url, "SELECT id, owner, balance FROM replica.accounts ORDER BY id")


def test_replaying_applied_batches_changes_nothing(applier: PostgresApplier, database_url: str) -> None:
    first = [_event("c", 1, "ann", 10), _event("c", 2, "bob", 20), _event("c", 3, "cy", 30)]
    second = [_event("u", 1, "ann", 11), _event("d", 2), _event("c", 4, "dee", 40)]
    applier.apply(first)
    applier.apply(second)
    expected = [(1, "ann", 11), (3, "cy", 30), (4, "dee", 40)]
    assert _rows(database_url) == expected
    applier.apply(second)  # at-least-once: the last batch again
    assert _rows(database_url) == expected
    applier.apply(first)  # a replay from an older offset passes through older states ...
    # (inserts of keys that exist: the direct COPY is refused and the MERGE upserts them)
    assert _rows(database_url) == [(1, "ann", 10), (2, "bob", 20), (3, "cy", 30), (4, "dee", 40)]
    applier.apply(second)  # ... and ends on the latest one
    assert _rows(database_url) == expected


def test_last_event_per_key_wins_within_a_batch(applier: PostgresApplier, database_url: str) -> None:
    result = applier.apply([
        _event("c", 1, "a", 1), _event("u", 1, "b", 2), _event("d", 1), _event("c", 1, "c", 3),
        _event("c", 2, "x", 1), _event("d", 2),
    ])
    assert _rows(database_url) == [(1, "c", 3)]
    assert result.rows_written == 2  # collapsed: one staged row per key
    assert result.events_by_table == {TABLE: 6}


# The value Debezium sends for a column a change left out (an untouched TOASTed value).
LEFT_OUT = "__debezium_unavailable_value"


def test_values_left_out_come_from_the_batch_the_old_key_or_the_source(
    applier: PostgresApplier, database_url: str
) -> None:
    """public.accounts is the source here, replica.accounts the destination."""
    execute(database_url, "INSERT INTO public.accounts VALUES (1, 'ann', 10), (2, 'bob', 20), "
            "(30, 'cy', 30)")
    applier.apply([_event("c", 1, "ann", 10), _event("c", 2, "bob", 20)])
    # an insert then an update that leaves owner out, in one batch: the inserted value
    applier.apply([_event("c", 3, "dee", 3), _event("u", 3, LEFT_OUT, 4)])
    # a key update (2 -> 20) that leaves owner out: the row at the old key's value
    applier.apply([_event("d", 2), ChangeEvent(TABLE, "u", {"id": 2}, {"id": 20, "owner": LEFT_OUT,
                                                                     "balance": 21})])
    assert _rows(database_url) == [(1, "ann", 10), (3, "dee", 4), (20, "bob", 21)]
    # the half of a key update (? -> 30) whose delete came in the batch before: no destination
    # row holds its value, the source does
    applier.apply([_event("c", 30, LEFT_OUT, 31)])
    assert _rows(database_url)[-1] == (30, "cy", 31)


def test_a_row_gone_from_the_source_is_deleted_not_written_with_nulls(
    applier: PostgresApplier, database_url: str
) -> None:
    applier.apply([_event("c", 7, "gone", 7)])
    execute(database_url, "DELETE FROM replica.accounts WHERE id = 7")  # the destination lost it
    # an update leaving owner out; the source no longer has row 7 (its delete follows)
    applier.apply([_event("u", 7, LEFT_OUT, 8), _event("u", 8, LEFT_OUT, 9)])
    assert _rows(database_url) == []


def test_truncate_splits_a_batch_in_order(applier: PostgresApplier, database_url: str) -> None:
    applier.apply([
        _event("c", 1, "before", 1), ChangeEvent(TABLE, "t", None, None), _event("c", 2, "after", 2)
    ])
    assert _rows(database_url) == [(2, "after", 2)]


def test_a_failing_batch_rolls_back_entirely(applier: PostgresApplier, database_url: str) -> None:
    applier.apply([_event("c", 1, "kept", 1)])
    bad = [_event("c", 5, "new", 5), _event("u", 1, "changed", "not a number")]  # type: ignore[arg-type]
    with pytest.raises(ApplyError) as raised:
        applier.apply(bad)
    assert _rows(database_url) == [(1, "kept", 1)]
    # Named by source table, key and column; never by the internal staging table.
    assert str(raised.value) == (
        "Destination destination: a change of public.accounts with key (id=1) could not be "
        'applied at column balance: invalid input syntax for type integer: "not a number".')


def test_a_column_added_in_a_batch_that_rolled_back_is_added_again(database_url: str) -> None:
    """The ALTER TABLE went with the failed batch's transaction: the applier must not think
    the destination has the column (the retry would write into a column that is not there)."""
    execute(database_url, "CREATE TABLE public.accounts (id int PRIMARY KEY, owner text)")

    def source_schema(table: TableRef) -> TableSchema:
        conn = psycopg2.connect(database_url)
        try:
            return read_table_schema(conn, table, "test source")
        finally:
            conn.close()

    with ResilientConnectionPool(database_url, PoolSettings(max_conn=2)) as pool:
        applier = PostgresApplier(pool, "replica", source_schema, values=PGOUTPUT_VALUES)
        applier.prepare([source_schema(TABLE)])
        execute(database_url, "ALTER TABLE public.accounts ADD COLUMN balance int")
        widened = ChangeEvent(TABLE, "c", None, {"id": "1", "owner": "a", "balance": "5"})
        refused = ChangeEvent(TABLE, "c", None, {"id": "2", "owner": "b", "balance": "x"})
        assert applier.first_refused([], [widened]) is None  # rolled back on purpose
        with pytest.raises(ApplyError):
            applier.apply([widened, refused])  # rolled back by the refused change
        applier.apply([widened])
    assert fetch(database_url, "SELECT id, owner, balance FROM replica.accounts") == [(1, "a", 5)]


def test_the_first_refused_change_is_found_and_nothing_is_committed(
    applier: PostgresApplier, database_url: str
) -> None:
    applier.apply([_event("c", 1, "kept", 1)])
    bad = _event("u", 4, "bad", "x")  # type: ignore[arg-type]
    events = [_event("d", 1), *(_event("c", n, "new", n) for n in range(2, 9)), bad,
              _event("c", 9, "after", 9)]
    for before in ([], [_event("c", 10, "earlier", 10)]):
        found = applier.first_refused(before, events)
        assert found is not None and found[0] == 8 and "invalid input syntax" in str(found[1])
    assert applier.first_refused([], events[:8] + events[9:]) is None
    assert _rows(database_url) == [(1, "kept", 1)]


def test_a_row_escaped_whole_equals_the_row_escaped_field_by_field() -> None:
    from rosetta_dagster.core.events import UNCHANGED_TOAST
    from rosetta_dagster.core.values import COPY_NULL, ROW_NULL, copy_field, copy_row

    hostile = ["", "\\", "\\N", "a\tb", "line\nbreak\r\n", "\x01\x1f\x7f", "'\"", "🦀 é",
               "{\"k\": \"v\\\\\"}", "{{a,b},{c,d}}", "-Infinity", " ", None]
    rows = [hostile, list(reversed(hostile)), [None], ["only"], [None, None]]
    for row in rows:
        expected = "\t".join(COPY_NULL if v is None else copy_field(v) for v in row)
        assert copy_row([ROW_NULL if v is None else v for v in row]) == expected
    with pytest.raises(TypeError):  # the marker is not text: the field-by-field path takes it
        copy_row(["1", UNCHANGED_TOAST])  # type: ignore[list-item]


def _keyless_applier(database_url: str, pool: ResilientConnectionPool) -> PostgresApplier:
    """A destination keeping its position with the data, and a table without a key."""
    execute(database_url, "CREATE TABLE public.log (n int, v text)",
            "ALTER TABLE public.log REPLICA IDENTITY FULL", "CREATE SCHEMA replica",
            "CREATE TABLE replica.positions (pipeline text PRIMARY KEY, position pg_lsn, "
            "updated_at timestamptz)", "INSERT INTO replica.positions VALUES ('p', '0/0', now())")
    conn = psycopg2.connect(database_url)
    schema = read_table_schema(conn, LOG, "test source")
    conn.close()
    applier = PostgresApplier(pool, "replica", lambda _table: schema, values=PGOUTPUT_VALUES,
                              tracking=PositionTracking("p", sql.Identifier("replica",
                                                                            "positions")))
    applier.prepare([schema])
    return applier


LOG = TableRef("public", "log")


def _lose_the_next_commits_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The next COMMIT reaches the server, then the connection goes before its answer."""
    close_open = PostgresApplier._close_open

    def committed_then_lost(self: PostgresApplier, exc: BaseException | None) -> None:
        close_open(self, exc)
        monkeypatch.setattr(PostgresApplier, "_close_open", close_open)
        raise psycopg2.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(PostgresApplier, "_close_open", committed_then_lost)


def test_a_batch_whose_commit_was_lost_is_not_applied_twice(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection goes during COMMIT, after the server committed: the retried batch must
    find the position it recorded (a row without a key would be added twice)."""
    with ResilientConnectionPool(database_url, PoolSettings(max_conn=2)) as pool:
        applier = _keyless_applier(database_url, pool)
        insert = ChangeEvent(LOG, "c", None, {"n": "1", "v": "a"}, commit_lsn=100)
        _lose_the_next_commits_answer(monkeypatch)
        with pytest.raises(psycopg2.OperationalError):
            applier.apply([insert], position=150)
        applier.apply([insert], position=150)  # the retry
    assert fetch(database_url, "SELECT n, v FROM replica.log") == [(1, "a")]


def test_a_debezium_batch_whose_commit_was_lost_is_not_applied_twice(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same with an engine that delivers again (Debezium): no position, but the batch's
    last record recorded as delivered in its transaction tells that the batch landed."""
    execute(database_url, "CREATE TABLE public.log (n int, v text)",
            "ALTER TABLE public.log REPLICA IDENTITY FULL")
    conn = psycopg2.connect(database_url)
    schema = read_table_schema(conn, LOG, "test source")
    conn.close()
    with ResilientConnectionPool(database_url, PoolSettings(max_conn=2)) as pool:
        applier = PostgresApplier(pool, "replica", lambda _table: schema, values=DEBEZIUM_VALUES,
                                  deliveries=DeliveryLog("p", "replica"))
        applier.prepare([schema])
        assert applier.read_delivered() is None
        insert = ChangeEvent(LOG, "c", None, {"n": 1, "v": "a"})
        _lose_the_next_commits_answer(monkeypatch)
        with pytest.raises(psycopg2.OperationalError):
            applier.apply([insert], delivered=Delivery("7/100/100/90", 1))
        applier.apply([insert], delivered=Delivery("7/100/100/90", 1))  # the retry
        assert applier.read_delivered() == Delivery("7/100/100/90", 1)
        # A batch that did not land (its COMMIT failed before the server had it) is applied
        # on its retry: the recorded delivery is the previous batch's.
        later = ChangeEvent(LOG, "c", None, {"n": 2, "v": "b"})
        applier._position_unknown = True  # as after a COMMIT whose answer was lost
        applier.apply([later], delivered=Delivery("8/200/200/150", 1))
    assert fetch(database_url, "SELECT n, v FROM replica.log ORDER BY n") == [(1, "a"), (2, "b")]


def test_a_replay_behind_the_destinations_position_is_skipped_even_behind_a_schema_event(
    database_url: str
) -> None:
    """A destination ahead of the stream's restart point skips what it committed, also when
    the session put a schema event (no position) in front of the replayed batch: for a row
    without a key, applying it again would add a copy (found by the fuzzer)."""
    with ResilientConnectionPool(database_url, PoolSettings(max_conn=2)) as pool:
        applier = _keyless_applier(database_url, pool)
        insert = ChangeEvent(LOG, "c", None, {"n": "1", "v": "a"}, commit_lsn=100)
        applier.apply([insert], position=150)
        later = ChangeEvent(LOG, "c", None, {"n": "2", "v": "b"}, commit_lsn=200)
        applier.apply([ChangeEvent(LOG, "s", None, None), insert, later], position=250)
    assert fetch(database_url, "SELECT n, v FROM replica.log ORDER BY n") == [(1, "a"), (2, "b")]
    assert fetch(database_url, "SELECT position::text FROM replica.positions") == [("0/FA",)]
