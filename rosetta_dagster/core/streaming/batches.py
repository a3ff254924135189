"""The engine thread's side of a stream: each batch applied in stream order, split by backfill
watermarks, changes a table's load already holds skipped (fences), a re-snapshot reconciled
when it ends, and the progress counted."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rosetta_dagster.core.backfill.window import ChunkWindows
from rosetta_dagster.core.capture import CaptureBatch
from rosetta_dagster.core.config_store import ConfigStore
from rosetta_dagster.core.events import ChangeEvent, Delivery, Watermark
from rosetta_dagster.core.load_fences import SnapshotVisibility
from rosetta_dagster.core.pipeline_config import PipelineDefinition, TableRef
from rosetta_dagster.core.replication import Log
from rosetta_dagster.core.streaming.catalog_watch import CatalogWatch
from rosetta_dagster.core.streaming.fanout import DestinationFanout
from rosetta_dagster.core.streaming.flows import FlowRecorder
from rosetta_dagster.core.streaming.progress import StreamProgress
from rosetta_dagster.core.streaming.refused import RefusedChanges


class BatchRouter:
    """Applies the capture's batches (called in the engine's thread)."""

    def __init__(self, pipeline: PipelineDefinition, destinations: DestinationFanout,
                 windows: ChunkWindows, catalog: CatalogWatch, refused: RefusedChanges,
                 progress: StreamProgress, config_store: ConfigStore | None, log: Log, *,
                 request_backfills: Callable[[Sequence[TableRef], str], None]) -> None:
        self._pipeline = pipeline
        self._destinations = destinations
        self._windows = windows
        self._catalog = catalog
        self._refused = refused
        self.progress = progress
        self._config_store = config_store
        self.flows = FlowRecorder(config_store, pipeline.name)
        self._log = log
        self._request_backfills = request_backfills
        # Set by the session before the capture starts.
        self.resyncing = False  # a snapshot is being applied: record its keys, then reconcile
        self.fences: dict[TableRef, SnapshotVisibility] = {}

    def on_batch(self, batch: CaptureBatch) -> int | None:
        """Apply a batch in stream order; backfill watermarks split it into segments.

        Returns the position every destination has committed (for engines that confirm it)."""
        writers = self._destinations.writers
        self._refused.replay_requested(writers)  # parked changes go before newer ones
        self._destinations.begin_batch(batch.deliveries)
        self._refused.deliveries = batch.deliveries
        segment: list[ChangeEvent] = []
        streaming_seen = batch.marker is not None
        items = batch.items
        if not self.resyncing:
            items = self._catalog.changed_tables(self.progress.source_position_ms) + list(items)
        for item in items:
            if isinstance(item, Watermark):
                self._apply_events(segment, streaming_seen, position=_past(segment),
                                   delivered=_last_delivered(segment))
                segment = []
                self._windows.on_watermark(item)
            else:
                if self.fences and self._fenced(item):
                    continue
                segment.append(item)
                self._windows.note(item)
        self._apply_events(segment, streaming_seen, position=batch.position,
                           complete=batch.complete,
                           delivered=batch.deliveries[-1] if batch.deliveries else None)
        if batch.marker is not None and batch.marker.source_ts_ms is not None:
            self.progress.note_source_position(batch.marker.source_ts_ms)
        committed = self._destinations.committed()
        self.progress.note_applied_lsn(committed if committed is not None else max(
            (i.lsn for i in batch.items if isinstance(i, ChangeEvent) and i.lsn is not None),
            default=None))
        return committed

    def request_retyped_backfills(self) -> None:
        """Tables a destination gave new column types: the source converted their rows in a
        rewrite that streams nothing (maybe with a USING expression), so they are re-copied."""
        for table, changes in self._destinations.take_retyped().items():
            self._request_backfills([table], "changed column types on the source ("
                                    + ", ".join(changes) + ")")

    def _fenced(self, event: ChangeEvent) -> bool:
        """A change the table's load already contains (its transaction is in the snapshot)."""
        visibility = self.fences.get(event.table)
        if (visibility is None or event.xid is None or event.op == "s"
                or not visibility.includes(event.xid)):
            return False
        self.progress.fenced_events_skipped += 1
        return True

    def _apply_events(
        self, events: Sequence[ChangeEvent], streaming_seen: bool, *,
        position: int | None = None, complete: bool = True, delivered: Delivery | None = None,
    ) -> None:
        if self.resyncing:
            # Snapshot events first (recording their keys), then reconcile as soon as the
            # snapshot is known to be over, then whatever streamed after it.
            cut = next((i for i, e in enumerate(events) if not e.from_snapshot), len(events))
            snapshot_part, events = events[:cut], events[cut:]
            if snapshot_part:
                self._apply(snapshot_part, record_keys=True)
            if events or streaming_seen or snapshot_part and snapshot_part[-1].snapshot == "last":
                for writer in self._destinations.writers:
                    writer.finish_resync()
                self.resyncing = False
                self._log.info("Pipeline %s: snapshot complete; destinations reconciled",
                              self._pipeline.name)
        if events or position is not None or delivered is not None:
            self._apply(events, position=position, complete=complete, delivered=delivered)

    def _apply(
        self, events: Sequence[ChangeEvent], *, record_keys: bool = False,
        position: int | None = None, complete: bool = True, delivered: Delivery | None = None,
    ) -> None:
        results = self._destinations.apply(self._refused, events, record_keys=record_keys,
                                          position=position, complete=complete,
                                          delivered=delivered)
        if any(writer.retyped for writer in self._destinations.writers):
            self.request_retyped_backfills()
        if not events:
            return
        if self._refused.stopped_on is not None and self._config_store is not None:
            self._config_store.record_apply_error(self._pipeline.name, None)  # streamed past it
            self._refused.stopped_on = None
        # Every destination sees the same events: counts and times come from the first.
        first = results[0]
        self.progress.note_batch(len(events), first.events_by_table, first.last_source_ts_ms,
                                 sum(r.unchanged_toast_values for r in results))
        self.flows.note([(destination.name, table.qualified, count)
                         for destination in self._pipeline.destinations
                         for table, count in first.events_by_table.items()])


def _last_delivered(segment: Sequence[ChangeEvent]) -> Delivery | None:
    """The last record of a segment before a watermark (engines that deliver again)."""
    return next((e.delivery for e in reversed(segment) if e.delivery is not None), None)


def _past(segment: Sequence[ChangeEvent]) -> int | None:
    """The position just past a segment of whole transactions before a watermark (engines
    that keep positions with the data; None otherwise): recorded with it, so that a crash
    before the batch's end never applies it again after the watermark's chunk (a row
    without a key would be added or removed twice)."""
    # Schema events the session adds in front carry no position; the rows all do (pgoutput).
    commits = [e.commit_lsn for e in segment if e.commit_lsn is not None]
    if not commits or len(commits) < sum(1 for e in segment if e.carries_row):
        return None
    return max(commits) + 1
