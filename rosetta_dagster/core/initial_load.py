"""Fast initial load: COPY every table under the snapshot a new replication slot exports.

``CREATE_REPLICATION_SLOT ... EXPORT_SNAPSHOT`` returns a snapshot that sees exactly the
transactions committed before the slot's consistent point; the slot decodes exactly those
committed after it. Copying under that snapshot and then streaming from that point leaves
neither a gap nor an overlap (the same hand-off native logical replication and PeerDB use).

Each table is split into ``ctid`` page ranges, copied by several workers in parallel, each in
its own REPEATABLE READ transaction that imports the snapshot, and piped with COPY (binary
where the column types allow it) into every destination. A destination table that is empty
is written directly; one that holds rows (a re-sync after a dropped slot) is loaded into an
unlogged table beside it and swapped in within one transaction, so readers never see it half
loaded and rows deleted meanwhile disappear.

For a table added to a running pipeline the stream resumes from its own offset, which may be
older than the snapshot: the snapshot's visibility (``xmin:xmax:xip``) is kept as a fence, and
the stream skips that table's changes from transactions the snapshot already contained.

Pure Python (no Dagster). Recovery: the offsets file is written only after every table of a
first load has been copied, so a crash during the load leaves no offset; the next start drops
the slot left behind and loads again (destination tables that already have rows take the swap
path, so nothing half-copied survives).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from rosetta_dagster.core.destination import TableLoad, destination_kind
from rosetta_dagster.core.dsn import mask_secrets
from rosetta_dagster.core.errors import RosettaError
from rosetta_dagster.core.events import parse_lsn
from rosetta_dagster.core.load_fences import LoadFence, SnapshotVisibility
from rosetta_dagster.core.pipeline_config import PipelineDefinition, TableRef
from rosetta_dagster.core.replication import (
    Log,
    connect_source,
    connect_source_replication,
)
from rosetta_dagster.core.table_schema import TableSchema, exact_select, read_table_schema

logger = logging.getLogger("rosetta.initial_load")

# Rows per page assumed when the table was never analyzed (reltuples = -1).
_DEFAULT_ROWS_PER_PAGE = 60
# As long as Debezium retries an active slot (slot.max.retries x slot.retry.delay.ms).
SLOT_RELEASE_WAIT_S = 60.0
PROGRESS_LOG_INTERVAL_S = 5.0
SLOT_WAIT_NOTICE_S = 10.0


class InitialLoadError(RosettaError):
    """Creating the slot or copying a table failed; nothing was marked as loaded."""


@dataclass(frozen=True)
class TableLoadReport:
    """One table copied into one destination."""

    destination: str
    table: TableRef
    rows: int
    seconds: float
    mode: str  # "direct" (empty destination table) or "swap" (re-sync of a populated one)
    consistent_lsn: int

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float(self.rows)


@dataclass(frozen=True)
class _ExportedSnapshot:
    name: str
    consistent_lsn: int
    visibility: SnapshotVisibility


@dataclass(frozen=True)
class _PageRange:
    first: int
    end: int | None  # exclusive; None for the last range (the table may have grown)

    def predicate(self) -> sql.Composable:
        lower = sql.SQL("ctid >= {}::tid").format(sql.Literal(f"({self.first},0)"))
        if self.end is None:
            return lower
        return sql.SQL("{} AND ctid < {}::tid").format(lower, sql.Literal(f"({self.end},0)"))


@dataclass
class _TableCopy:
    """One table into one destination: its ranges, load and progress."""

    schema: TableSchema
    load: TableLoad
    ranges: list[_PageRange]
    pages: int
    started: float = field(default_factory=time.monotonic)
    rows: int = 0
    pages_done: int = 0
    ranges_left: int = field(init=False)
    last_logged: float = 0.0

    def __post_init__(self) -> None:
        self.ranges_left = len(self.ranges)


class InitialLoader:
    """Copies a pipeline's tables under a replication slot's exported snapshot."""

    def __init__(
        self,
        pipeline: PipelineDefinition,
        schemas: dict[TableRef, TableSchema],
        *,
        log: Log = logger,
        on_table_loaded: Callable[[TableLoadReport], None] | None = None,
        on_wait: Callable[[], None] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.on_wait = on_wait  # called about once a second while copies run (heartbeats)
        self.schemas = schemas
        self.log = log
        self.on_table_loaded = on_table_loaded
        self.workers = pipeline.settings.initial_load_workers
        self.range_rows = pipeline.settings.initial_load_range_rows
        self._active: set[psycopg2.extensions.connection] = set()
        self._active_lock = threading.Lock()
        self._cancelled = threading.Event()

    # -- slots -----------------------------------------------------------------------------

    def load_with_pipeline_slot(self, tables: Sequence[TableRef]) -> int:
        """First start (or re-sync): (re)create the pipeline's slot and copy ``tables``.

        Returns the slot's consistent point: where the stream must start.
        """
        slot = self.pipeline.slot_name
        conn = connect_source(self.pipeline)
        try:
            with conn.cursor() as cursor:
                # A consumer that just failed (e.g. Debezium refusing its offset) releases the
                # slot within moments; anything holding it longer is another consumer.
                deadline = time.monotonic() + SLOT_RELEASE_WAIT_S
                while True:
                    cursor.execute(
                        "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s",
                        (slot,),
                    )
                    row = cursor.fetchone()
                    if row is None or row[0] is None or time.monotonic() > deadline:
                        break
                    if self.on_wait is not None:
                        self.on_wait()
                    time.sleep(0.5)
                if row is not None:
                    if row[0] is not None:
                        raise InitialLoadError(
                            f"Pipeline {self.pipeline.name}: replication slot {slot} is in use "
                            f"by process {row[0]} on source {self.pipeline.source.name}; stop "
                            "that consumer before the initial load."
                        )
                    # No offset refers to it (else no load would run): an interrupted load.
                    self.log.warning(
                        "Initial load of pipeline %s: replication slot %s exists without a "
                        "recorded offset (an interrupted initial load); dropping it and "
                        "loading again", self.pipeline.name, slot,
                    )
                    cursor.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        finally:
            conn.close()
        with self._exported_snapshot(slot, temporary=False) as snapshot:
            self._copy_tables(snapshot, tables)
        return snapshot.consistent_lsn

    def load_with_temporary_slot(self, tables: Sequence[TableRef]) -> LoadFence:
        """Tables added to a pipeline that already streams: a temporary slot only for its
        snapshot (dropped when the connection closes); the pipeline's slot is untouched."""
        slot = f"{self.pipeline.slot_name}_load_{os.getpid()}"
        with self._exported_snapshot(slot, temporary=True) as snapshot:
            self._copy_tables(snapshot, tables)
        return LoadFence(snapshot.visibility, snapshot.consistent_lsn)

    @contextmanager
    def _exported_snapshot(self, slot: str, *, temporary: bool) -> Iterator[_ExportedSnapshot]:
        """Create the slot; the snapshot stays importable while this connection is idle."""
        conn = connect_source_replication(self.pipeline)
        try:
            _, consistent_point, snapshot_name, _ = self._create_slot(conn, slot, temporary)
            visibility = self._snapshot_visibility(snapshot_name)
            snapshot = _ExportedSnapshot(snapshot_name, parse_lsn(consistent_point), visibility)
            self.log.info(
                "Initial load of pipeline %s: slot %s created at %s (snapshot %s)",
                self.pipeline.name, slot, consistent_point, visibility,
            )
            yield snapshot
        finally:
            conn.close()

    def _create_slot(
        self, conn: psycopg2.extensions.connection, slot: str, temporary: bool
    ) -> tuple[str, str, str, str]:
        """CREATE_REPLICATION_SLOT waits for the source's open transactions to end, possibly
        for long: run it in a helper thread so this one keeps heartbeating and can be
        terminated (which cancels the command)."""
        result: list[tuple[str, str, str, str]] = []
        failure: list[BaseException] = []

        def create() -> None:
            try:
                with conn.cursor() as cursor:
                    cursor.execute(
                        sql.SQL("CREATE_REPLICATION_SLOT {} {} LOGICAL pgoutput EXPORT_SNAPSHOT")
                        .format(sql.Identifier(slot), sql.SQL("TEMPORARY" if temporary else ""))
                    )
                    result.append(cursor.fetchone())
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                failure.append(exc)

        worker = threading.Thread(target=create, name=f"create-slot-{slot}", daemon=True)
        worker.start()
        started = time.monotonic()
        told = False
        try:
            while worker.is_alive():
                worker.join(1.0)
                if self.on_wait is not None:
                    self.on_wait()
                if not told and time.monotonic() - started > SLOT_WAIT_NOTICE_S:
                    told = True
                    self.log.info(
                        "Initial load of pipeline %s: creating slot %s waits for transactions "
                        "open on source %s to finish", self.pipeline.name, slot,
                        self.pipeline.source.name,
                    )
        except BaseException:
            conn.cancel()
            worker.join(10)
            raise
        if failure:
            raise InitialLoadError(
                f"Initial load of pipeline {self.pipeline.name}: creating replication slot {slot} "
                f"on source {self.pipeline.source.name} failed: "
                f"{mask_secrets(str(failure[0]).strip().splitlines()[0])}."
            )
        return result[0]

    def _snapshot_visibility(self, snapshot_name: str) -> SnapshotVisibility:
        with self._snapshot_transaction(snapshot_name) as conn, conn.cursor() as cursor:
            cursor.execute("SELECT pg_current_snapshot()::text")
            row = cursor.fetchone()
        assert row is not None
        return SnapshotVisibility.parse(row[0])

    @contextmanager
    def _snapshot_transaction(self, snapshot_name: str) -> Iterator[psycopg2.extensions.connection]:
        """A source connection inside a read-only transaction that imported the snapshot."""
        conn = connect_source(self.pipeline)
        try:
            conn.autocommit = False
            conn.set_session(
                isolation_level=psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ, readonly=True
            )
            with conn.cursor() as cursor:
                cursor.execute("SET TRANSACTION SNAPSHOT %s", (snapshot_name,))
            yield conn
        finally:
            conn.close()

    # -- copying ---------------------------------------------------------------------------

    def _copy_tables(self, snapshot: _ExportedSnapshot, tables: Sequence[TableRef]) -> None:
        copies = self._plan(snapshot, tables)
        tasks = [(copy, page_range) for copy in copies for page_range in copy.ranges]
        for copy in copies:
            copy.started = time.monotonic()  # planning (swap tables) is not copy time
        executor = ThreadPoolExecutor(
            max_workers=max(1, min(self.workers, len(tasks))),
            thread_name_prefix=f"initial-load-{self.pipeline.name}",
        )
        pending: dict[Future[int], tuple[_TableCopy, _PageRange]] = {
            executor.submit(self._copy_range, snapshot.name, copy, page_range): (copy, page_range)
            for copy, page_range in tasks
        }
        try:
            while pending:
                # Short waits keep this thread responsive to termination (Dagster raises here).
                done, _ = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                if self.on_wait is not None:
                    self.on_wait()
                for future in done:
                    copy, page_range = pending.pop(future)
                    self._range_done(copy, page_range, future.result(), snapshot)
        except BaseException:
            self._cancel()
            raise
        finally:
            executor.shutdown(wait=True, cancel_futures=True)

    def _columns_at_snapshot(self, snapshot: _ExportedSnapshot, tables: Sequence[TableRef]
                             ) -> set[TableRef]:
        """The tables whose columns differ at the snapshot from when the stream read them (a
        transaction that added or retyped columns committed while the slot was being created,
        which waits for it): their schema becomes the snapshot's, so every column the snapshot
        holds is copied. Returns them."""
        changed = set()
        with self._snapshot_transaction(snapshot.name) as conn:  # the catalog as of then
            current_schemas = {table: read_table_schema(conn, table,
                                                        f"source {self.pipeline.source.name}",
                                                        self.pipeline.options(table))
                               for table in tables}
        for table, current in current_schemas.items():
            if current.columns != self.schemas[table].columns:
                self.log.info("Initial load of pipeline %s: %s has columns %s at the snapshot",
                              self.pipeline.name, table.qualified,
                              ", ".join(current.column_names))
                self.schemas[table] = current
                changed.add(table)
        return changed

    def _plan(self, snapshot: _ExportedSnapshot, tables: Sequence[TableRef]) -> list[_TableCopy]:
        copies: list[_TableCopy] = []
        changed = self._columns_at_snapshot(snapshot, tables)
        with self._snapshot_transaction(snapshot.name) as conn, conn.cursor() as cursor:
            sizes = {}
            for table in tables:
                cursor.execute(
                    "SELECT pg_relation_size(c.oid) / current_setting('block_size')::int, "
                    "c.reltuples, c.relpages FROM pg_class c WHERE c.oid = %s::regclass",
                    (sql.Identifier(table.schema, table.name).as_string(conn),),
                )
                row = cursor.fetchone()
                assert row is not None
                sizes[table] = (int(row[0]), float(row[1]), int(row[2]))
        for destination in self.pipeline.destinations:
            kind = destination_kind(destination)
            for table in tables:
                pages, reltuples, relpages = sizes[table]
                rows_per_page = (
                    reltuples / relpages if reltuples > 0 and relpages > 0
                    else _DEFAULT_ROWS_PER_PAGE
                )
                pages_per_range = max(1, int(self.range_rows / max(rows_per_page, 1.0)))
                count = max(1, math.ceil(pages / pages_per_range))
                ranges = [
                    _PageRange(i * pages_per_range,
                               (i + 1) * pages_per_range if i < count - 1 else None)
                    for i in range(count)
                ]
                # A table whose columns changed at the snapshot is widened first.
                load = kind.open_table_load(self.pipeline, destination, self.schemas[table],
                                            widen=table in changed)
                copies.append(_TableCopy(self.schemas[table], load, ranges, pages))
        return copies

    def _copy_range(self, snapshot_name: str, copy: _TableCopy, page_range: _PageRange) -> int:
        """COPY one page range out of the snapshot into the destination; returns its rows."""
        if self._cancelled.is_set():
            return 0
        table = copy.schema.table
        columns = sql.SQL(", ").join(exact_select(c) for c in copy.schema.columns)
        select = sql.SQL("SELECT {} FROM {} WHERE {} AND {}").format(
            columns, copy.schema.source_sql, page_range.predicate(), copy.schema.source_filter)
        try:
            with self._snapshot_transaction(snapshot_name) as source, self._tracked(source):
                return copy.load.copy(source, select, (), self._tracked)  # (): see replicated_rows
        except psycopg2.Error as exc:
            if self._cancelled.is_set():
                return 0
            raise InitialLoadError(
                f"Initial load of pipeline {self.pipeline.name}: copying {table.qualified} to "
                f"destination {copy.load.destination} failed: "
                f"{mask_secrets(str(exc).strip().splitlines()[0])}."
            ) from None

    def _range_done(
        self, copy: _TableCopy, page_range: _PageRange, rows: int, snapshot: _ExportedSnapshot
    ) -> None:
        table = copy.schema.table
        copy.rows += rows
        copy.ranges_left -= 1
        end = copy.pages if page_range.end is None else min(page_range.end, copy.pages)
        copy.pages_done += max(0, end - page_range.first)
        elapsed = time.monotonic() - copy.started
        if copy.ranges_left:
            # Sparse: Dagster's event log is the reader (one line per few seconds per table).
            if time.monotonic() - copy.last_logged < PROGRESS_LOG_INTERVAL_S:
                return
            copy.last_logged = time.monotonic()
            percent = 100 * copy.pages_done / copy.pages if copy.pages else 100.0
            self.log.info(
                "Initial load of pipeline %s: %s -> %s: %d rows (%.0f%%), %.0f rows/s",
                self.pipeline.name, table.qualified, copy.load.destination, copy.rows,
                min(percent, 99.0), copy.rows / elapsed if elapsed > 0 else 0.0,
            )
            return
        copy.load.finish()
        elapsed = time.monotonic() - copy.started
        report = TableLoadReport(
            copy.load.destination, table, copy.rows, elapsed, copy.load.mode, snapshot.consistent_lsn
        )
        self.log.info(
            "Initial load of pipeline %s: %s -> %s complete: %d rows (100%%) in %.1f s, "
            "%.0f rows/s (%s)", self.pipeline.name, table.qualified, copy.load.destination,
            report.rows, report.seconds, report.rows_per_second, copy.load.mode,
        )
        if self.on_table_loaded is not None:
            self.on_table_loaded(report)

    # -- cancellation ----------------------------------------------------------------------

    @contextmanager
    def _tracked(self, conn: psycopg2.extensions.connection) -> Iterator[None]:
        """``conn`` is cancelled with every other copy when one fails."""
        with self._active_lock:
            self._active.add(conn)
        try:
            yield
        finally:
            with self._active_lock:
                self._active.discard(conn)

    def _cancel(self) -> None:
        """Stop every running COPY (the workers then roll back and end)."""
        self._cancelled.set()
        with self._active_lock:
            for conn in list(self._active):
                try:
                    conn.cancel()
                except psycopg2.Error:
                    pass
