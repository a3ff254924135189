"""The run loop of one pipeline's stream: capture started from the stored position (after the
initial load hand-off), each batch fanned out to the destinations in stream order, heartbeats,
and the pipeline's state in the config store."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from rosetta_dagster.core.backfill.window import ChunkWindows
from rosetta_dagster.core.capture import Capture, PositionLost, capture_engine, tells_deliveries
from rosetta_dagster.core.config_store import ConfigStore, PipelineState
from rosetta_dagster.core.dsn import mask_secrets
from rosetta_dagster.core.errors import RosettaError
from rosetta_dagster.core.initial_load import TableLoadReport
from rosetta_dagster.core.load_fences import LoadState
from rosetta_dagster.core.pipeline_config import PipelineDefinition, TableRef
from rosetta_dagster.core.publication import ensure_publication
from rosetta_dagster.core.replication import (
    connect_source,
    delete_stale_offset,
    read_source_schema,
    source_connection,
)
from rosetta_dagster.core.source_rows import SourceRows
from rosetta_dagster.core.streaming.batches import BatchRouter
from rosetta_dagster.core.streaming.catalog_watch import CatalogWatch
from rosetta_dagster.core.streaming.fanout import DestinationFanout
from rosetta_dagster.core.streaming.load_handoff import load_uncovered_tables
from rosetta_dagster.core.streaming.prestream import (
    STALE_OFFSET_ERROR,
    forget_stale_position,
    read_schemas,
    refuse_unstreamable,
)
from rosetta_dagster.core.streaming.progress import StreamProgress
from rosetta_dagster.core.streaming.refused import RefusedChanges
from rosetta_dagster.core.table_schema import TableSchema

logger = logging.getLogger("rosetta.streaming")

HEARTBEAT_INTERVAL_S = 5.0
POSITION_STAMP_S = 1.0  # a moved position is reported at most this often


class _StopAsked(BaseException):  # noqa: N818 - a request, not an error
    """``stop_when`` held before the stream began: unwinds the load (which cancels its copies)."""


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
        # One mapping for the session's lifetime: the windows and the catalog watch hold it.
        self._schemas: dict[TableRef, TableSchema] = {}
        self.destinations = DestinationFanout(pipeline, log)
        self._capture: Capture | None = None
        self._stop_when: Callable[[StreamProgress], bool] | None = None
        self._restarted_stale = False
        self._next_heartbeat = self._next_pool_report = time.monotonic()
        self._last_stamp = 0.0
        self._stamped_position: tuple[int | None, int | None] = (None, None)
        self.refused = RefusedChanges(pipeline, config_store, log)
        # The engine thread's source connection: values read back by key, catalog reads.
        self._source_rows = SourceRows(lambda: connect_source(pipeline))
        self.batches = BatchRouter(
            pipeline, self.destinations,
            ChunkWindows(self._schemas, self.destinations.writers, config_store, log),
            CatalogWatch(pipeline, self._schemas, self._read_schema, self._source_rows),
            self.refused, self.progress, config_store, log,
            request_backfills=self._request_backfills)

    # -- preparation -----------------------------------------------------------------------

    def _read_schema(self, table: TableRef) -> TableSchema:
        return read_source_schema(self.pipeline, table)

    def prepare(self) -> dict[TableRef, TableSchema]:
        """Check the source, create the publication and destination tables. No rows move yet."""
        with source_connection(self.pipeline) as conn:
            self._schemas.clear()
            self._schemas.update(read_schemas(self.pipeline, conn))
            refuse_unstreamable(self.pipeline, self.engine, self._schemas, conn)
            ensure_publication(conn, self.pipeline, self._schemas, self.log.info,
                               before_commit=self._converge_changed_options)
            self.positions.prepare(self.log)  # e.g. carry a position over after a store switch
            forget_stale_position(self.pipeline, self.positions, conn, self.config_store,
                                  self.log)
        self.destinations.open(self.engine, self.positions, self._schemas.values(),
                               self._read_schema, self._source_rows)
        self.refused.load()
        return self._schemas

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
        self._stop_when = stop_when
        try:
            # Alive from the start: preparing and an initial load can take long, and the
            # supervisor judges this run by its own heartbeats.
            self._heartbeat_if_due()
            if not self.destinations.opened:
                self.prepare()
            self._stop_if_asked()
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
                if self.destinations.any_down:
                    self._retry_down_destinations(now)
                if tick is not None and now >= next_tick:
                    tick(self.progress)
                    next_tick = now + tick_interval_s
                if stop_when is not None and stop_when(self.progress):
                    break
            self._stop_capture()
            self.batches.flows.write()
            assert self._capture is not None
            self._capture.raise_if_failed()
            if tick is not None:
                tick(self.progress)
            self._record_state(PipelineState.PAUSED)
            return self.progress
        except _StopAsked:  # before the stream began: ends as when the loop stops
            self._stop_capture()
            self._write_flows_quietly()
            self._record_state(PipelineState.PAUSED)
            return self.progress
        except BaseException as exc:
            self._stop_capture()
            self._write_flows_quietly()
            if isinstance(exc, Exception):
                self._record_error(exc)
            else:
                self.log.info("Pipeline %s stopped: %s", self.pipeline.name, type(exc).__name__)
                self._record_state(PipelineState.PAUSED)
            raise
        finally:
            self.destinations.close()
            self._source_rows.close()

    def _write_flows_quietly(self) -> None:
        """The last batches' counts, on the way out of a failure (which matters more)."""
        try:
            self.batches.flows.write()
        except RosettaError as store_error:
            self.log.error("Could not record batch counts in the config store: %s", store_error)

    def _heartbeat_if_due(self) -> None:
        """Stamp the pipeline alive (the supervisor replaces runs that stop doing this), and
        report a new applied position within a second (the lag is judged against it); the
        batches' counts of the last second too."""
        self.batches.flows.write_if_due()
        now = time.monotonic()
        progress = self.progress
        position = (progress.source_position_ms, progress.applied_lsn)
        moved = position != self._stamped_position and now >= self._last_stamp + POSITION_STAMP_S
        if (now >= self._next_heartbeat or moved) and self.config_store is not None:
            self.config_store.heartbeat(self.pipeline.name, *position, run_id=self.run_id)
            if now >= self._next_pool_report:  # pool health and utilisation
                self.config_store.flush_pool_events(self.destinations.pools)
                self._next_pool_report = now + HEARTBEAT_INTERVAL_S
            self._next_heartbeat = now + HEARTBEAT_INTERVAL_S
            self._stamped_position, self._last_stamp = position, now

    @property
    def _tells_deliveries(self) -> bool:
        return tells_deliveries(self.engine, self._schemas)

    def _initial_load(self) -> None:
        self.batches.fences = load_uncovered_tables(
            self.pipeline, self.positions, self._schemas,
            created={t for a in self.destinations.writers for t in a.created}, log=self.log,
            on_table_loaded=self._table_loaded, on_wait=self._while_loading,
            request_backfills=self._request_backfills)

    def _while_loading(self) -> None:
        self._heartbeat_if_due()
        self._stop_if_asked()

    def _stop_if_asked(self) -> None:
        """``stop_when`` is also heeded before the stream begins (an initial load can take
        hours): a termination signal sets what it reads even when the exception the signal
        raised was lost (see core.streaming.termination)."""
        if self._stop_when is not None and self._stop_when(self.progress):
            raise _StopAsked

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
        if self._tells_deliveries and not self.positions.exists():
            self.destinations.forget_deliveries()  # before the load: a new slot, a new count
        if copy_load or self.positions.exists():
            # With initial_load: debezium, tables added since the engine's snapshot are
            # copied too (its snapshot covered the tables it was started with).
            self._initial_load()
        else:
            # The engine's snapshot covers the tables listed now: recorded, so that a table
            # added later is told apart and loaded.
            self.positions.write_loads(LoadState({t: None for t in self.pipeline.tables}))
        self.batches.request_retyped_backfills()  # changed while the stream was stopped
        fresh_snapshot = not self.positions.exists() and self.pipeline.settings.snapshot_mode in (
            "initial", "always", "when_needed"
        )
        writers = self.destinations.writers
        if fresh_snapshot:
            for writer in writers:
                writer.begin_resync()
        self.batches.resyncing = fresh_snapshot or any(a.resync_pending() for a in writers)
        self._start_engine()

    def _start_engine(self) -> None:
        """Each destination resumes from its own committed position; the stream from the
        lowest (engines that keep positions with the data)."""
        if self._tells_deliveries:
            self.destinations.expect_redelivery(self.positions.resumes_after())
        elif not self.engine.applies_once:
            # Streamed without noting deliveries: a later start with a table without a key
            # must not wait for a record recorded before.
            self.destinations.forget_deliveries()
        self._capture = self.engine.capture(
            self.pipeline, self.positions, self.batches.on_batch, schemas=self._schemas,
            start=self.destinations.start_position())
        self._capture.start()

    def _retry_down_destinations(self, now: float) -> None:
        """A destination that is reachable again catches up: the stream restarts from the
        lowest committed position and the others skip what they already have."""
        back = self.destinations.back_up(now)
        if not back:
            return
        self.log.info("Pipeline %s: destination(s) %s reachable again; catching up from the slot",
                      self.pipeline.name, self.destinations.names(back))
        # Stop first: until the stream restarts from its position, the returning destination
        # must receive nothing (a newer batch would move its position past what it missed).
        self._stop_capture()
        assert self._capture is not None
        self._capture.raise_if_failed()
        self.destinations.rejoin(back, self._schemas.values())
        self._start_engine()

    def _restart_after_stale_offset(self) -> bool:
        """The capture ended because the source refused its stored position: forget it and
        load afresh, once. Any other failure is raised."""
        capture = self._capture
        if capture is None or self._restarted_stale:
            return False
        try:
            capture.raise_if_failed()
        except PositionLost as lost:
            self._restarted_stale = True
            delete_stale_offset(
                self.pipeline, self.positions,
                reason=f"{self.engine.name}: the last recorded offset is {STALE_OFFSET_ERROR} "
                       f"({lost})",
                config_store=self.config_store, log=self.log,
            )
            self._start_capture()
            return True
        return False

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
