"""What a stream has done so far: counters the Dagster op turns into observations."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from rosetta_dagster.core.pipeline_config import TableRef


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

    def note_batch(self, events: int, events_by_table: Mapping[TableRef, int],
                   last_source_ts_ms: Mapping[TableRef, int], unchanged_toast_values: int) -> None:
        """A batch applied (written only by the engine thread; read by ticks)."""
        self.batches += 1
        self.events_applied += events
        self.last_batch_at = time.monotonic()
        self.unchanged_toast_values += unchanged_toast_values
        for table, count in events_by_table.items():
            table_progress = self.tables.setdefault(table, TableProgress())
            table_progress.events_applied += count
            if table in last_source_ts_ms:
                table_progress.last_source_ts_ms = last_source_ts_ms[table]
                self.note_source_position(last_source_ts_ms[table])
