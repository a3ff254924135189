"""Backfill, part 2 of the protocol: the stream's side. Between a chunk's low and high
watermarks the stream notes the keys it changes in the chunk's table; at the high watermark it
applies the chunk in every destination without those keys (see the package's docstring)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rosetta_dagster.core.backfill.chunk_merge import apply_chunk
from rosetta_dagster.core.config_store import ConfigStore
from rosetta_dagster.core.destination import ChunkCounts, DestinationWriter
from rosetta_dagster.core.events import ChangeEvent, Watermark
from rosetta_dagster.core.filters import compile_filter, parse_filter
from rosetta_dagster.core.load_fences import SnapshotVisibility
from rosetta_dagster.core.pipeline_config import TableRef
from rosetta_dagster.core.replication import Log
from rosetta_dagster.core.table_schema import TableSchema


@dataclass
class ChunkWindow:
    """Keys of ``table`` the stream changed between a chunk's low and high watermarks."""

    table: TableRef
    keys: set[tuple[Any, ...]] = field(default_factory=set)
    truncated: bool = False
    # A table without a key: the changes themselves (see ChunkWindows.on_watermark).
    changes: list[ChangeEvent] = field(default_factory=list)

    def note(self, event: ChangeEvent, key_columns: Sequence[str]) -> None:
        if not event.carries_row:
            self.truncated = self.truncated or event.op == "t"
            return
        if not key_columns:
            self.changes.append(event)
            return
        row = event.row
        self.keys.add(tuple(row.get(k) for k in key_columns))


class ChunkWindows:
    """The open windows of a stream, and what happens at their watermarks."""

    def __init__(self, schemas: Mapping[TableRef, TableSchema],
                 writers: Sequence[DestinationWriter], config_store: ConfigStore | None,
                 log: Log) -> None:
        # The session's own (live) schemas and destinations.
        self._schemas = schemas
        self._writers = writers
        self._config_store = config_store
        self._log = log
        self._open: dict[tuple[int, int], ChunkWindow] = {}

    def note(self, event: ChangeEvent) -> None:
        """A change the stream applies: remembered by each window open on its table."""
        for window in self._open.values():  # empty unless a chunk is being read
            if window.table == event.table:
                window.note(event, self._schemas[event.table].key_columns)

    def on_watermark(self, watermark: Watermark) -> None:
        """A chunk read between its low and high watermarks is applied at the high one, minus
        the rows the stream changed in between (their streamed values are newer)."""
        key = (watermark.job_id, watermark.chunk)
        if watermark.kind == "low":
            self._open[key] = ChunkWindow(watermark.table)
            return
        window = self._open.pop(key, None)
        store = self._config_store
        if store is None:
            return
        if window is None:
            # The low watermark was before this session's start position: the changed keys
            # are unknown, so the chunk is read again.
            self._log.info("Backfill %d chunk %d: low watermark not seen; asking for a re-read",
                           watermark.job_id, watermark.chunk)
            store.request_backfill_chunk_redo(watermark.job_id, watermark.chunk)
            return
        schema = self._schemas[watermark.table]
        if schema.keyless:
            self._replace(watermark, window, store)
            return
        # The job's filter, checked against the source's columns when the job started.
        row_filter = compile_filter(parse_filter(watermark.row_filter), schema.column_names,
                                    watermark.table.qualified, alias="t")
        bounds = (watermark.after_key, watermark.last_key) if watermark.bounds_known else None
        counts = ChunkCounts()
        staged = True
        for writer in self._writers:
            applied = apply_chunk(writer, watermark.table, watermark.job_id, watermark.chunk,
                                  excluded=window.keys, skip_all=window.truncated,
                                  bounds=bounds, row_filter=row_filter)
            if applied is None:
                staged = False
            else:
                counts += applied
        if not staged:
            # Applied already (a replayed watermark: the job's progress shows it and the
            # request is moot), or the staged rows are gone: read the chunk again.
            store.request_backfill_chunk_redo(watermark.job_id, watermark.chunk)
            return
        store.record_backfill_chunk(
            watermark.job_id, watermark.chunk, last_key=watermark.last_key, rows=watermark.rows,
            inserted=counts.inserted, updated=counts.updated, deleted=counts.deleted,
        )

    def _replace(self, watermark: Watermark, window: ChunkWindow, store: ConfigStore) -> None:
        """A table without a key, read whole under one snapshot: each destination's rows
        become the chunk's, then the window's changes the snapshot did not see are applied
        again (they were applied to the rows replaced). A TRUNCATE in the window: read again."""
        if watermark.visibility is None or window.truncated:
            store.request_backfill_chunk_redo(watermark.job_id, watermark.chunk)
            return
        seen = SnapshotVisibility.parse(watermark.visibility)
        later = [e for e in window.changes if e.xid is None or not seen.includes(e.xid)]
        counts = ChunkCounts()
        for writer in self._writers:
            replaced = writer.replace_rows(watermark.table, watermark.job_id, watermark.chunk,
                                           later=later)
            if replaced is None:
                store.request_backfill_chunk_redo(watermark.job_id, watermark.chunk)
                return
            counts += replaced
        self._log.info("Backfill %d: %s re-copied whole (%d rows), %d later change(s) applied "
                       "again", watermark.job_id, watermark.table.qualified, watermark.rows,
                       len(later))
        store.record_backfill_chunk(
            watermark.job_id, watermark.chunk, last_key=None, rows=watermark.rows,
            inserted=counts.inserted, updated=counts.updated, deleted=counts.deleted)
