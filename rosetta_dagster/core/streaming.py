"""A streaming session: capture + apply to every destination + config-store bookkeeping.

Pure Python (no Dagster). The Dagster op creates a session, calls :meth:`StreamingSession.run`
and passes a ``tick`` callback for observations; the CLI does the same without Dagster. The
session does not know which capture engine runs: it talks to ``core.capture``'s interface.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2

from rosetta_dagster.core.apply.applier import ChunkCounts, PostgresApplier
from rosetta_dagster.core.apply.refused import RefusedChanges
from rosetta_dagster.core.apply.schema import (
    SchemaError,
    TableSchema,
    read_column_types,
    read_table_schema,
)
from rosetta_dagster.core.capture import Capture, CaptureBatch, capture_engine
from rosetta_dagster.core.config_store import ConfigStore, PipelineState
from rosetta_dagster.core.dsn import mask_secrets
from rosetta_dagster.core.errors import DatabaseConnectionError, RosettaError
from rosetta_dagster.core.events import ChangeEvent, Watermark
from rosetta_dagster.core.filters import compile_filter, parse_filter
from rosetta_dagster.core.initial_load import (
    InitialLoader,
    LoadState,
    SnapshotVisibility,
    TableLoadReport,
    format_lsn,
)
from rosetta_dagster.core.pipeline_config import PipelineDefinition, TableRef
from rosetta_dagster.core.pool import PoolSettings, ResilientConnectionPool
from rosetta_dagster.core.publication import ensure_publication
from rosetta_dagster.core.replication import (
    connect_source,
    delete_stale_offset,
    destination_connection,
    missing_slot_reason,
    slot_confirmed_lsn,
    slot_exists,
    source_connection,
    stream_application_name,
)
from rosetta_dagster.core.source_rows import SourceRows

logger = logging.getLogger("rosetta.streaming")

HEARTBEAT_INTERVAL_S = 5.0
POSITION_STAMP_S = 1.0  # a moved position is reported at most this often
# How often a destination that went down is tried again (engines with per-destination positions).
DESTINATION_RETRY_S = 5.0
STALE_OFFSET_ERROR = "no longer available on the server"
# How often the source catalog is looked at for added columns between batches of rows.
CATALOG_POLL_S = 2.0
# A destination that cannot be reached: others keep applying, it catches up from the slot.
_UNREACHABLE = (DatabaseConnectionError, psycopg2.OperationalError, psycopg2.InterfaceError)


@dataclass
class TableProgress:
    events_applied: int = 0
    last_source_ts_ms: int | None = None


@dataclass
class StreamProgress:
    """Counters the op turns into observations; updated by the engine thread."""

    started_at: float = field(default_factory=time.monotonic)
    batches: int = 0
    events_applied: int = 0
    last_batch_at: float | None = None
    unchanged_toast_values: int = 0
    tables: dict[TableRef, TableProgress] = field(default_factory=dict)
    # Source time of the newest change or heartbeat message applied: lag = now - this.
    source_position_ms: int | None = None
    # Changes of a just-loaded table that its load's snapshot already contained.
    fenced_events_skipped: int = 0
    # Source LSN applied: what every destination committed (engines that keep positions with
    # the data), else the newest change applied; with source_position_ms, for core.lag.
    applied_lsn: int | None = None

    def note_source_position(self, source_ts_ms: int) -> None:
        if self.source_position_ms is None or source_ts_ms > self.source_position_ms:
            self.source_position_ms = source_ts_ms

    def note_applied_lsn(self, lsn: int | None) -> None:
        if lsn is not None and (self.applied_lsn is None or lsn > self.applied_lsn):
            self.applied_lsn = lsn


@dataclass
class _ChunkWindow:
    """Keys of ``table`` the stream changed between a chunk's low and high watermarks."""

    table: TableRef
    keys: set[tuple[Any, ...]] = field(default_factory=set)
    truncated: bool = False

    def note(self, event: ChangeEvent, schemas: dict[TableRef, TableSchema]) -> None:
        if not event.carries_row:
            self.truncated = self.truncated or event.op == "t"
            return
        row = event.row
        self.keys.add(tuple(row.get(k) for k in schemas[event.table].primary_key))


def _lowest(positions: Sequence[int | None]) -> int | None:
    """The position every destination has reached; None unless each has one."""
    known = [p for p in positions if p is not None]
    return min(known) if known and len(known) == len(positions) else None


def _lc_monetary(conn: psycopg2.extensions.connection) -> str:
    with conn.cursor() as cursor:
        cursor.execute("SHOW lc_monetary")
        row = cursor.fetchone()
    return str(row[0]) if row else ""


class StreamingSession:
    """Streams one pipeline until stopped, failing loudly and recording its state."""

    def __init__(
        self,
        pipeline: PipelineDefinition,
        *,
        offsets_dir: Path,
        config_store: ConfigStore | None = None,
        run_id: str | None = None,
        log: logging.Logger | logging.LoggerAdapter[logging.Logger] = logger,
        on_table_loaded: Callable[[TableLoadReport], None] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.engine = capture_engine(pipeline.settings.engine)
        self.positions = self.engine.position_store(pipeline, offsets_dir)
        self.on_table_loaded = on_table_loaded
        self.config_store = config_store
        self.run_id = run_id
        self.log = log
        self.progress = StreamProgress()
        self._schemas: dict[TableRef, TableSchema] = {}
        self._appliers: list[PostgresApplier] = []
        self._pools: list[ResilientConnectionPool] = []
        self._capture: Capture | None = None
        # Destinations that became unreachable, with when to try them again.
        self._down: dict[int, float] = {}
        self._resyncing = False
        self._restarted_stale = False
        self._windows: dict[tuple[int, int], _ChunkWindow] = {}
        self._fences: dict[TableRef, SnapshotVisibility] = {}
        self._next_heartbeat = self._next_pool_report = time.monotonic()
        self._last_stamp = 0.0
        self._stamped_position: tuple[int | None, int | None] = (None, None)
        self.refused = RefusedChanges(pipeline, config_store, log)
        # The engine thread's source connection: values read back by key, catalog reads (see
        # _changed_tables).
        self._source_rows = SourceRows(lambda: connect_source(pipeline))
        self._next_catalog_poll = 0.0

    # -- preparation -----------------------------------------------------------------------

    def _read_schema(self, table: TableRef) -> TableSchema:
        with source_connection(self.pipeline) as conn:
            return read_table_schema(conn, table, f"source {self.pipeline.source.name}",
                                     self.pipeline.options(table))

    def prepare(self) -> dict[TableRef, TableSchema]:
        """Check the source, create the publication and destination tables. No rows move yet."""
        with source_connection(self.pipeline) as conn:
            where = f"source {self.pipeline.source.name}"
            self._schemas = {t: read_table_schema(conn, t, where, self.pipeline.options(t))
                             for t in self.pipeline.tables}
            self._refuse_unsupported_columns()
            if (reason := self.engine.source_refusal(conn)) is not None:
                raise SchemaError(f"Pipeline {self.pipeline.name} cannot stream source "
                                  f"{self.pipeline.source.name} with the {self.engine.name} "
                                  f"engine, so nothing was written: {reason}.")
            self._refuse_money_across_locales(conn)
            ensure_publication(conn, self.pipeline, self._schemas, self.log.info,
                               before_commit=self._converge_changed_options)
            self.positions.prepare(self.log)  # e.g. carry a position over after a store switch
            if not slot_exists(conn, self.pipeline.slot_name):
                delete_stale_offset(
                    self.pipeline, self.positions, reason=missing_slot_reason(self.pipeline),
                    config_store=self.config_store, log=self.log,
                )
            else:
                self._delete_position_behind_slot(conn)
        for destination in self.pipeline.destinations:
            pool = ResilientConnectionPool(
                destination.dsn(),
                PoolSettings.from_env(max_conn=2, init_attempts=3, statement_timeout_ms=0,
                                      application_name=stream_application_name(self.pipeline)),
                label=f"destination {destination.name}",
                setting=f"destination {destination.name}",
            ).open()
            self._pools.append(pool)
            applier = PostgresApplier(
                pool, destination.schema, self._read_schema, values=self.engine.values,
                name=destination.name, tracking=self.positions.tracking(destination),
                source_rows=self._source_rows,
            )
            applier.prepare(self._schemas.values())
            self._appliers.append(applier)
        self.refused.load()
        return self._schemas

    def _refuse_unsupported_columns(self) -> None:
        """Every column the engine cannot carry exactly, of every table, in one sentence,
        before anything is written."""
        refused = [
            f"{schema.table.qualified}.{column.name} ({column.type_sql}): {reason}"
            for schema in self._schemas.values() for column in schema.columns
            if (reason := self.engine.values.refusal(
                column, column.name in schema.primary_key)) is not None
        ]
        if refused:
            raise SchemaError(
                f"Pipeline {self.pipeline.name} cannot replicate these columns exactly with the "
                f"{self.engine.name} engine, so nothing was written: {'; '.join(refused)}."
            )

    def _refuse_money_across_locales(self, source: psycopg2.extensions.connection) -> None:
        """money is an integer whose text (and meaning: cents or yen) follows lc_monetary: it is
        only carried between databases that use the same lc_monetary."""
        columns = [f"{schema.table.qualified}.{column.name}" for schema in self._schemas.values()
                   for column in schema.columns if column.type_ref and column.type_ref.uses("money")]
        if not columns:
            return
        source_locale = _lc_monetary(source)
        for destination in self.pipeline.destinations:
            with destination_connection(self.pipeline, destination) as target:
                target_locale = _lc_monetary(target)
            if target_locale != source_locale:
                raise SchemaError(
                    f"Pipeline {self.pipeline.name} cannot replicate money columns "
                    f"({', '.join(columns)}) exactly: lc_monetary is {source_locale} on source "
                    f"{self.pipeline.source.name} and {target_locale} on destination "
                    f"{destination.name}, so the same amount would mean another value; use the "
                    "same lc_monetary on both, so nothing was written."
                )

    def _converge_changed_options(self, tables: Sequence[TableRef]) -> None:
        """A table whose column list or row filter changed is brought to its new projection
        by a backfill (rows now inside loaded, rows now outside deleted, added columns
        filled), not by a new snapshot of the pipeline. Requested before the publication
        changes; the backfill waits until it has."""
        self._request_backfills(tables, "changed its columns or row filter")

    def _request_backfills(self, tables: Sequence[TableRef], why: str) -> None:
        for table in tables:
            if self.config_store is None:
                self.log.warning("Pipeline %s: %s %s; request a backfill of it to bring its "
                                 "destination rows in line", self.pipeline.name,
                                 table.qualified, why)
                continue
            job = self.config_store.create_backfill_job(self.pipeline.name, table.qualified)
            self.log.info("Pipeline %s: %s %s; backfill job %d brings its destination rows in "
                          "line", self.pipeline.name, table.qualified, why, job.id)

    # -- running ---------------------------------------------------------------------------

    def _on_batch(self, batch: CaptureBatch) -> int | None:
        """Apply a batch in stream order; backfill watermarks split it into segments.

        Returns the position every destination has committed (for engines that confirm it)."""
        self.refused.replay_requested(self._appliers)  # parked changes go before newer ones
        segment: list[ChangeEvent] = []
        streaming_seen = batch.marker is not None
        items = batch.items
        if not self._resyncing:
            items = self._changed_tables(batch) + list(items)
        for item in items:
            if isinstance(item, Watermark):
                self._apply_events(segment, streaming_seen)
                segment = []
                self._on_watermark(item)
            else:
                if self._fences and self._fenced(item):
                    continue
                segment.append(item)
                if self._windows:  # only while a backfill chunk is being read
                    for window in self._windows.values():
                        if window.table == item.table:
                            window.note(item, self._schemas)
        self._apply_events(segment, streaming_seen, position=batch.position,
                           complete=batch.complete)
        if batch.marker is not None and batch.marker.source_ts_ms is not None:
            self.progress.note_source_position(batch.marker.source_ts_ms)
        committed = _lowest([a.position for a in self._appliers])
        self.progress.note_applied_lsn(committed if committed is not None else max(
            (i.lsn for i in batch.items if isinstance(i, ChangeEvent) and i.lsn is not None),
            default=None))
        return committed

    def _changed_tables(self, batch: CaptureBatch) -> list[ChangeEvent]:
        """A schema event for each table whose columns changed on the source since its schema
        was read, from the source catalog (one query): columns added (an ADD COLUMN ... DEFAULT
        changes every existing row without any change event, and the stream sends nothing of
        the table until one of its rows changes), and, for engines that do not announce them
        in stream order, changed types. Looked at with every batch of rows of such engines,
        else every CATALOG_POLL_S. Rows of the batch from before a type change are applied in
        the new types; the backfill that follows repairs them with the rest."""
        types = not self.engine.announces_type_changes
        now = time.monotonic()
        if not (types and any(isinstance(item, ChangeEvent) for item in batch.items)) and (
                now < self._next_catalog_poll):
            return []
        self._next_catalog_poll = now + CATALOG_POLL_S
        tables = list(self._schemas)
        current = read_column_types(self._source_rows.connection(), tables)
        events = []
        for table in tables:
            schema = self._schemas[table]
            known = schema.column_types
            columns = current.get(table, {})
            options = self.pipeline.options(table)
            # A column list publishes a new column only from the next start (then backfilled).
            listed = options.columns is not None or bool(options.exclude_columns)
            added = not listed and any(name not in known and name not in schema.ignored_columns
                                       for name in columns)
            retyped = types and any(columns.get(name, kind) != kind for name, kind in known.items())
            if added or retyped:
                self._schemas[table] = self._read_schema(table)
                events.append(ChangeEvent(table, "s", None, None,
                                          source_ts_ms=int(time.time() * 1000)))
        return events

    def _request_retyped_backfills(self) -> None:
        """Tables a destination gave new column types: the source converted their rows in a
        rewrite that streams nothing (maybe with a USING expression), so they are re-copied."""
        retyped: dict[TableRef, list[str]] = {}
        for applier in self._appliers:
            for table, columns in applier.retyped.items():
                retyped.setdefault(table, []).extend(
                    f"{c.name} {c.old_type} -> {c.new_type}" for c in columns)
            applier.retyped.clear()
        for table, changes in retyped.items():
            self._request_backfills([table], "changed column types on the source ("
                                    + ", ".join(dict.fromkeys(changes)) + ")")

    def _fenced(self, event: ChangeEvent) -> bool:
        """A change the table's load already contains (its transaction is in the snapshot)."""
        visibility = self._fences.get(event.table)
        if (visibility is None or event.xid is None or event.op == "s"
                or not visibility.includes(event.xid)):
            return False
        self.progress.fenced_events_skipped += 1
        return True

    def _on_watermark(self, watermark: Watermark) -> None:
        """DBLog: a chunk read between its low and high watermarks is applied at the high one,
        minus the rows the stream changed in between (their streamed values are newer)."""
        key = (watermark.job_id, watermark.chunk)
        if watermark.kind == "low":
            self._windows[key] = _ChunkWindow(watermark.table)
            return
        window = self._windows.pop(key, None)
        if self.config_store is None:
            return
        if window is None:
            # The low watermark was before this session's start position: the changed keys
            # are unknown, so the chunk is read again.
            self.log.info("Backfill %d chunk %d: low watermark not seen; asking for a re-read",
                          watermark.job_id, watermark.chunk)
            self.config_store.request_backfill_chunk_redo(watermark.job_id, watermark.chunk)
            return
        schema = self._schemas[watermark.table]
        # The job's filter, checked against the source's columns when the job started.
        row_filter = compile_filter(parse_filter(watermark.row_filter), schema.column_names,
                                    watermark.table.qualified, alias="t")
        bounds = (watermark.after_key, watermark.last_key) if watermark.bounds_known else None
        counts = ChunkCounts()
        staged = True
        for applier in self._appliers:
            applied = applier.apply_backfill_chunk(
                watermark.table, watermark.job_id, watermark.chunk, excluded=window.keys,
                skip_all=window.truncated, bounds=bounds, row_filter=row_filter,
            )
            if applied is None:
                staged = False
            else:
                counts += applied
        if not staged:
            # Applied already (a replayed watermark: the job's progress shows it and the
            # request is moot), or the staged rows are gone: read the chunk again.
            self.config_store.request_backfill_chunk_redo(watermark.job_id, watermark.chunk)
            return
        self.config_store.record_backfill_chunk(
            watermark.job_id, watermark.chunk, last_key=watermark.last_key, rows=watermark.rows,
            inserted=counts.inserted, updated=counts.updated, deleted=counts.deleted,
        )

    def _apply_events(
        self, events: Sequence[ChangeEvent], streaming_seen: bool, *,
        position: int | None = None, complete: bool = True,
    ) -> None:
        if self._resyncing:
            # Snapshot events first (recording their keys), then reconcile as soon as the
            # snapshot is known to be over, then whatever streamed after it.
            cut = next((i for i, e in enumerate(events) if not e.from_snapshot), len(events))
            snapshot_part, events = events[:cut], events[cut:]
            if snapshot_part:
                self._apply(snapshot_part, record_keys=True)
            if events or streaming_seen or snapshot_part and snapshot_part[-1].snapshot == "last":
                for applier in self._appliers:
                    applier.finish_resync()
                self._resyncing = False
                self.log.info("Pipeline %s: snapshot complete; destinations reconciled",
                              self.pipeline.name)
        if events or position is not None:
            self._apply(events, position=position, complete=complete)

    def _apply(
        self, events: Sequence[ChangeEvent], *, record_keys: bool = False,
        position: int | None = None, complete: bool = True,
    ) -> None:
        results = []
        for index, applier in enumerate(self._appliers):
            if index in self._down:
                continue
            # One position per destination: a lost one is taken out of rotation (below).
            rotates = applier.tracking is not None and len(self._appliers) > 1
            try:
                results.append(self.refused.apply(
                    applier, events, record_keys=record_keys, position=position,
                    complete=complete, unreachable_handled=rotates))
            except _UNREACHABLE as exc:
                if not rotates:
                    raise  # one position for all destinations: every one must keep up
                self._down[index] = time.monotonic() + DESTINATION_RETRY_S
                self.log.warning(
                    "Pipeline %s: destination %s is unreachable (%s); the others keep applying "
                    "and it catches up from the slot when it is back", self.pipeline.name,
                    applier.name, mask_secrets(str(exc).strip().splitlines()[0]))
        if not results:
            raise DatabaseConnectionError(
                f"Pipeline {self.pipeline.name}: every destination is unreachable.")
        if any(applier.retyped for applier in self._appliers):
            self._request_retyped_backfills()
        if not events:
            return
        if self.refused.stopped_on is not None and self.config_store is not None:
            self.config_store.record_apply_error(self.pipeline.name, None)  # streamed past it
            self.refused.stopped_on = None
        # Every destination sees the same events: counts and times come from the first.
        first = results[0]
        progress = self.progress  # written only by the engine thread; read by ticks
        progress.batches += 1
        progress.events_applied += len(events)
        progress.last_batch_at = time.monotonic()
        progress.unchanged_toast_values += sum(r.unchanged_toast_values for r in results)
        for table, count in first.events_by_table.items():
            table_progress = progress.tables.setdefault(table, TableProgress())
            table_progress.events_applied += count
            if table in first.last_source_ts_ms:
                table_progress.last_source_ts_ms = first.last_source_ts_ms[table]
                progress.note_source_position(first.last_source_ts_ms[table])
        if self.config_store is not None:
            self.config_store.record_flows(
                self.pipeline.name,
                [
                    (destination.name, table.qualified, count)
                    for destination in self.pipeline.destinations
                    for table, count in first.events_by_table.items()
                ],
            )

    def run(
        self,
        tick: Callable[[StreamProgress], None] | None = None,
        *,
        tick_interval_s: float = 30.0,
        stop_when: Callable[[StreamProgress], bool] | None = None,
    ) -> StreamProgress:
        """Stream until terminated (any BaseException in this thread) or ``stop_when`` is true.

        The engine runs in its own thread; this thread only waits, heartbeats and ticks, so a
        termination signal lands here and closes the engine cleanly before re-raising.
        """
        try:
            # Alive from the start: preparing and an initial load can take long, and the
            # supervisor judges this run by its own heartbeats.
            self._heartbeat_if_due()
            if not self._appliers:
                self.prepare()
            self._start_capture()
            self._record_state(PipelineState.RUNNING)
            self.log.info(
                "Streaming pipeline %s with the %s engine: %d table(s) from %s to %s "
                "(position kept in %s)",
                self.pipeline.name,
                self.engine.name,
                len(self.pipeline.tables),
                self.pipeline.source.name,
                ", ".join(d.name for d in self.pipeline.destinations),
                self.positions.location,
            )
            next_tick = time.monotonic()
            while True:
                assert self._capture is not None
                if not self._capture.wait(1.0):
                    if not self._restart_after_stale_offset():
                        break
                now = time.monotonic()
                self._heartbeat_if_due()
                if self._down:
                    self._retry_down_destinations(now)
                if tick is not None and now >= next_tick:
                    tick(self.progress)
                    next_tick = now + tick_interval_s
                if stop_when is not None and stop_when(self.progress):
                    break
            self._stop_capture()
            assert self._capture is not None
            self._capture.raise_if_failed()
            if tick is not None:
                tick(self.progress)
            self._record_state(PipelineState.PAUSED)
            return self.progress
        except BaseException as exc:
            self._stop_capture()
            if isinstance(exc, Exception):
                self._record_error(exc)
            else:
                self.log.info("Pipeline %s stopped: %s", self.pipeline.name, type(exc).__name__)
                self._record_state(PipelineState.PAUSED)
            raise
        finally:
            for applier in self._appliers:
                applier.abort()  # a transaction left open inside a large source transaction
            for pool in self._pools:
                pool.close()
            self._pools.clear()
            self._source_rows.close()
            self._appliers.clear()

    def _heartbeat_if_due(self) -> None:
        """Stamp the pipeline alive (the supervisor replaces runs that stop doing this), and
        report a new applied position within a second (the lag is judged against it)."""
        now = time.monotonic()
        progress = self.progress
        position = (progress.source_position_ms, progress.applied_lsn)
        moved = position != self._stamped_position and now >= self._last_stamp + POSITION_STAMP_S
        if (now >= self._next_heartbeat or moved) and self.config_store is not None:
            self.config_store.heartbeat(self.pipeline.name, *position, run_id=self.run_id)
            if now >= self._next_pool_report:  # pool health and utilisation
                self.config_store.flush_pool_events(self._pools)
                self._next_pool_report = now + HEARTBEAT_INTERVAL_S
            self._next_heartbeat = now + HEARTBEAT_INTERVAL_S
            self._stamped_position, self._last_stamp = position, now

    def _initial_load(self) -> None:
        """Copy what the stream does not cover yet: every table when there is no position
        (first start, dropped slot, interrupted load), else tables added since the last run."""
        stored = self.positions.read()
        loader = InitialLoader(self.pipeline, self._schemas, log=self.log,
                               on_table_loaded=self._table_loaded,
                               on_wait=self._heartbeat_if_due)
        tables = list(self.pipeline.tables)
        if stored is None:
            self.log.info("Initial load of pipeline %s: %d table(s) by COPY under the new "
                          "slot's snapshot", self.pipeline.name, len(tables))
            consistent_lsn = loader.load_with_pipeline_slot(tables)
            # No fences: the stream starts at the slot's consistent point, and the slot decodes
            # exactly the transactions its exported snapshot did not see.
            state = LoadState({t: None for t in tables})
            self.positions.write_start(consistent_lsn, state)
        else:
            # Streamed before loads were recorded: every configured table is covered.
            state = stored.loads or LoadState({t: None for t in tables})
            for table in set(state.tables) - set(tables):
                del state.tables[table]  # removed: a later re-add loads it again
            added = [t for t in tables if t not in state.tables]
            if added:
                self.log.info(
                    "Initial load of pipeline %s: %s added; loading under a temporary slot's "
                    "snapshot", self.pipeline.name, ", ".join(t.qualified for t in added),
                )
                fence = loader.load_with_temporary_slot(added)
                state.tables.update({t: fence for t in added})
            state.drop_passed_fences(stored.position)
            self.positions.write_loads(state)
            # A table already streamed whose destination table had to be created (a new
            # target, or dropped on the destination) is loaded by a backfill, not a snapshot.
            created = {t for a in self._appliers for t in a.created}
            self._request_backfills([t for t in tables if t in created and t not in added],
                                    "has a destination table that was just created")
        self._fences = {t: f.visibility for t, f in state.tables.items() if f is not None}

    def _delete_position_behind_slot(self, conn: psycopg2.extensions.connection) -> None:
        """A slot that moved past the stored position has lost the changes in between."""
        confirmed = slot_confirmed_lsn(conn, self.pipeline.slot_name)
        if confirmed is None or not self.positions.exists():
            return
        behind = self.positions.behind_slot(confirmed)
        if behind is not None:
            delete_stale_offset(
                self.pipeline, self.positions,
                reason=(f"the last recorded offset ({format_lsn(behind)}) is "
                        f"{STALE_OFFSET_ERROR} (slot {self.pipeline.slot_name} starts at "
                        f"{format_lsn(confirmed)})"),
                config_store=self.config_store, log=self.log,
            )

    def _table_loaded(self, report: TableLoadReport) -> None:
        if self.config_store is not None:  # loaded rows count as records that flowed
            self.config_store.record_flows(
                self.pipeline.name, [(report.destination, report.table.qualified, report.rows)]
            )
        if self.on_table_loaded is not None:
            self.on_table_loaded(report)

    def _start_capture(self) -> None:
        """Start the engine; without a position it snapshots, and the destinations reconcile."""
        copy_load = self.pipeline.settings.initial_load == "copy"
        if copy_load:
            self._initial_load()
        self._request_retyped_backfills()  # changed while the stream was stopped
        fresh_snapshot = not self.positions.exists() and self.pipeline.settings.snapshot_mode in (
            "initial", "always", "when_needed"
        )
        if fresh_snapshot:
            for applier in self._appliers:
                applier.begin_resync()
        self._resyncing = fresh_snapshot or any(a.resync_pending() for a in self._appliers)
        self._start_engine(snapshot_mode="no_data" if copy_load else None)

    def _start_engine(self, snapshot_mode: str | None = None) -> None:
        """Each destination resumes from its own committed position; the stream from the
        lowest (engines that keep positions with the data)."""
        positions = [a.read_position() for a in self._appliers if a.tracking is not None]
        self._capture = self.engine.capture(
            self.pipeline, self.positions, self._on_batch, schemas=self._schemas,
            start_position=_lowest(positions),
            snapshot_mode=snapshot_mode,
        )
        self._capture.start()

    def _retry_down_destinations(self, now: float) -> None:
        """A destination that is reachable again catches up: the stream restarts from the
        lowest committed position and the others skip what they already have."""
        back = []
        for index, retry_at in list(self._down.items()):  # the engine thread adds entries
            if now < retry_at:
                continue
            try:
                self._appliers[index].read_position()
            except (*_UNREACHABLE, psycopg2.Error):
                self._down[index] = now + DESTINATION_RETRY_S
                continue
            back.append(index)
        if not back:
            return
        self.log.info("Pipeline %s: destination(s) %s reachable again; catching up from the slot",
                      self.pipeline.name, ", ".join(self._appliers[i].name for i in back))
        # Stop first: until the stream restarts from its position, the returning destination
        # must receive nothing (a newer batch would move its position past what it missed).
        self._stop_capture()
        assert self._capture is not None
        self._capture.raise_if_failed()
        for index in back:
            del self._down[index]
        self._start_engine()

    def _restart_after_stale_offset(self) -> bool:
        """Debezium refused the stored offset: delete it and snapshot afresh, once."""
        capture = self._capture
        if capture is None or not capture.offset_no_longer_available or self._restarted_stale:
            return False
        self._restarted_stale = True
        delete_stale_offset(
            self.pipeline, self.positions,
            reason=f"Debezium: the last recorded offset is {STALE_OFFSET_ERROR}",
            config_store=self.config_store, log=self.log,
        )
        self._start_capture()
        return True

    def _stop_capture(self) -> None:
        """Close the engine; also when one of its threads already ended (the others must have
        ended before the destinations' connections are closed)."""
        if self._capture is None:
            return
        if self._capture.running:
            self.log.info("Closing the %s capture of %s (position kept in %s)", self.engine.name,
                          self.pipeline.name, self.positions.location)
        self._capture.stop()

    def _record_state(self, state: PipelineState) -> None:
        if self.config_store is not None:
            self.config_store.record_pipeline_state(self.pipeline.name, state, run_id=self.run_id)

    def _record_error(self, exc: Exception) -> None:
        message = mask_secrets(str(exc)) if isinstance(exc, RosettaError) else mask_secrets(
            f"Pipeline {self.pipeline.name} failed: {type(exc).__name__}: {exc}"
        )
        self.log.error("%s", message)
        if self.config_store is not None:
            try:
                self.config_store.record_pipeline_state(
                    self.pipeline.name, PipelineState.ERROR, error=message, run_id=self.run_id
                )
            except RosettaError as store_error:  # the original error matters more
                self.log.error("Could not record the error in the config store: %s", store_error)
