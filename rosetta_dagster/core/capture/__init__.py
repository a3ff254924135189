"""Change capture: one small interface, one folder per engine.

* ``debezium/`` - the Debezium embedded engine in-process (JVM through JPype); its position is
  an offsets file on the host that runs the stream.
* ``pgoutput/`` - reads the slot over the replication protocol itself; values stay
  PostgreSQL's own text and its position is committed in each destination with the data.

The streaming session only sees what is here: an engine gives a :class:`PositionStore` (where
the stream's position and the tables it covers are kept), a :class:`Capture` that hands
:class:`CaptureBatch` es to the session (row changes, truncates, schema events when column
types change, backfill watermarks; in source commit order), and the :class:`ValueCodec` that
turns its values into COPY text. A position the source no longer has is :class:`PositionLost`.
What only one engine needs (Debezium's offsets and snapshot mode, its catalog look-ups for
changed types) stays in that engine's folder.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import psycopg2.extensions

from rosetta_dagster.core.errors import RosettaError
from rosetta_dagster.core.events import ChangeEvent, Delivery, PositionMarker, Watermark
from rosetta_dagster.core.pipeline_config import (
    CAPTURE_ENGINES,
    Destination,
    PipelineDefinition,
    TableRef,
)
from rosetta_dagster.core.table_schema import TableSchema
from rosetta_dagster.core.values import ValueCodec

if TYPE_CHECKING:
    from rosetta_dagster.core.load_fences import LoadState
    from rosetta_dagster.core.position_tracking import PositionTracking

Log = logging.Logger | logging.LoggerAdapter[logging.Logger]




class PositionLost(RosettaError):  # noqa: N818 - a state of the source, raised as such
    """The source no longer has the WAL at the stored position (its slot moved past it): the
    changes in between are lost, so the position is forgotten and the pipeline loads afresh."""


@dataclass(frozen=True)
class CaptureBatch:
    """Row events and backfill watermarks in source commit order."""

    items: Sequence[ChangeEvent | Watermark]
    # The newest heartbeat/logical-message position in the batch (only once streaming).
    marker: PositionMarker | None = None
    # Engines that keep positions with the data: where every destination stands once this
    # batch is committed there (recorded in the same destination transaction).
    position: int | None = None
    # False: a piece of one source transaction too large to hold in memory; the pieces that
    # follow belong to the same destination transaction, committed with the last piece.
    complete: bool = True
    # Engines that deliver again after a restart, in pipelines with tables without a key:
    # every record of the batch that a restart may deliver again, in stream order (rows,
    # watermarks, logical messages); see core.streaming.redelivery.
    deliveries: tuple[Delivery, ...] = ()


# Applies a batch; returns the position every destination has committed, which the engine may
# confirm to the source (None: nothing to confirm, the engine keeps its own offsets).
BatchHandler = Callable[[CaptureBatch], int | None]


@dataclass(frozen=True)
class StoredPosition:
    position: int  # where the stream resumes (an LSN)
    loads: LoadState | None  # tables the stream covers, with their load fences


class PositionStore(Protocol):
    """Where an engine keeps a pipeline's stream position and the tables it covers."""

    location: str  # for log lines: a file path, or the destinations' position table

    def prepare(self, log: Log) -> None:
        """Before a stream uses the store: refuse settings it cannot work with, and carry over
        (once, logged) a position the engine kept in another store before a switch."""

    def exists(self) -> bool:
        """Cheap: is any position stored (something a lost slot would make stale)?"""

    def read(self) -> StoredPosition | None:
        """The stored position; None when there is none (a first start or a lost slot)."""

    def write_start(self, lsn: int, loads: LoadState) -> None:
        """After an initial load: stream from ``lsn``. Marks the load complete."""

    def write_loads(self, loads: LoadState) -> None: ...

    def delete(self, log: Log) -> bool:
        """Forget the position (its slot is gone), saying so in the checklist's words; True
        when there was one."""

    def behind_slot(self, slot_confirmed_lsn: int) -> int | None:
        """The stored position when the slot has moved past it (changes are lost), else None."""

    def tracking(self, destination: Destination) -> PositionTracking | None:
        """How a destination records the position with each batch (None: the engine does)."""

    def resumes_after(self) -> str | None:
        """Engines that deliver again after a restart: the identity of the record the stored
        position names (the engine resumes after it; ``Delivery.record``); None otherwise."""


class Capture(Protocol):
    """A running capture: its own threads, stopped by :meth:`stop`."""

    def start(self) -> None: ...

    def wait(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s``; True while the capture still runs."""

    @property
    def running(self) -> bool: ...

    def stop(self, timeout_s: float = 30.0) -> None: ...

    def raise_if_failed(self) -> None:
        """After the capture stopped: raise its error, if any (:class:`PositionLost` when the
        source refused the stored position)."""


class CaptureEngine(Protocol):
    name: str
    values: ValueCodec
    # Each change is applied once, even across a crash: the position is committed with the
    # rows. Otherwise the changes after the engine's last saved position are delivered again,
    # which leaves a keyed row as it was but would apply a row without a key twice: such
    # an engine tells each record's place (Delivery) in pipelines with tables without a key.
    applies_once: bool

    def source_refusal(self, conn: psycopg2.extensions.connection) -> str | None:
        """Why the engine cannot stream this source database at all (None: it can)."""

    def position_store(self, pipeline: PipelineDefinition, offsets_dir: Path) -> PositionStore: ...

    def capture(
        self,
        pipeline: PipelineDefinition,
        positions: PositionStore,
        on_batch: BatchHandler,
        *,
        schemas: Mapping[TableRef, TableSchema],
        start: int | None,
    ) -> Capture:
        """A capture of the pipeline's slot, not started. ``start``: the lowest position the
        destinations committed, where engines that keep positions with the data resume (None
        for engines that keep their own, in ``positions``)."""


def tells_deliveries(engine: CaptureEngine, schemas: Mapping[TableRef, TableSchema]) -> bool:
    """Whether the engine's changes carry their place in what it delivers again (Delivery):
    an engine that delivers again after a restart, streaming a table without a key."""
    return not engine.applies_once and any(schema.keyless for schema in schemas.values())


def capture_engine(name: str) -> CaptureEngine:
    """The engine a pipeline's ``streaming.engine`` names (imported only when used)."""
    if name == "pgoutput":
        from rosetta_dagster.core.capture.pgoutput import PGOUTPUT

        return PGOUTPUT
    if name == "debezium":
        from rosetta_dagster.core.capture.debezium import DEBEZIUM

        return DEBEZIUM
    raise ValueError(f"unknown capture engine {name!r}; expected one of {', '.join(CAPTURE_ENGINES)}")
