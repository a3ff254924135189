"""What the stream's writer to a warehouse (DuckDB, Snowflake) does the same on every kind:
each batch's net change per key (``net_changes``) staged as PostgreSQL text and merged per table,
with the stream position (engines that keep it with the data) in the same transaction; values
left out by the source (unchanged TOAST) taken from the destination row at the key, then at the
old key of a moved row, then read back from the source; values kept as text printed as
PostgreSQL prints them; re-snapshots through the engine; backfill chunks merged at their high
watermark. A kind (one folder each) says how its database is reached, how text rows are staged
and its statements (``statements``: what the kinds share).

DDL runs before a batch's transaction begins (Snowflake commits an open transaction at DDL):
the tables a batch needs are made or widened first. Only a batch that continues a transaction
left open by a piece finds a table changed inside it: a kind that takes DDL in a transaction
(DuckDB) follows it there, another stops the stream, whose restart widens the table first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import pandas
from psycopg2 import sql

from rosetta_dagster.core.destination import (
    BatchResult,
    ChunkCounts,
    KeyBounds,
    RetypedColumn,
    change_as_text,
)
from rosetta_dagster.core.destination.errors import ApplyError
from rosetta_dagster.core.destination.keyless_changes import KeylessChanges
from rosetta_dagster.core.destination.net_changes import NetChanges
from rosetta_dagster.core.destination.warehouse.statements import (
    TEXT_PARAMETER,
    BatchStatements,
    ChunkMergeStatements,
    ResyncStatements,
    delete_staged,
    fill_left_out,
    from_column,
    left_out_column,
    value_column,
)
from rosetta_dagster.core.destination.warehouse.types import KeptType
from rosetta_dagster.core.errors import RosettaError
from rosetta_dagster.core.events import ChangeEvent, Delivery
from rosetta_dagster.core.pipeline_config import TableRef
from rosetta_dagster.core.position_tracking import PositionTracking
from rosetta_dagster.core.source_rows import SourceRows
from rosetta_dagster.core.table_schema import Column, TableSchema, xml_as_text
from rosetta_dagster.core.values import Converter, ValueCodec

logger = logging.getLogger("rosetta.apply")

NULL_FIELD = "\ud800"


class Cursor(Protocol):
    """What the writer needs of a kind's connection: DB-API with ``?`` parameters."""

    def execute(self, statement: str, parameters: Any = ...) -> Any: ...


class WarehouseDatabase(Protocol):
    """A kind's way to its database for one writer."""

    in_transaction: bool

    def connection(self) -> AbstractContextManager[Any]:
        """The connection (a cursor: ``execute`` returns something to fetch from), held by
        the caller for the block."""

    def batch_done(self) -> None:
        """A batch committed or rolled back (DuckDB lets a waiting reader in)."""

    def close(self) -> None: ...


@dataclass
class TablePlan:
    """How one table is staged and merged, built once per schema version."""

    schema: TableSchema
    target: str
    stage: str
    statements: BatchStatements
    converters: list[tuple[str, Converter]]
    # Where the staged text rows go before ``fill_stage`` casts them (DuckDB: the name the
    # DataFrame is registered under; Snowflake: a table of text).
    raw_rows: str = "batch"
    keyless: Any = None  # a table without a key: the kind's statements
    resync: ResyncStatements | None = None  # a table with a key
    known_columns: frozenset[str] = field(init=False)
    converter_of: dict[str, Converter] = field(init=False)

    def __post_init__(self) -> None:
        self.known_columns = frozenset(self.schema.column_names) | self.schema.ignored_columns
        self.converter_of = dict(self.converters)
        keys = self.schema.key_columns
        self.key_of = lambda row: tuple(map(row.get, keys))

    def row_line(self, values: Mapping[str, Any]) -> str:
        """A whole row as one hashable text (a table without a key: what tells rows apart):
        each column's PostgreSQL text joined by NUL, which no PostgreSQL text holds; NULL as a
        lone surrogate, which no UTF-8 text holds (a column the change lacks: the value its
        rows got when the column was added)."""
        fields = []
        for column, (name, convert) in zip(self.schema.columns, self.converters, strict=True):
            value = values[name] if name in values else column.missing_value
            fields.append(NULL_FIELD if value is None else convert(value))
        return "\x00".join(fields)


class WarehouseWriter:
    """Applies batches to one warehouse destination, creating and widening its tables."""

    kind: ClassVar[str]  # in sentences: "DuckDB", "Snowflake"
    ddl_in_transaction: ClassVar[bool]
    database_error: ClassVar[type[Exception]]
    text_parameter: ClassVar[str] = TEXT_PARAMETER

    def __init__(self, database: WarehouseDatabase, target_schema: str, schema_source: Any, *,
                 values: ValueCodec, name: str, pipeline: str,
                 tracking: PositionTracking | None, source_rows: SourceRows | None) -> None:
        self.database = database
        self.target_schema = target_schema
        self.schema_source = schema_source
        self.values = values
        self.name = name
        self.pipeline = pipeline
        self.tracking = tracking
        self.source_rows = source_rows
        self.position: int | None = None
        self.created: set[TableRef] = set()
        self.retyped: dict[TableRef, tuple[RetypedColumn, ...]] = {}
        self._plans: dict[TableRef, TablePlan] = {}
        self._open: Any = None  # the block holding the connection while a transaction is open
        self._conn: Any = None
        self._recording_keys = False  # the batch belongs to a re-snapshot (record its keys)
        self._planned: set[TableRef] = set()  # tables made or widened for the batch
        self._keys_made: set[TableRef] = set()  # key tables of the re-snapshot that exist
        self._undo: tuple[dict[TableRef, TablePlan], set[TableRef],
                          dict[TableRef, tuple[RetypedColumn, ...]]] | None = None

    # -- what each kind says -----------------------------------------------------------------

    def kept(self, column: Column) -> KeptType:
        """How the kind keeps the column."""
        raise NotImplementedError

    def refusal(self, schema: TableSchema) -> str | None:
        """Why ``schema`` cannot go to this destination (None: it can)."""
        raise NotImplementedError

    def _plan(self, conn: Any, schema: TableSchema) -> TablePlan:
        """Make (or widen) the destination table and everything its batches need; its plan."""
        raise NotImplementedError

    def _put_rows(self, conn: Any, frame: pandas.DataFrame, raw: str, fill: str) -> None:
        """Stage the text rows of ``frame`` as ``raw`` and run ``fill``, which reads them."""
        raise NotImplementedError

    def _position_update(self, conn: Any) -> str:
        """The statement that records the position (parameters: position, pipeline)."""
        raise NotImplementedError

    def _read_position(self, conn: Any) -> int | None:
        raise NotImplementedError

    def _table_names(self, conn: Any, prefix: str) -> set[str]:
        """The names of the target schema's tables that start with ``prefix``."""
        raise NotImplementedError

    def _apply_counts(self, conn: Any, plan: TablePlan, changes: KeylessChanges,
                      result: BatchResult) -> None:
        raise NotImplementedError  # kinds that take tables without a key say how

    # backfill chunks (``core.backfill.chunk_merge``): where they wait and how they merge

    def _chunks_table(self, conn: Any) -> str:
        """The backfill chunks merged here (a replayed high watermark finds its chunk in it),
        in the chunk's transaction (a kind without DDL there makes it with its tables)."""
        raise NotImplementedError

    def _chunk_staged(self, table: TableRef, job_id: int, chunk: int) -> bool:
        raise NotImplementedError

    def _chunk_statements(self, plan: TablePlan, job_id: int, chunk: int, *, after: bool,
                          through: bool) -> ChunkMergeStatements:
        raise NotImplementedError

    def _fill_chunk(self, conn: Any, statements: ChunkMergeStatements, job_id: int,
                    chunk: int) -> None:
        raise NotImplementedError

    def _bound_parameters(self, bounds: KeyBounds) -> list[Any]:
        raise NotImplementedError

    def _chunk_merged(self, table: TableRef, job_id: int, chunk: int) -> None:
        """After the merge committed: what held the chunk goes."""
        raise NotImplementedError

    def _excluded_raw(self, plan: TablePlan) -> str:
        """Where the keys the stream changed meanwhile are staged as text."""
        return "excluded_keys"

    # -- schema ----------------------------------------------------------------------------

    def prepare(self, schemas: Iterable[TableSchema]) -> None:
        with self.database.connection() as conn:
            for schema in schemas:
                self._plans[schema.table] = self._ensure(conn, schema)
        self.database.batch_done()

    def _ensure(self, conn: Any, schema: TableSchema) -> TablePlan:
        self._refuse(schema)
        return self._plan(conn, schema)

    def _refuse(self, schema: TableSchema) -> None:
        """Raise, before anything is made for it, when this destination cannot take the table."""
        why = self.refusal(schema)
        if why is not None:
            raise RosettaError(f"Pipeline {self.pipeline}: {why}; nothing was written.")

    def _needs_plan(self, event: ChangeEvent) -> bool:
        plan = self._plans.get(event.table)
        return event.op == "s" or plan is None or (
            event.carries_row and not plan.known_columns.issuperset(event.row))

    def _plan_before_transaction(self, events: Sequence[ChangeEvent]) -> None:
        """Make or widen the tables a batch needs before its transaction begins."""
        self._planned = set()
        if self._open is not None or self.ddl_in_transaction:
            return  # a kind with DDL in transactions makes them in the batch's (rolled back too)
        wanted = {event.table for event in events if self._needs_plan(event)}
        # A re-snapshot's batch records its keys: a table added since it began has no key
        # table yet.
        keyed = ({event.table for event in events} - self._keys_made if self._recording_keys
                 else set())
        if not wanted and not keyed:
            return
        self._planned = wanted
        with self.database.connection() as conn:
            for table in sorted(wanted, key=lambda t: t.qualified):
                self._plans[table] = self._ensure(conn, self.schema_source(table))
            if self._recording_keys:
                for table in wanted | keyed:
                    resync = self._plans[table].resync
                    if resync is not None:
                        conn.execute(resync.create_keys)
                    self._keys_made.add(table)
        self.database.batch_done()

    def has_key(self, table: TableRef) -> bool:
        plan = self._plans.get(table)
        return plan is None or plan.keyless is None

    def key_text(self, event: ChangeEvent) -> dict[str, str | None]:
        plan = self._plans.get(event.table)
        row = event.row
        if plan is None:
            return {k: None if v is None else str(v) for k, v in row.items()}
        return {k: None if row.get(k) is None else plan.converter_of[k](row[k])
                for k in plan.schema.key_columns}

    def event_as_text(self, event: ChangeEvent) -> dict[str, Any]:
        return change_as_text(self._plans[event.table].converter_of, event,
                              self.values.is_unchanged)

    # -- positions -------------------------------------------------------------------------

    def read_position(self) -> int | None:
        if self.tracking is not None:
            with self.database.connection() as conn:
                self.position = self._read_position(conn)
            self.database.batch_done()
        return self.position

    # -- transactions ----------------------------------------------------------------------

    @contextmanager
    def _transaction(self, complete: bool, *, probe: bool = False
                     ) -> Iterator[Any]:
        if self._open is None:
            block = self.database.connection()
            conn = block.__enter__()
            try:
                conn.execute("BEGIN TRANSACTION")
            except BaseException:
                block.__exit__(None, None, None)  # nothing open: the file is not held
                raise
            self._conn, self._open = conn, block
            self.database.in_transaction = True
            # Tables created, widened or retyped inside it are as before if it rolls back
            # (its DDL is gone with it: the next batch does it again).
            self._undo = (dict(self._plans), set(self.created), dict(self.retyped))
        assert self._conn is not None
        try:
            yield self._conn
        except BaseException:
            self._end(commit=False)
            raise
        if probe:
            self._end(commit=False)
        elif complete:
            self._end(commit=True)

    def _end(self, *, commit: bool) -> None:
        block, conn, self._open, self._conn = self._open, self._conn, None, None
        undo, self._undo = self._undo, None
        self.database.in_transaction = False
        committed = False
        try:
            if conn is not None:
                conn.execute("COMMIT" if commit else "ROLLBACK")
                committed = commit
        except self.database_error:
            if commit:
                raise
        finally:
            if not committed and undo is not None:
                self._plans, self.created, self.retyped = undo
            if block is not None:
                block.__exit__(None, None, None)
            self.database.batch_done()

    @property
    def in_transaction(self) -> bool:
        return self._open is not None

    def abort(self) -> None:
        if self._open is not None:
            self._end(commit=False)

    # -- apply -----------------------------------------------------------------------------

    def read_delivered(self) -> Delivery | None:
        return None  # it takes no table without a key from an engine that delivers again

    def forget_delivered(self) -> None:
        return None

    def apply(self, events: Sequence[ChangeEvent], *, record_keys: bool = False,
              position: int | None = None, complete: bool = True,
              delivered: Delivery | None = None) -> BatchResult:
        if delivered is not None:  # refusal() refuses such tables before streaming
            raise RosettaError(f"Destination {self.name} is {self.kind}, which does not record "
                               "what an engine that delivers again has delivered.")
        result = BatchResult()
        self._recording_keys = record_keys
        applied = self.position
        if applied is not None:
            events = [e for e in events if e.commit_lsn is None or e.commit_lsn >= applied]
        if not events and position is None:
            return result
        advance = (position is not None and self.tracking is not None
                   and (applied is None or position > applied))
        self._plan_before_transaction(events)
        with self._transaction(complete) as conn:
            self._apply_events(conn, events, result)
            if advance:
                conn.execute(self._position_update(conn), [position, self.pipeline])
        if advance and complete:
            self.position = position
        return result

    def first_refused(self, applied: Sequence[ChangeEvent], events: Sequence[ChangeEvent]
                      ) -> tuple[int, Exception] | None:
        """Bisected over rolled-back transactions (DuckDB has no savepoints): the shortest
        prefix of ``events`` the destination refuses after ``applied``."""
        self.abort()
        self._plan_before_transaction([*applied, *events])

        def refusal(count: int) -> Exception | None:
            try:
                with self._transaction(True, probe=True) as conn:
                    self._apply_events(conn, [*applied, *events[:count]], BatchResult())
            except ApplyError as exc:
                return exc
            return None

        if refusal(len(events)) is None:
            return None
        low, high = 0, len(events)  # refusal(low) is None, refusal(high) is not
        while high - low > 1:
            middle = (low + high) // 2
            if refusal(middle) is None:
                low = middle
            else:
                high = middle
        error = refusal(high)
        assert error is not None
        return high - 1, error

    def _apply_events(self, conn: Any, events: Sequence[ChangeEvent],
                      result: BatchResult) -> None:
        pending: dict[TableRef, NetChanges] = {}
        for event in events:
            table = event.table
            plan = self._plans.get(table)
            if event.op == "s" or plan is None or (
                    event.carries_row and not plan.known_columns.issuperset(event.row)):
                self._flush(conn, pending, result)
                if self.ddl_in_transaction:
                    plan = self._plans[table] = self._ensure(conn, self.schema_source(table))
                elif table not in self._planned:
                    raise RosettaError(
                        f"Destination {self.name}: {table.qualified} changed inside a source "
                        f"transaction applied in pieces, and {self.kind} commits an open "
                        "transaction at DDL; the stream restarts and widens the table first.")
                assert plan is not None
                if event.op == "s":
                    continue
            result.events_by_table[table] = result.events_by_table.get(table, 0) + 1
            if event.source_ts_ms is not None:
                result.last_source_ts_ms[table] = event.source_ts_ms
            if event.op == "t":
                self._flush(conn, pending, result)
                conn.execute(f"DELETE FROM {plan.target}")  # noqa: S608
                result.truncates += 1
                logger.info("Destination %s: applied TRUNCATE of %s", self.name, table.qualified)
                continue
            net = pending.get(table)
            if plan.keyless is not None:
                if not isinstance(net, KeylessChanges) or net.row_line != plan.row_line:
                    net = pending[table] = KeylessChanges(plan.row_line, self.values.is_unchanged,
                                                          table.qualified)
            elif not isinstance(net, NetChanges) or net.key_of is not plan.key_of:
                net = pending[table] = NetChanges(plan.key_of, self.values.is_unchanged)
            net.add(event)
        self._flush(conn, pending, result)

    def _flush(self, conn: Any, pending: dict[TableRef, NetChanges | KeylessChanges],
               result: BatchResult) -> None:
        for table, net in pending.items():
            if isinstance(net, KeylessChanges):
                if net.counts:
                    self._apply_counts(conn, self._plans[table], net, result)
            elif net.changes:
                self._merge(conn, self._plans[table], net, result)
        pending.clear()

    def _merge(self, conn: Any, plan: TablePlan, net: NetChanges, result: BatchResult) -> None:
        frame, unchanged_toast, left_out = stage_frame(plan, net, self.values, self._canonical)
        statements = plan.statements
        if statements.create_stage is not None:
            conn.execute(statements.create_stage)
        try:
            self._put_rows(conn, frame, plan.raw_rows, statements.fill_stage)
        except self.database_error as exc:
            raise ApplyError(f"Destination {self.name} refused a change of "
                             f"{plan.schema.table.qualified}: {str(exc).splitlines()[0]}",
                             sqlstate="22000") from None
        if left_out:
            if net.origins:
                conn.execute(statements.resolve_from_old_key)
            self._read_back(conn, plan)
        for statement in statements.merge:
            conn.execute(statement)
        if self._recording_keys and plan.resync is not None:
            if self.ddl_in_transaction:
                conn.execute(plan.resync.create_keys)  # a table added since the re-snapshot began
            conn.execute(plan.resync.record_keys)
        conn.execute(statements.clear_stage)
        result.rows_written += len(frame)
        result.unchanged_toast_values += unchanged_toast

    def _canonical(self, columns: Sequence[Column], texts: list[list[str | None]]
                   ) -> list[list[str | None]]:
        """Columns kept as text: their values as PostgreSQL prints them. An engine that sends
        the source's own text (pgoutput) has them already; Debezium's values are text
        PostgreSQL reads (``NAN``, ``-0.0``, ISO 8601 times...), printed back by the source,
        which has every type: one statement per batch for all such columns. Not ``xml``:
        re-read from the source as its stored text, which its output function would change."""
        if self.values.text_as_sent:
            return texts
        wanted = [i for i, (column, values) in enumerate(zip(columns, texts, strict=True))
                  if not self.kept(column).native and not xml_as_text(column)
                  and any(v is not None for v in values)]
        if not wanted:
            return texts
        if self.source_rows is None:
            raise RosettaError(f"Destination {self.name} cannot print values as PostgreSQL "
                               "does without a source connection.")
        conn = self.source_rows.connection()
        with conn.cursor() as cursor:
            cursor.execute(printed_by_source([columns[i].type_sql for i in wanted]),
                           [texts[i] for i in wanted])
            rows = cursor.fetchall()
        if not conn.autocommit:
            conn.rollback()
        printed = list(texts)
        for place, i in enumerate(wanted):
            printed[i] = [row[place] for row in rows]
        return printed

    def _read_back(self, conn: Any, plan: TablePlan) -> None:
        """Left-out values no destination row holds: read back from the source. A row gone
        from the source since (its own delete or key move follows) stays when only re-read
        values are missing, else becomes a delete."""
        schema = plan.schema
        unresolved = conn.execute(plan.statements.unresolved_rows).fetchall()
        if not unresolved:
            return
        keys = len(schema.key_columns)
        renders = [self.kept(schema.column(k)).render for k in schema.key_columns]
        wanted: dict[tuple[str, ...], list[tuple[str | None, ...]]] = {}
        for row in unresolved:
            columns = tuple(c.name for c, flag in zip(schema.columns, row[keys:], strict=True)
                            if flag)
            key = tuple(None if v is None else render(v)
                        for render, v in zip(renders, row[:keys], strict=True))
            wanted.setdefault(columns, []).append(key)
        if self.source_rows is None:
            raise RosettaError(f"Destination {self.name}: {len(unresolved)} change(s) of "
                               f"{schema.table.qualified} left values out that no row holds, "
                               "and this writer cannot read the source.")
        gone = delete_staged(self.kept, schema, plan.stage, text_parameter=self.text_parameter)
        for columns, key_texts in wanted.items():
            found = self.source_rows.read(schema, columns, key_texts)
            fill = fill_left_out(self.kept, schema, plan.stage, columns,
                                 text_parameter=self.text_parameter)
            # A row gone from the source whose only missing values are ones the engine reads
            # from the source at each of the row's events stays, those NULL for now: the
            # change that took it away follows, and when that is a key move, its left-out
            # values come from this row (a delete here would leave them to be read back at
            # the new key, which another row may hold by then).
            reread_only = all(self.values.reread(schema.column(name)) for name in columns)
            for key in key_texts:
                values = found.get(key)
                if values is not None:
                    conn.execute(fill, [*values, *key])
                elif reread_only:
                    conn.execute(fill, [*(None for _ in columns), *key])
                else:
                    conn.execute(gone, list(key))
        logger.info("Destination %s: %d change(s) of %s had values left out that no destination "
                    "row held; read them back from the source", self.name, len(unresolved),
                    schema.table.qualified)

    # -- re-snapshot through the engine -----------------------------------------------------

    def _keyed_plans(self) -> list[TablePlan]:
        return [plan for plan in self._plans.values() if plan.resync is not None]

    def begin_resync(self) -> None:
        """Empty key tables for every table with a key (see ``statements.ResyncStatements``)."""
        with self.database.connection() as conn:
            for plan in self._keyed_plans():
                assert plan.resync is not None
                conn.execute(plan.resync.create_keys)
                conn.execute(plan.resync.clear_keys)
        self._keys_made = {plan.schema.table for plan in self._keyed_plans()}
        self.database.batch_done()

    def begin_resync_tables(self) -> None:
        """The key tables of every table with a key exist (kept as they are)."""
        with self.database.connection() as conn:
            for plan in self._keyed_plans():
                assert plan.resync is not None
                conn.execute(plan.resync.create_keys)
        self._keys_made = {plan.schema.table for plan in self._keyed_plans()}
        self.database.batch_done()

    def resync_pending(self) -> bool:
        """A re-snapshot began and its reconciliation has not run (its key tables exist)."""
        with self.database.connection() as conn:
            names = self._table_names(conn, "_rosetta_resync_")
        self.database.batch_done()
        return any(f"_rosetta_resync_{plan.schema.target(self.name, self.target_schema).name}"
                   in names for plan in self._keyed_plans())

    def finish_resync(self) -> dict[TableRef, int]:
        """Delete the rows whose key the re-snapshot did not write and drop the key tables,
        in one transaction; the rows removed per table."""
        removed: dict[TableRef, int] = {}
        if not self.ddl_in_transaction:
            self.begin_resync_tables()
        with self._transaction(True) as conn:
            for plan in self._keyed_plans():
                assert plan.resync is not None
                if self.ddl_in_transaction:
                    conn.execute(plan.resync.create_keys)
                row = conn.execute(plan.resync.delete_unrecorded).fetchone()
                removed[plan.schema.table] = int(row[0]) if row else 0
                if self.ddl_in_transaction:
                    conn.execute(plan.resync.drop_keys)
        if not self.ddl_in_transaction:  # after the commit (a crash before: done again alike)
            with self.database.connection() as conn:
                for plan in self._keyed_plans():
                    assert plan.resync is not None
                    conn.execute(plan.resync.drop_keys)
            self.database.batch_done()
        self._keys_made = set()
        for table, count in removed.items():
            if count:
                logger.info("Destination %s: removed %d row(s) of %s that no longer exist in "
                            "the source", self.name, count, table.qualified)
        return removed

    def merge_chunk(self, table: TableRef, job_id: int, chunk: int, *,
                    excluded: set[tuple[Any, ...]], skip_all: bool, bounds: KeyBounds | None,
                    row_filter: Any) -> ChunkCounts | None:
        """See ``core.backfill.chunk_merge``: one transaction that also records the chunk as
        applied; None when it is not staged or applied already."""
        if self.in_transaction:
            raise RosettaError(f"Destination {self.name}: a backfill chunk of "
                               f"{table.qualified} arrived inside a source transaction.")
        plan = self._plans[table]
        staged = self._chunk_staged(table, job_id, chunk)
        counts = ChunkCounts()
        with self._transaction(True) as conn:
            chunks = self._chunks_table(conn)
            applied = conn.execute(f"SELECT count(*) FROM {chunks} WHERE job = ? AND chunk = ?",
                                   [job_id, chunk]).fetchone()
            if (applied and applied[0]) or not staged:
                return None
            conn.execute(f"INSERT INTO {chunks} VALUES (?, ?)", [job_id, chunk])
            if not skip_all:
                counts = self._merge_chunk(conn, plan, job_id, chunk, excluded, bounds)
        self._chunk_merged(table, job_id, chunk)
        return counts

    def _merge_chunk(self, conn: Any, plan: TablePlan, job_id: int, chunk: int,
                     excluded: set[tuple[Any, ...]], bounds: KeyBounds | None) -> ChunkCounts:
        schema = plan.schema
        after, through = bounds if bounds is not None else (None, None)
        statements = self._chunk_statements(plan, job_id, chunk, after=after is not None,
                                            through=through is not None)
        if statements.create_chunk is not None:
            conn.execute(statements.create_chunk)
        self._fill_chunk(conn, statements, job_id, chunk)
        if statements.create_excluded is not None:
            conn.execute(statements.create_excluded)
        keys = schema.key_columns
        frame = pandas.DataFrame({f"k{i}": pandas.Series(
            [None if key[i] is None else plan.converter_of[name](key[i]) for key in excluded],
            dtype=object) for i, name in enumerate(keys)})
        self._put_rows(conn, frame, self._excluded_raw(plan), statements.fill_excluded)
        counts = ChunkCounts()
        if bounds is not None:
            counts.deleted = affected(conn, statements.delete, self._bound_parameters(bounds))
        if statements.update is not None:
            counts.updated = affected(conn, statements.update, [])
        counts.inserted = affected(conn, statements.insert, [])
        for statement in statements.clear:
            conn.execute(statement)
        return counts

    def replace_rows(self, table: TableRef, job_id: int, chunk: int, *,
                     later: Sequence[ChangeEvent]) -> ChunkCounts | None:
        return None

    @property
    def pools(self) -> Sequence[Any]:
        return ()

    def close(self) -> None:
        self.abort()
        self.database.close()


def printed_by_source(type_sqls: Sequence[str]) -> sql.Composed:
    """Values (one text array parameter per column, all of one length) as PostgreSQL prints
    them, row by row in their order: ``format()`` is the type's output function (a cast to
    text may print otherwise: inet's keeps a /32)."""
    columns = [sql.SQL("CASE WHEN u.{0} IS NOT NULL THEN format('%%s', u.{0}::{1}) END").format(
        sql.Identifier(f"v{i}"), sql.SQL(type_sql)) for i, type_sql in enumerate(type_sqls)]
    return sql.SQL("SELECT {} FROM unnest({}) WITH ORDINALITY AS u ({}, n) ORDER BY n").format(
        sql.SQL(", ").join(columns),
        sql.SQL(", ").join(sql.SQL("%s::text[]") for _ in type_sqls),
        sql.SQL(", ").join([sql.Identifier(f"v{i}") for i in range(len(type_sqls))]))


def stage_frame(plan: TablePlan, net: NetChanges, codec: ValueCodec,
                 canonical: Callable[[Sequence[Column], list[list[str | None]]],
                                     list[list[str | None]]]
                 ) -> tuple[pandas.DataFrame, int, int]:
    """The net changes as a DataFrame of PostgreSQL text (see ``statements``), with the
    unchanged TOAST values and all values it leaves out."""
    schema = plan.schema
    keys = schema.key_columns
    key_set = set(keys)
    is_unchanged = codec.is_unchanged
    width = len(schema.columns)
    values: list[list[str | None]] = [[] for _ in range(width)]
    lefts: list[list[bool]] = [[] for _ in range(width)]
    froms: list[list[str | None]] = [[] for _ in keys]
    ops: list[str] = []
    keeps: list[bool] = []
    unchanged_toast = left_out = 0
    for event in net.changes.values():
        row = event.row
        delete = event.is_delete
        for i, (name, convert) in enumerate(plan.converters):
            left = False
            if name not in row:
                text = None
                left = not delete  # added on the source since: keep the current value
            else:
                value = row[name]
                if value is None or (delete and name not in key_set):
                    text = None
                elif is_unchanged(value):
                    text, left = None, True
                    unchanged_toast += 1
                else:
                    text = convert(value)
            values[i].append(text)
            lefts[i].append(left)
            left_out += left
        ops.append("d" if delete else "u")
        origin = net.origins.get(plan.key_of(row))
        keeps.append(origin is None or origin.keep)
        moved = None if origin is None else origin.moved_from
        for j, name in enumerate(keys):
            value = None if moved is None else moved[j]
            froms[j].append(None if value is None else plan.converter_of[name](value))
    values = canonical(schema.columns, values)
    froms = canonical([schema.column(name) for name in keys], froms)
    columns: dict[str, Any] = {value_column(i): pandas.Series(v, dtype=object)
                               for i, v in enumerate(values)}
    columns["op"] = ops
    columns["keep"] = keeps
    columns.update({left_out_column(i): pandas.Series(v, dtype=bool) for i, v in enumerate(lefts)})
    columns.update({from_column(j): pandas.Series(v, dtype=object) for j, v in enumerate(froms)})
    return pandas.DataFrame(columns), unchanged_toast, left_out


def keyless_frame(changes: KeylessChanges) -> pandas.DataFrame:
    """A table without a key: each distinct row's text (``c0..cN``), its place (``ord``) and
    its net count (``count``)."""
    width = len(next(iter(changes.counts)).split("\x00")) if changes.counts else 0
    fields: list[list[str | None]] = [[] for _ in range(width)]
    for line in changes.counts:
        for i, text in enumerate(line.split("\x00")):
            fields[i].append(None if text == NULL_FIELD else text)
    return pandas.DataFrame({
        **{value_column(i): pandas.Series(texts, dtype=object) for i, texts in enumerate(fields)},
        "ord": range(len(changes.counts)), "count": list(changes.counts.values())})


def affected(conn: Any, statement: str, params: list[Any]) -> int:
    """Run an INSERT, UPDATE or DELETE; the rows it changed."""
    row = conn.execute(statement, params).fetchone()
    return int(row[0]) if row else 0
