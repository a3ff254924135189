"""Set-wise application of change-event batches to a PostgreSQL destination.

One destination transaction per batch: the net change per key (``net_changes``) is COPYed into
a temporary staging table, then a single ``MERGE`` inserts, updates and deletes (statements:
the pure ``statements``; this module executes them). Replaying such a batch changes nothing:
every statement sets rows to their final values. A table without a key is applied by net count
per row (``keyless``), which is not idempotent: it needs an engine that keeps positions with
the data, and what a destination has committed is skipped when the stream resumes behind it.

Order: source commit order, batch after batch; within a batch the last change per key wins.
After a crash the stream replays from the last committed position, so the destination passes
through the same states again and ends on the latest (no per-row version column: destination
tables stay exact copies). Values a change leaves out (unchanged TOAST) are never written as
NULL: they come from the row at the key, at a moved row's old key, or from the source.
PostgreSQL 15+ (MERGE).

A re-snapshot through the engine (Debezium's own) records every key it writes in a key table
beside the destination table, in the batch's transaction; when it ends, rows whose key it did
not write are deleted (:meth:`PostgresApplier.finish_resync`). Backfill chunks: ``staging``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg2.extensions
from psycopg2 import sql

from rosetta_dagster.core.destination import (
    BatchResult,
    ChunkCounts,
    KeyBounds,
    RetypedColumn,
    SchemaSource,
    change_as_text,
)
from rosetta_dagster.core.destination.errors import classify
from rosetta_dagster.core.destination.keyless_changes import KeylessChanges
from rosetta_dagster.core.destination.net_changes import NetChanges
from rosetta_dagster.core.destination.postgres.ddl import ensure_destination_table
from rosetta_dagster.core.destination.postgres.deliveries import DeliveryLog
from rosetta_dagster.core.destination.postgres.keyed import apply_keyed
from rosetta_dagster.core.destination.postgres.keyless import apply_keyless
from rosetta_dagster.core.destination.postgres.plan import (
    TablePlan,
    key_text,
    keys_table_name,
    note_run,
)
from rosetta_dagster.core.destination.postgres.resync import (
    begin_resync,
    finish_resync,
    resync_pending,
)
from rosetta_dagster.core.destination.postgres.staging import merge_chunk, replace_table
from rosetta_dagster.core.destination.postgres.statements import (
    batch_statements,
    keyless_statements,
    resync_statements,
)
from rosetta_dagster.core.events import ChangeEvent, Delivery
from rosetta_dagster.core.pipeline_config import TableRef
from rosetta_dagster.core.pool import ResilientConnectionPool
from rosetta_dagster.core.position_tracking import PositionTracking
from rosetta_dagster.core.source_rows import SourceRows
from rosetta_dagster.core.table_schema import TableSchema
from rosetta_dagster.core.values import ValueCodec

logger = logging.getLogger("rosetta.apply")

# A table's changes in one flush: net change per key, or net count per row (no key).
PendingChanges = NetChanges | KeylessChanges


@dataclass(frozen=True)
class _SchemaState:
    """The applier's picture of its tables before a transaction changed them."""

    plans: dict[TableRef, TablePlan]
    created: set[TableRef]
    retyped: dict[TableRef, tuple[RetypedColumn, ...]]


class _Probed(Exception):  # noqa: N818 - not an error: how a probe's transaction ends
    """Rolls back a probe's transaction."""


_PROBED = _Probed()


def _first_commit(events: Sequence[ChangeEvent]) -> int:
    """The commit position of the batch's first transaction (events are in commit order; a
    schema event the session adds in front has none)."""
    return next((e.commit_lsn for e in events if e.commit_lsn is not None), 1 << 64)


class PostgresApplier:
    """Applies batches to one destination database, creating and widening tables as needed."""

    def __init__(
        self,
        pool: ResilientConnectionPool,
        target_schema: str,
        schema_source: SchemaSource,
        *,
        values: ValueCodec,
        name: str = "destination",
        tracking: PositionTracking | None = None,
        source_rows: SourceRows | None = None,
        deliveries: DeliveryLog | None = None,
    ) -> None:
        self.pool = pool
        # Engines that deliver again after a restart: the last record taken, recorded with
        # each batch (see core.streaming.redelivery).
        self.deliveries = deliveries
        # Reads back values a change left out that no destination row holds.
        self.source_rows = source_rows
        self.target_schema = target_schema
        self.schema_source = schema_source
        self.values = values
        self.name = name
        self.tracking = tracking
        # With tracking: the position this destination has committed (changes of transactions
        # that committed before it are already here and are skipped).
        self.position: int | None = None
        self._plans: dict[TableRef, TablePlan] = {}
        # A transaction left open by a batch piece (complete=False) until its last piece.
        self._open: AbstractContextManager[psycopg2.extensions.connection] | None = None
        self._open_conn: psycopg2.extensions.connection | None = None
        self._spans_pieces = False  # the open transaction is one source transaction in pieces
        self._position_unknown = False  # a COMMIT failed: did the batch land? (tracking)
        # Tables whose destination table prepare() created (first start, added, new target).
        self.created: set[TableRef] = set()
        # Tables with columns given the source's new type (ALTER COLUMN TYPE); the caller
        # takes them (their other rows were converted on the source without a change event).
        self.retyped: dict[TableRef, tuple[RetypedColumn, ...]] = {}
        # What the open transaction's table refreshes replaced: restored if it rolls back (its
        # DDL is gone with it, so the next batch widens the table again).
        self._undo: _SchemaState | None = None

    # -- schema ----------------------------------------------------------------------------

    def prepare(self, schemas: Iterable[TableSchema]) -> None:
        """Create or widen every destination table before any event is applied."""
        with self.pool.connection() as conn:
            for schema in schemas:
                self._ensure_table(conn, schema)
                self._plans[schema.table] = self._plan(schema)

    # -- changes as text (reports, parked changes) ------------------------------------------

    def plan(self, table: TableRef) -> TablePlan:
        """How ``table`` is staged and merged here (after :meth:`prepare`)."""
        return self._plans[table]

    def has_key(self, table: TableRef) -> bool:
        """Whether ``table``'s rows have a key here (applying a change again is harmless)."""
        plan = self._plans.get(table)
        return plan is None or not plan.schema.keyless

    def key_text(self, event: ChangeEvent) -> dict[str, str | None]:
        """The event's key in PostgreSQL's text form, by column (no key: every column)."""
        return key_text(self._plans.get(event.table), event)

    def event_as_text(self, event: ChangeEvent) -> dict[str, Any]:
        """The change with every value in its text form, as JSON for the config store."""
        return change_as_text(self._plans[event.table].converter_of, event,
                              self.values.is_unchanged)

    def _ensure_table(self, conn: psycopg2.extensions.connection, schema: TableSchema) -> None:
        done = ensure_destination_table(conn, schema, self.target_schema, self.name)
        if done.created:
            self.created.add(schema.table)
        if done.retyped:
            self.retyped[schema.table] = self.retyped.get(schema.table, ()) + done.retyped
            logger.info("Destination %s: %s changed type on the source: %s", self.name,
                        schema.table.qualified, ", ".join(
                            f"{c.name} {c.old_type} -> {c.new_type}" for c in done.retyped))

    def _refresh(self, conn: psycopg2.extensions.connection, table: TableRef) -> TablePlan:
        if self._undo is None:
            self._undo = _SchemaState(dict(self._plans), set(self.created), dict(self.retyped))
        schema = self.schema_source(table)
        self._ensure_table(conn, schema)
        plan = self._plan(schema)
        self._plans[table] = plan
        logger.info("Destination %s: %s now has columns %s", self.name, table.qualified,
                    ", ".join(schema.column_names))
        return plan

    def _plan(self, schema: TableSchema) -> TablePlan:
        table = schema.table
        target = schema.target_sql(self.name, self.target_schema)
        # A new staging name per column set: a widened table gets a fresh staging table.
        shape = tuple((c.name, c.type_sql) for c in schema.columns)
        stage_name = f"_rosetta_stage_{abs(hash((table, shape))) % 10**12}"
        keys_table = sql.Identifier(self.target_schema, keys_table_name(table))
        return TablePlan(
            schema, target, stage_name,
            [(c.name, self.values.converter_for(c)) for c in schema.columns],
            batch_statements(schema, target, self.target_schema, stage_name),
            resync_statements(schema, target, self.target_schema, keys_table, stage_name),
            keyless_statements(schema, target, self.target_schema, stage_name)
            if schema.keyless else None,
        )

    def _keyed_plans(self) -> list[TablePlan]:
        """Plans of tables with a key: only their re-snapshots record keys (a keyless table
        is re-copied whole, see ``initial_load``)."""
        return [plan for plan in self._plans.values() if not plan.schema.keyless]

    # -- re-snapshot reconciliation ---------------------------------------------------------

    def begin_resync(self) -> None:
        """Start recording snapshot keys (empty key tables for every prepared table)."""
        begin_resync(self.pool, self._keyed_plans())

    def resync_pending(self) -> bool:
        """True when a re-snapshot began but its reconciliation has not run (e.g. a crash)."""
        return resync_pending(self.pool, self._keyed_plans())

    def finish_resync(self) -> dict[TableRef, int]:
        """Delete rows the snapshot did not contain; drop the key tables. One transaction."""
        return finish_resync(self.pool, self._keyed_plans(), self.name)

    # -- backfill chunks -------------------------------------------------------------------

    def merge_chunk(self, table: TableRef, job_id: int, chunk: int, *,
                    excluded: set[tuple[Any, ...]], skip_all: bool, bounds: KeyBounds | None,
                    row_filter: tuple[sql.Composable, list[Any]]) -> ChunkCounts | None:
        plan = self._plans[table]
        with self.pool.connection() as conn:
            return merge_chunk(conn, plan, self.target_schema, job_id, chunk,
                               excluded=excluded, skip_all=skip_all, bounds=bounds,
                               row_filter=row_filter)

    def replace_rows(self, table: TableRef, job_id: int, chunk: int, *,
                     later: Sequence[ChangeEvent]) -> ChunkCounts | None:
        plan = self._plans[table]
        changes = KeylessChanges(plan.row_line, self.values.is_unchanged, table.qualified)
        for event in later:
            changes.add(event)
        with self.pool.connection() as conn:
            return replace_table(conn, plan, self.target_schema, job_id, chunk, later=changes,
                                 destination=self.name)

    # -- connections -----------------------------------------------------------------------

    @property
    def pools(self) -> Sequence[ResilientConnectionPool]:
        return (self.pool,)

    def close(self) -> None:
        self.abort()  # a transaction left open inside a large source transaction
        self.pool.close()

    # -- apply -----------------------------------------------------------------------------

    def read_position(self) -> int | None:
        """Load this destination's committed position (tracking engines only)."""
        if self.tracking is not None:
            with self.pool.connection() as conn, conn.cursor() as cursor:
                self.position = self.tracking.read(cursor)
        return self.position

    def read_delivered(self) -> Delivery | None:
        """The last record this destination took from an engine that delivers again."""
        if self.deliveries is None:
            return None
        with self.pool.connection() as conn, conn.cursor() as cursor:
            return self.deliveries.read(cursor)

    def forget_delivered(self) -> None:
        if self.deliveries is not None:
            with self.pool.connection() as conn, conn.cursor() as cursor:
                self.deliveries.forget(cursor)

    @contextmanager
    def _transaction(self, complete: bool, *, probe: bool = False
                     ) -> Iterator[psycopg2.extensions.connection]:
        """The batch's destination transaction; kept open across pieces until ``complete``.
        ``probe``: rolled back at the end instead of committed."""
        if self._open is None:
            context = self.pool.connection()
            self._open_conn = context.__enter__()  # may raise: then nothing is open
            self._open = context
            self._spans_pieces = not complete
        assert self._open_conn is not None
        try:
            yield self._open_conn
        except BaseException as exc:
            self._close_open(exc)
            raise
        if probe:
            self._close_open(_PROBED)
        elif complete:
            try:
                self._close_open(None)
            except BaseException:
                # Lost during COMMIT, the batch may be in: its position is read again first.
                self._position_unknown = True
                raise

    def _close_open(self, exc: BaseException | None) -> None:
        """Commit (no ``exc``) or roll back the open transaction and return its connection."""
        context, self._open, self._open_conn = self._open, None, None
        undo, self._undo = self._undo, None
        committed = False
        try:
            if context is not None:
                context.__exit__(type(exc) if exc else None, exc,
                                 exc.__traceback__ if exc else None)
            committed = exc is None
        finally:
            if not committed and undo is not None:  # rolled back, or the COMMIT failed
                self._plans, self.created, self.retyped = undo.plans, undo.created, undo.retyped

    @property
    def in_transaction(self) -> bool:
        """True while earlier pieces of one source transaction wait in an open transaction."""
        return self._open is not None

    def abort(self) -> None:
        """Roll back a transaction left open by a batch piece (the stream stopped inside it)."""
        if self._open is not None:
            self._close_open(RuntimeError("stream stopped inside a transaction"))

    def apply(
        self,
        events: Sequence[ChangeEvent],
        *,
        record_keys: bool = False,
        position: int | None = None,
        complete: bool = True,
        delivered: Delivery | None = None,
    ) -> BatchResult:
        """Apply a batch in one transaction; raises (and rolls back) on any error.

        ``record_keys``: the batch belongs to a re-snapshot (see :meth:`begin_resync`).
        ``position``: recorded in the same transaction (with tracking). ``complete=False``:
        a piece of a larger source transaction; the transaction stays open for the next piece.
        ``delivered``: the batch's last record, recorded in the same transaction.
        """
        result = BatchResult()
        if self._position_unknown and delivered is not None and (
                self.read_delivered() == delivered):
            self._position_unknown = False
            return result  # the retried batch did land (only its COMMIT's answer was lost)
        if self._position_unknown and self.tracking is not None:
            self.read_position()  # a retried batch that did land is then skipped
        self._position_unknown = False
        applied = self.position
        events = self._unapplied(events)
        if not events and position is None and delivered is None:
            return result
        with self._transaction(complete) as conn:
            self._apply_events(conn, events, record_keys, result)
            if position is not None and self.tracking is not None and (
                    applied is None or position > applied):
                with conn.cursor() as cursor:
                    self.tracking.record(cursor, position)
            if delivered is not None and self.deliveries is not None:
                with conn.cursor() as cursor:
                    self.deliveries.record(cursor, delivered)
        if position is not None and self.tracking is not None and complete and (
                applied is None or position > applied):
            self.position = position
        return result

    def _unapplied(self, events: Sequence[ChangeEvent]) -> Sequence[ChangeEvent]:
        """Resumed behind this destination: what it has already committed is left out (a row
        without a key would be applied twice)."""
        applied = self.position
        if applied is None or not events or _first_commit(events) >= applied:
            return events
        return [e for e in events if e.commit_lsn is None or e.commit_lsn >= applied]

    def first_refused(self, applied: Sequence[ChangeEvent], events: Sequence[ChangeEvent]
                      ) -> tuple[int, Exception] | None:
        """The first of ``events`` the destination refuses after ``applied``, and its error;
        None when it takes them all. One transaction, rolled back: halves are tried under a
        savepoint (a refused half rolled back, a taken one kept) until one change is left."""
        with self._transaction(True, probe=True) as conn:
            self._apply_events(conn, self._unapplied(applied), False, BatchResult())
            start, end = 0, len(events)
            refused: tuple[int, Exception] | None = None  # the last refused part: its start, error
            while end > start:
                middle = (start + end + 1) // 2 if end - start > 1 else end
                error = self._attempt(conn, events[start:middle])
                if error is None:
                    start = middle
                    continue
                if middle - start == 1:
                    refused = (start, error)
                    break
                end = middle
        return refused

    def _attempt(self, conn: psycopg2.extensions.connection, events: Sequence[ChangeEvent]
                 ) -> Exception | None:
        """Apply ``events`` under a savepoint; a data error rolls them back and is returned."""
        before = _SchemaState(dict(self._plans), set(self.created), dict(self.retyped))
        with conn.cursor() as cursor:
            cursor.execute("SAVEPOINT _rosetta_probe")
            try:
                self._apply_events(conn, self._unapplied(events), False, BatchResult())
            except Exception as exc:
                if classify(exc) != "data":
                    raise
                cursor.execute("ROLLBACK TO SAVEPOINT _rosetta_probe")
                self._plans, self.created, self.retyped = before.plans, before.created, before.retyped
                return exc
            cursor.execute("RELEASE SAVEPOINT _rosetta_probe")
        return None

    def _apply_events(self, conn: psycopg2.extensions.connection, events: Sequence[ChangeEvent],
                      record_keys: bool, result: BatchResult) -> None:
        """Apply ``events`` inside the open transaction, counting into ``result``."""
        counts = result.events_by_table
        last_ts = result.last_source_ts_ms
        if record_keys and events and events[0].snapshot == "first":
            # Debezium (re)started the snapshot: keys of an interrupted attempt are void.
            with conn.cursor() as cursor:
                for keyed in self._keyed_plans():
                    cursor.execute(keyed.resync.create_keys)
                    cursor.execute(keyed.resync.truncate_keys)
        pending: dict[TableRef, PendingChanges] = {}
        # The table of the previous event, with its plan and pending changes: consecutive
        # events of one table (the common case) look nothing up again.
        table: TableRef | None = None
        plan: TablePlan | None = None
        per_table: PendingChanges | None = None
        # Events of ``table`` since it was looked up, and the newest source time among them.
        run, run_ts = 0, None
        for event in events:
            if event.table is not table or plan is None:  # identity: no hashing
                if run:
                    note_run(counts, last_ts, table, run, run_ts)  # type: ignore[arg-type]
                    run, run_ts = 0, None
                table = event.table
                plan = self._plans.get(table)
                per_table = self._pending_of(pending, table, plan)
            if event.op == "s":
                # Column types changed on the source: rows before it land in the old types,
                # then the destination's columns take the new ones, then the rows after.
                self._flush(conn, pending, result, record_keys)
                plan = self._refresh(conn, table)
                per_table = self._pending_of(pending, table, plan)
                continue
            run += 1
            if event.source_ts_ms is not None:
                run_ts = event.source_ts_ms
            if event.op == "t":
                # Everything before the truncate must land first, in order.
                self._flush(conn, pending, result, record_keys)
                self._truncate(conn, table)
                result.truncates += 1
                plan = None
                continue
            if plan is None or not plan.known_columns.issuperset(event.row):
                self._flush(conn, pending, result, record_keys)
                plan = self._refresh(conn, table)
                per_table = self._pending_of(pending, table, plan)
            per_table.add(event)  # type: ignore[union-attr]
        if run:
            note_run(counts, last_ts, table, run, run_ts)  # type: ignore[arg-type]
        self._flush(conn, pending, result, record_keys)

    def _truncate(self, conn: psycopg2.extensions.connection, table: TableRef) -> None:
        with conn.cursor() as cursor:
            cursor.execute(sql.SQL("TRUNCATE {}").format(self._plans[table].target))
        logger.info("Destination %s: applied TRUNCATE of %s", self.name, table.qualified)

    def _pending_of(self, pending: dict[TableRef, PendingChanges], table: TableRef,
                    plan: TablePlan | None) -> PendingChanges | None:
        """The table's net changes of this flush (None until the table has a plan)."""
        if plan is None:
            return None
        net = pending.get(table)
        if plan.keyless is not None:
            if not isinstance(net, KeylessChanges) or net.row_line != plan.row_line:
                net = pending[table] = KeylessChanges(plan.row_line, self.values.is_unchanged,
                                                      table.qualified)
            return net
        if not isinstance(net, NetChanges) or net.key_of is not plan.key_of:
            net = pending[table] = NetChanges(plan.key_of, self.values.is_unchanged)
        return net

    def _flush(
        self,
        conn: psycopg2.extensions.connection,
        pending: dict[TableRef, PendingChanges],
        result: BatchResult,
        record_keys: bool,
    ) -> None:
        for table, net in pending.items():
            if isinstance(net, KeylessChanges):
                if net.counts:
                    self._apply_keyless(conn, self._plans[table], net, result)
            elif net.changes:
                self._apply_keyed(conn, self._plans[table], net, result, record_keys)
        pending.clear()

    def _apply_keyed(self, conn: psycopg2.extensions.connection, plan: TablePlan,
                     changes: NetChanges, result: BatchResult, record_keys: bool) -> None:
        with conn.cursor() as cursor:
            rows, unchanged_toast = apply_keyed(
                cursor, plan, changes, self.values, self.source_rows, self.name,
                record_keys=record_keys, small=self._small_stage)
        result.rows_written += rows
        result.unchanged_toast_values += unchanged_toast

    def _apply_keyless(self, conn: psycopg2.extensions.connection, plan: TablePlan,
                       changes: KeylessChanges, result: BatchResult) -> None:
        with conn.cursor() as cursor:
            result.rows_written += apply_keyless(cursor, plan, changes, self.name,
                                                 small=self._small_stage(len(changes.counts)))

    def _small_stage(self, rows: int) -> bool:
        """DELETE empties a small batch's stage (no new file); TRUNCATE a large one's, and a
        large transaction's pieces' (dead rows would pile up until its commit)."""
        return rows < 1000 and not self._spans_pieces
