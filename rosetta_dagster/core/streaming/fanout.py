"""Fan-out: one writer per destination, every batch to each, and destinations that go down
taken out of rotation until they can catch up from the slot."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

import psycopg2

from rosetta_dagster.core.capture import CaptureEngine, PositionStore
from rosetta_dagster.core.destination import BatchResult, DestinationWriter, destination_kind
from rosetta_dagster.core.dsn import mask_secrets
from rosetta_dagster.core.errors import DatabaseConnectionError
from rosetta_dagster.core.events import ChangeEvent, Delivery
from rosetta_dagster.core.pipeline_config import PipelineDefinition, TableRef
from rosetta_dagster.core.pool import ResilientConnectionPool
from rosetta_dagster.core.replication import Log, stream_application_name
from rosetta_dagster.core.source_rows import SourceRows
from rosetta_dagster.core.streaming.redelivery import Redelivery
from rosetta_dagster.core.streaming.refused import RefusedChanges
from rosetta_dagster.core.table_schema import TableSchema

# How often a destination that went down is tried again (engines with per-destination positions).
DESTINATION_RETRY_S = 5.0
# A destination that cannot be reached: others keep applying, it catches up from the slot.
_UNREACHABLE = (DatabaseConnectionError, psycopg2.OperationalError, psycopg2.InterfaceError)


def lowest(positions: Sequence[int | None]) -> int | None:
    """The position every destination has reached; None unless each has one."""
    known = [p for p in positions if p is not None]
    return min(known) if known and len(known) == len(positions) else None


class DestinationFanout:
    """The destinations of one stream: what each has committed, which are down."""

    def __init__(self, pipeline: PipelineDefinition, log: Log) -> None:
        self.pipeline = pipeline
        self.log = log
        # Shared with the backfill windows: filled by open, emptied by close.
        self.writers: list[DestinationWriter] = []
        # Destinations that became unreachable, with when to try them again.
        self._down: dict[int, float] = {}
        # Per writer, what a restarted engine delivers again that it already took (engines
        # that deliver again, tables without a key; empty otherwise).
        self._redelivery: list[Redelivery] = []

    def open(self, engine: CaptureEngine, positions: PositionStore,
             schemas: Iterable[TableSchema], read_schema: Callable[[TableRef], TableSchema],
             source_rows: SourceRows) -> None:
        """A writer per destination, its tables created or widened."""
        schemas = list(schemas)
        for destination in self.pipeline.destinations:
            writer = destination_kind(destination).open_writer(
                self.pipeline, destination, values=engine.values,
                tracking=positions.tracking(destination), read_schema=read_schema,
                source_rows=source_rows,
                application_name=stream_application_name(self.pipeline))
            self.writers.append(writer)
            writer.prepare(schemas)

    @property
    def opened(self) -> bool:
        return bool(self.writers)

    def expect_redelivery(self, resumes_after: str | None) -> None:
        """The engine delivers again what follows ``resumes_after`` (its stored offset's
        record): each destination skips the changes of tables without a key it already took."""
        self._redelivery = [
            Redelivery(writer.read_delivered(), resumes_after,
                       lambda table, writer=writer: not writer.has_key(table))
            for writer in self.writers]

    def forget_deliveries(self) -> None:
        """The stream starts afresh: what destinations recorded as delivered no longer holds."""
        for writer in self.writers:
            writer.forget_delivered()

    def begin_batch(self, deliveries: Sequence[Delivery]) -> None:
        for redelivery in self._redelivery:
            redelivery.begin_batch(deliveries)

    def apply(self, refused: RefusedChanges, events: Sequence[ChangeEvent], *,
              record_keys: bool, position: int | None, complete: bool,
              delivered: Delivery | None = None) -> list[BatchResult]:
        """Apply to every destination in rotation; one that cannot be reached is taken out
        when each destination keeps its own position (else the error stops the stream)."""
        results = []
        for index, writer in enumerate(self.writers):
            if index in self._down:
                continue
            rotates = writer.tracking is not None and len(self.writers) > 1
            untaken = self._redelivery[index].untaken(events) if self._redelivery else events
            try:
                results.append(refused.apply(
                    writer, untaken, record_keys=record_keys, position=position,
                    complete=complete, unreachable_handled=rotates, delivered=delivered))
            except _UNREACHABLE as exc:
                if not rotates:
                    raise  # one position for all destinations: every one must keep up
                self._down[index] = time.monotonic() + DESTINATION_RETRY_S
                self.log.warning(
                    "Pipeline %s: destination %s is unreachable (%s); the others keep applying "
                    "and it catches up from the slot when it is back", self.pipeline.name,
                    writer.name, mask_secrets(str(exc).strip().splitlines()[0]))
        if not results:
            raise DatabaseConnectionError(
                f"Pipeline {self.pipeline.name}: every destination is unreachable.")
        return results

    def committed(self) -> int | None:
        """The position every destination has committed (engines that keep it with the data)."""
        return lowest([a.position for a in self.writers])

    def start_position(self) -> int | None:
        """Where the stream resumes: the lowest position a destination committed."""
        return lowest([a.read_position() for a in self.writers if a.tracking is not None])

    @property
    def any_down(self) -> bool:
        return bool(self._down)

    def back_up(self, now: float) -> list[int]:
        """Down destinations due for a retry that are reachable again (still counted down)."""
        back = []
        for index, retry_at in list(self._down.items()):  # the engine thread adds entries
            if now < retry_at:
                continue
            try:
                self.writers[index].read_position()
            except (*_UNREACHABLE, psycopg2.Error):
                self._down[index] = now + DESTINATION_RETRY_S
                continue
            back.append(index)
        return back

    def rejoin(self, indexes: Iterable[int], schemas: Iterable[TableSchema]) -> None:
        """Back in rotation (once the stream restarts from the lowest position), its tables
        given the source's current columns first: columns added while it was down reached the
        others as schema events from the catalog, which the slot does not replay."""
        schemas = list(schemas)
        for index in indexes:
            self.writers[index].prepare(schemas)
            del self._down[index]

    def names(self, indexes: Iterable[int]) -> str:
        return ", ".join(self.writers[i].name for i in indexes)

    def take_retyped(self) -> dict[TableRef, list[str]]:
        """Columns the destinations gave new types since the last call, per table."""
        retyped: dict[TableRef, list[str]] = {}
        for writer in self.writers:
            for table, columns in writer.retyped.items():
                retyped.setdefault(table, []).extend(
                    f"{c.name} {c.old_type} -> {c.new_type}" for c in columns)
            writer.retyped.clear()
        return {table: list(dict.fromkeys(changes)) for table, changes in retyped.items()}

    @property
    def pools(self) -> list[ResilientConnectionPool]:
        """Every writer's connection pools (for the pool telemetry)."""
        return [pool for writer in self.writers for pool in writer.pools]

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers.clear()
        self._redelivery.clear()
