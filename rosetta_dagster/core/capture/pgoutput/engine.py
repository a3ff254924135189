"""Reads a pipeline's slot over the streaming replication protocol, in two threads.

The *reader* receives pgoutput messages, decodes them and queues whole transactions (or, for a
transaction larger than its share of the memory bound, pieces of it); the *dispatcher* hands
what is queued to the session as batches. Decoding of the next transactions therefore overlaps
the apply of the previous ones; a quiet stream is applied transaction by transaction as soon as
each commits, a busy one in larger batches. The queue is bounded in bytes, not events.

Only positions every destination has committed are confirmed to the source (standby status
update, flush LSN), so the slot keeps what any destination still needs. While the captured
tables are idle a heartbeat message is emitted on the source; it moves the destinations'
positions and the slot along with the rest of the database's WAL.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import psycopg2
import psycopg2.extensions

from rosetta_dagster.core.capture import BatchHandler, CaptureBatch
from rosetta_dagster.core.capture.pgoutput.protocol import (
    Begin,
    ColumnTypes,
    Commit,
    Message,
    PgoutputDecoder,
)
from rosetta_dagster.core.capture.reread import SourceReread
from rosetta_dagster.core.dsn import mask_secrets
from rosetta_dagster.core.errors import RosettaError
from rosetta_dagster.core.events import (
    HEARTBEAT_MESSAGE_PREFIX,
    ChangeEvent,
    PositionMarker,
    Watermark,
    format_lsn,
)
from rosetta_dagster.core.pipeline_config import PipelineDefinition, TableRef
from rosetta_dagster.core.replication import connect_source, connect_source_replication
from rosetta_dagster.core.source_rows import SourceRows

logger = logging.getLogger("rosetta.capture")

_IDLE_WAIT_S = 0.1  # how often an idle reader wakes (stop requests, feedback, heartbeats)
_FEEDBACK_INTERVAL_S = 1.0
# In-memory size of a decoded row relative to its message (dict, strings, event object).
_ROW_OVERHEAD_BYTES = 256
_MEMORY_FACTOR = 3


class PgoutputCaptureError(RosettaError):
    """The replication stream or the batch handler failed."""


@dataclass
class _Unit:
    """A whole transaction, a piece of one, or a position-only marker (heartbeat)."""

    items: list[ChangeEvent | Watermark] = field(default_factory=list)
    position: int | None = None
    marker: PositionMarker | None = None
    complete: bool = True
    size: int = 0


class _ByteBoundedQueue:
    """FIFO of units whose total size stays under ``limit`` (one oversized unit may pass)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._units: deque[_Unit] = deque()
        self._size = 0
        self._cond = threading.Condition()

    def put(self, unit: _Unit, timeout_s: float) -> bool:
        with self._cond:
            if self._units and self._size + unit.size > self.limit:
                self._cond.wait(timeout_s)
                if self._units and self._size + unit.size > self.limit:
                    return False
            self._units.append(unit)
            self._size += unit.size
            self._cond.notify_all()
            return True

    def take(self, timeout_s: float, max_size: int, max_events: int) -> list[_Unit]:
        """The next unit; more complete units behind a complete one, up to the bounds.

        Position-only units (no rows) are never taken together with units that carry rows:
        the slot may already be confirmed up to such a position, so it is recorded in the
        destinations on its own, even when the transaction behind it is refused."""
        with self._cond:
            if not self._units:
                self._cond.wait(timeout_s)
            if not self._units:
                return []
            taken = [self._units.popleft()]
            size, events = taken[0].size, len(taken[0].items)
            carries_rows = bool(taken[0].items)
            while (taken[-1].complete and self._units and self._units[0].complete
                   and bool(self._units[0].items) == carries_rows
                   and size < max_size and events < max_events):
                unit = self._units.popleft()
                taken.append(unit)
                size += unit.size
                events += len(unit.items)
            self._size -= size
            self._cond.notify_all()
            return taken


class PgoutputCapture:
    """Streams one pipeline's slot from ``start_position`` and hands batches to ``on_batch``."""

    def __init__(
        self, pipeline: PipelineDefinition, start_position: int, on_batch: BatchHandler,
        known_types: Mapping[TableRef, ColumnTypes] | None = None,
        reread: SourceReread | None = None,
    ) -> None:
        settings = pipeline.settings
        self.pipeline = pipeline
        self.start_position = start_position
        self.on_batch = on_batch
        self.known_types = known_types
        # Columns whose text is read back from the source (the dispatcher's connection).
        self.reread = reread
        self._source_rows = SourceRows(lambda: connect_source(pipeline))
        limit = settings.max_queue_mb * 1024 * 1024
        self._queue = _ByteBoundedQueue(limit)
        # A transaction larger than this is applied in pieces (one destination transaction).
        self._piece_bytes = max(limit // 4, 64 * 1024)
        self._max_events = settings.max_batch_size
        self._heartbeat_s = settings.heartbeat_interval_ms / 1000
        self._stopping = threading.Event()
        self._error: BaseException | None = None
        self._confirmed = start_position
        self._threads: list[threading.Thread] = []
        # Ends are told by events, not Thread.join/is_alive: a signal's exception raised in a
        # join (SIGTERM -> KeyboardInterrupt in the waiting thread) leaves that thread marked
        # stopped while it still runs (CPython), and the capture would not be closed.
        self._alive = 0
        self._alive_lock = threading.Lock()
        self._one_ended = threading.Event()
        self._all_ended = threading.Event()

    # -- Capture interface ------------------------------------------------------------------

    def start(self) -> None:
        self._alive = 2
        for target, name in ((self._read, "reader"), (self._dispatch, "dispatcher")):
            thread = threading.Thread(target=self._guard(target),
                                      name=f"pgoutput-{name}-{self.pipeline.name}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def wait(self, timeout_s: float) -> bool:
        self._one_ended.wait(timeout_s)
        return self.running

    @property
    def running(self) -> bool:
        return bool(self._threads) and not self._one_ended.is_set()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stopping.set()
        if self._threads:
            self._all_ended.wait(timeout_s)

    def raise_if_failed(self) -> None:
        error = self._error
        if error is None:
            return
        if isinstance(error, RosettaError):
            raise error
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PgoutputCaptureError(
            f"Pipeline {self.pipeline.name}: the pgoutput stream stopped: {mask_secrets(reason)}"
        ) from error

    # -- threads ----------------------------------------------------------------------------

    def _guard(self, target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except BaseException as exc:  # noqa: BLE001 - surfaced by raise_if_failed
                if not self._stopping.is_set():
                    self._error = exc
            finally:
                self._stopping.set()  # one thread ending ends the other
                with self._alive_lock:
                    self._alive -= 1
                    last = self._alive == 0
                self._one_ended.set()
                if last:
                    self._all_ended.set()

        return run

    def _dispatch(self) -> None:
        try:
            self._dispatch_batches()
        finally:
            self._source_rows.close()

    def _dispatch_batches(self) -> None:
        while not self._stopping.is_set():
            units = self._queue.take(_IDLE_WAIT_S, self._piece_bytes, self._max_events)
            if not units:
                continue
            items: list[ChangeEvent | Watermark] = []
            marker = position = None
            for unit in units:
                items.extend(unit.items)
                marker = unit.marker or marker
                position = unit.position if unit.position is not None else position
            if self.reread is not None:
                items = self.reread.fill(self._source_rows, items)
            confirmed = self.on_batch(CaptureBatch(items, marker, position, units[-1].complete))
            if confirmed is not None:
                self._confirmed = max(self._confirmed, confirmed)

    def _read(self) -> None:
        conn = connect_source_replication(self.pipeline)
        heartbeat_conn: psycopg2.extensions.connection | None = None
        try:
            cursor = conn.cursor()
            cursor.start_replication(
                slot_name=self.pipeline.slot_name, decode=False,
                start_lsn=format_lsn(self.start_position),
                options={"proto_version": "1",
                         "publication_names": self.pipeline.publication_names,
                         "messages": "true"},
            )
            logger.info("Pipeline %s: pgoutput stream of slot %s from %s", self.pipeline.name,
                        self.pipeline.slot_name, format_lsn(self.start_position))
            decoder = PgoutputDecoder(self.known_types)
            unit = _Unit()
            begin: Begin | None = None
            last_position = self.start_position
            # psycopg2 confirms the server's WAL end by itself on keepalives once everything
            # received was confirmed (flushed >= the last message's start). Nothing of the
            # pipeline lies before it, but a slot ahead of every destination reads as a
            # re-created one on the next start, so that position is recorded in the
            # destinations too, as a unit of its own (see _ByteBoundedQueue.take).
            sent = last_data_start = 0
            next_feedback = next_heartbeat = next_forward = time.monotonic()
            while not self._stopping.is_set():
                message = cursor.read_message()
                now = time.monotonic()
                if message is not None:
                    last_data_start = message.data_start
                elif (begin is None and sent >= last_data_start and now >= next_forward
                      and cursor.wal_end > last_position):
                    last_position = cursor.wal_end
                    self._put(_Unit(position=last_position), cursor)
                    next_forward = now + _FEEDBACK_INTERVAL_S
                if now >= next_feedback and sent != self._confirmed:
                    confirmed = self._confirmed
                    cursor.send_feedback(flush_lsn=confirmed, write_lsn=confirmed,
                                         apply_lsn=confirmed, force=True)
                    sent, next_feedback = confirmed, now + _FEEDBACK_INTERVAL_S
                if message is None:
                    if begin is None and now >= next_heartbeat:
                        # Idle (or only other tables busy): a message keeps positions moving.
                        heartbeat_conn = heartbeat_conn or connect_source(self.pipeline)
                        with heartbeat_conn.cursor() as heartbeat:
                            heartbeat.execute("SELECT pg_logical_emit_message(false, %s, '')",
                                              (HEARTBEAT_MESSAGE_PREFIX,))
                        next_heartbeat = now + self._heartbeat_s
                    select.select([conn], [], [], _IDLE_WAIT_S)
                    continue
                payload = message.payload
                decoded = decoder.decode(payload, message.data_start)
                if type(decoded) is list:
                    unit.items.extend(decoded)
                    unit.size += (len(payload) + _ROW_OVERHEAD_BYTES) * _MEMORY_FACTOR
                    if unit.size > self._piece_bytes:
                        unit.complete = False
                        self._put(unit, cursor)
                        unit = _Unit()
                elif isinstance(decoded, Begin):
                    begin = decoded
                elif isinstance(decoded, Commit):
                    unit.position = last_position = decoded.end_lsn
                    self._put(unit, cursor)
                    unit, begin = _Unit(), None
                    next_heartbeat = now + self._heartbeat_s
                elif isinstance(decoded, Message):
                    if decoded.transactional and begin is not None:
                        item = decoded.as_item(begin.source_ts_ms)
                        if isinstance(item, Watermark):
                            unit.items.append(item)
                        unit.marker = PositionMarker(begin.source_ts_ms)
                    else:
                        # Outside any transaction: every transaction that committed before it
                        # has been sent. Its position is where its WAL record ends, which is
                        # where the next record starts: possibly the commit of a transaction
                        # under way, whose changes are still to come. Never past it.
                        last_position = max(last_position, decoded.lsn)
                        self._put(_Unit(position=last_position,
                                        marker=PositionMarker(int(time.time() * 1000))), cursor)
        finally:
            conn.close()
            if heartbeat_conn is not None:
                heartbeat_conn.close()

    def _put(self, unit: _Unit, cursor: psycopg2.extensions.cursor) -> None:
        """Queue a unit; while the queue is full, keep answering the server (its
        wal_sender_timeout would otherwise end the connection)."""
        while not self._queue.put(unit, timeout_s=1.0):
            if self._stopping.is_set():
                return
            cursor.send_feedback(force=True)
