"""Per-batch record counts for the config store, written at most once a second.

Each applied batch still gets its own rows (destination, table, count, time applied); they are
written together, so a stream of many small batches does not spend a config-store transaction
(four round trips with the pool's health check) on every one of them."""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Sequence

from rosetta_dagster.core.config_store import ConfigStore

FLOW_WRITE_INTERVAL_S = 1.0


class FlowRecorder:
    """Collects batches' counts (from the engine's thread) and writes them when a second has
    passed since the last write, when the session's loop asks (:meth:`write_if_due`), and at
    the stream's end (:meth:`write`)."""

    def __init__(self, store: ConfigStore | None, pipeline: str,
                 interval_s: float = FLOW_WRITE_INTERVAL_S) -> None:
        self._store, self._pipeline, self._interval_s = store, pipeline, interval_s
        self._pending: list[tuple[str, str, int, datetime.datetime]] = []
        self._lock = threading.Lock()
        self._written_at = time.monotonic()

    def note(self, flows: Sequence[tuple[str, str, int]]) -> None:
        """One batch's ``(destination, table, count)`` rows."""
        if self._store is None or not flows:
            return
        now = datetime.datetime.now(datetime.UTC)
        with self._lock:
            self._pending.extend((*flow, now) for flow in flows)
        self.write_if_due()

    def write_if_due(self) -> None:
        if time.monotonic() >= self._written_at + self._interval_s:
            self.write()

    def write(self) -> None:
        """Write what is pending (kept for the next write if the config store refuses)."""
        if self._store is None:
            return
        with self._lock:
            pending, self._pending = self._pending, []
            self._written_at = time.monotonic()
            if not pending:
                return
            try:
                self._store.record_flows(self._pipeline, [row[:3] for row in pending],
                                         at=[row[3] for row in pending])
            except BaseException:
                self._pending[:0] = pending
                raise
