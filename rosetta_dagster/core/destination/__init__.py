"""Destinations: one small interface, one folder per kind.

* ``postgres/`` - a PostgreSQL database: batches merged set-wise in one transaction with the
  stream position, tables created and widened like the source's, chunks staged in unlogged
  tables.
* ``duckdb/`` - a DuckDB database file (``type: duckdb``), owned by the stream's process;
* ``snowflake/`` - a Snowflake database (``type: snowflake``);
* ``warehouse/`` - what those two share: the writer's protocol, values kept natively or as
  PostgreSQL's text, the parity reader.

What the rest of the product needs from a destination is here and nothing else:

* the stream (``core.streaming``) opens a :class:`DestinationWriter` per destination: it
  prepares tables from the source schema and follows their columns, applies a batch with its
  position in the same transaction, reads the committed position back, reconciles a
  re-snapshot and merges staged backfill chunks (``core.backfill``'s part 3);
* a backfill job opens a :class:`ChunkStaging` per destination: the chunks it copies from the
  source wait there until the stream merges them;
* the initial load opens a :class:`TableLoad` per table and destination: ranges copied from
  the source's snapshot in parallel, made visible at once when the last one is in;
* the parity checks open a :class:`TableReader` per destination: counts and per-row checksums
  in key order, compared with the source's.

Records that cross the seam (:class:`BatchResult`, :class:`ChunkCounts`,
:class:`RetypedColumn`) are here too; refused-change reports are in ``errors``, the net change
per key of a batch in ``net_changes``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import psycopg2.extensions
from psycopg2 import sql

from rosetta_dagster.core.errors import RosettaError
from rosetta_dagster.core.events import ChangeEvent, Delivery
from rosetta_dagster.core.pipeline_config import Destination, PipelineDefinition, TableRef
from rosetta_dagster.core.table_schema import TableSchema

if TYPE_CHECKING:
    from rosetta_dagster.core.pool import ResilientConnectionPool
    from rosetta_dagster.core.position_tracking import PositionTracking
    from rosetta_dagster.core.source_rows import SourceRows
    from rosetta_dagster.core.values import Converter, ValueCodec

# A chunk's key range: (after, through), key values in their text form; None = open.
KeyBounds = tuple[Sequence[str | None] | None, Sequence[str | None] | None]
SchemaSource = Callable[[TableRef], TableSchema]
# Registers a destination connection for the time of a copy, so that the caller can cancel it.
ConnectionTracker = Callable[[Any], AbstractContextManager[None]]


@dataclass
class BatchResult:
    """What applying one batch did on one destination (nothing, as constructed)."""

    events_by_table: dict[TableRef, int] = field(default_factory=dict)
    rows_written: int = 0
    truncates: int = 0
    # source commit time of each table's last event
    last_source_ts_ms: dict[TableRef, int] = field(default_factory=dict)
    unchanged_toast_values: int = 0  # placeholders seen and kept at the destination's value


@dataclass
class ChunkCounts:
    """What applying one backfill chunk changed on one destination."""

    inserted: int = 0
    updated: int = 0
    deleted: int = 0

    def __iadd__(self, other: ChunkCounts) -> ChunkCounts:
        self.inserted += other.inserted
        self.updated += other.updated
        self.deleted += other.deleted
        return self


@dataclass(frozen=True)
class RetypedColumn:
    """A destination column given the source column's new type (ALTER COLUMN TYPE)."""

    name: str
    old_type: str  # as the destination printed it, before
    new_type: str


class DestinationWriter(Protocol):
    """A stream's writer to one destination (one per destination, for the stream's life)."""

    name: str
    # Where the destination records the stream position with each batch (None: the capture
    # engine keeps its own); a destination that tracks it can fall behind and catch up alone.
    tracking: PositionTracking | None
    # With tracking: the position this destination has committed.
    position: int | None
    # Tables created by prepare() (first start, added, new target), and tables with columns
    # given the source's new type since the caller last took them.
    created: set[TableRef]
    retyped: dict[TableRef, tuple[RetypedColumn, ...]]

    def prepare(self, schemas: Iterable[TableSchema]) -> None:
        """Create or widen every destination table like its source, before any change."""

    def apply(self, events: Sequence[ChangeEvent], *, record_keys: bool = False,
              position: int | None = None, complete: bool = True,
              delivered: Delivery | None = None) -> BatchResult:
        """Apply a batch (and record ``position``) in one transaction; raise and roll back on
        any error. ``record_keys``: the batch belongs to a re-snapshot. ``complete=False``: a
        piece of one source transaction; the transaction stays open for the next piece.
        ``delivered``: the last record the batch takes from an engine that delivers again
        after a restart, recorded in the same transaction (see core.streaming.redelivery)."""

    def read_delivered(self) -> Delivery | None:
        """The last record this destination took from an engine that delivers again."""

    def forget_delivered(self) -> None:
        """The stream starts afresh (a new load and slot): nothing was delivered yet."""

    def first_refused(self, applied: Sequence[ChangeEvent], events: Sequence[ChangeEvent]
                      ) -> tuple[int, Exception] | None:
        """The index of the first of ``events`` the destination refuses after ``applied``, and
        its error (None: it takes them all), in a transaction that is rolled back."""

    def has_key(self, table: TableRef) -> bool:
        """Whether ``table``'s rows have a key here (applying a change again is harmless)."""

    @property
    def in_transaction(self) -> bool:
        """True while pieces of one source transaction wait in an open transaction."""

    def abort(self) -> None:
        """Roll back a transaction left open by a piece (the stream stopped inside it)."""

    def read_position(self) -> int | None:
        """The position this destination committed (None without tracking, or none yet)."""

    def begin_resync(self) -> None:
        """A re-snapshot starts: record the key of every row it writes."""

    def resync_pending(self) -> bool:
        """A re-snapshot began and its reconciliation has not run (e.g. a crash)."""

    def finish_resync(self) -> dict[TableRef, int]:
        """Delete the rows the re-snapshot did not write; the rows removed per table."""

    def merge_chunk(self, table: TableRef, job_id: int, chunk: int, *,
                    excluded: set[tuple[Any, ...]], skip_all: bool, bounds: KeyBounds | None,
                    row_filter: tuple[sql.Composable, list[Any]]) -> ChunkCounts | None:
        """Make the rows in a staged chunk's key range equal the chunk, except ``excluded``
        keys (see ``core.backfill.chunk_merge``). None: the chunk is not staged."""

    def replace_rows(self, table: TableRef, job_id: int, chunk: int, *,
                     later: Sequence[ChangeEvent]) -> ChunkCounts | None:
        """A table without a key: its rows become the staged chunk (the whole table), then
        ``later`` (changes the chunk's snapshot did not see) are applied, in one transaction
        that consumes the chunk. None: the chunk is not staged."""

    def key_text(self, event: ChangeEvent) -> dict[str, str | None]:
        """The change's key in PostgreSQL's text form, by column (no key: every column)."""

    def event_as_text(self, event: ChangeEvent) -> dict[str, Any]:
        """The change with every value in its text form, as JSON for the config store."""

    @property
    def pools(self) -> Sequence[ResilientConnectionPool]:
        """Its connection pools, for the pool telemetry."""

    def close(self) -> None:
        """Roll back what is open and release the connections."""


class ChunkStaging(Protocol):
    """Where one backfill job's chunks wait in one destination until the stream merges them."""

    name: str  # the destination's

    def columns_unlike_source(self) -> list[str]:
        """The source's columns the destination table lacks or has in another type (chunks
        are staged once there are none: the stream widens tables when it sees the change)."""

    def stage(self, source: psycopg2.extensions.connection, select: sql.Composable,
              params: Sequence[Any], chunk: int) -> int:
        """Copy the rows ``select`` (a SELECT of the source's columns, with ``params``) reads
        from ``source`` into chunk ``chunk``'s staging and mark it staged; the rows staged."""

    def close(self) -> None: ...


class TableLoad(Protocol):
    """One table loaded whole into one destination (first start, re-sync, a table added)."""

    destination: str  # the destination's name
    # "direct": the destination table was empty and rows land in it as they come; "swap":
    # it had rows, so they land beside it and replace its rows in one transaction at finish.
    mode: str

    def copy(self, source: psycopg2.extensions.connection, select: sql.Composable,
             params: Sequence[Any], track: ConnectionTracker) -> int:
        """Copy the rows ``select`` reads from ``source`` (committed on return: one range of
        many, copied in parallel); the rows copied."""

    def finish(self) -> None:
        """Every range is in: make them the table's rows."""


class BackfillRefused(RosettaError):
    """A destination cannot take a backfill job (the sentence says why): the job fails."""


class NotComparable(Exception):  # noqa: N818 - an answer, not a failure of the reader
    """A destination cannot read a table's rows in the source's key order (the sentence says
    why): its content is not compared."""


class TableReader(Protocol):
    """Reads a destination table for the parity checks, as the source is read (same row text,
    same checksum), so a row differs only when its values differ."""

    def count(self, relation: sql.Composable, condition: sql.Composable = ...,
              params: Sequence[Any] = ()) -> int: ...

    def row_hashes(self, relation: sql.Composable, table: TableSchema,
                   after: tuple[Any, ...] | None, through: tuple[Any, ...] | None,
                   limit: int | None, condition: sql.Composable = ...,
                   ) -> list[tuple[tuple[Any, ...], str]]:
        """``(key, md5 of the row's text)`` in key order, for keys in (after, through], of the
        table's replicated columns; at most ``limit`` rows."""


class DestinationKind(Protocol):
    """One kind of destination (one folder)."""

    def open_writer(self, pipeline: PipelineDefinition, destination: Destination, *,
                    values: ValueCodec, tracking: PositionTracking | None,
                    read_schema: SchemaSource, source_rows: SourceRows | None,
                    application_name: str) -> DestinationWriter:
        """A writer with its connections open (not yet prepared)."""

    def open_staging(self, pipeline: PipelineDefinition, destination: Destination,
                     schema: TableSchema, job_id: int, *, filtered: bool = False
                     ) -> ChunkStaging:
        """``filtered``: the job has a row filter (a kind may refuse it, in one sentence)."""

    def drop_staging(self, pipeline: PipelineDefinition, destination: Destination,
                     job_ids: Collection[int]) -> None:
        """Drop whatever the jobs ``job_ids`` (completed: never read again) left staged."""

    def open_table_load(self, pipeline: PipelineDefinition, destination: Destination,
                        schema: TableSchema, *, widen: bool) -> TableLoad:
        """``widen``: give the destination table the columns of ``schema`` first."""

    def open_reader(self, pipeline: PipelineDefinition, destination: Destination
                    ) -> AbstractContextManager[TableReader]:
        """A reader on a connection of its own, closed with the block."""

    def position_row(self, pipeline: PipelineDefinition, destination: Destination
                     ) -> PositionRow: ...


class PositionRow(Protocol):
    """A pipeline's row in a destination's positions table (engines that keep their position
    with the data): the position it has committed and the load state document."""

    def read(self) -> tuple[int, dict[str, Any]] | None: ...

    def write_start(self, slot_name: str, lsn: int, loads: dict[str, Any]) -> None: ...

    def write_loads(self, loads: dict[str, Any]) -> None: ...

    def delete(self) -> bool: ...


def change_as_text(converters: Mapping[str, Converter], event: ChangeEvent,
                   is_unchanged: Callable[[Any], bool]) -> dict[str, Any]:
    """The change with every value in its text form (unchanged TOAST values left out, so a
    replay keeps the destination's value), as JSON for the config store."""

    def as_text(values: dict[str, Any] | None) -> dict[str, str | None] | None:
        if values is None:
            return None
        return {name: None if value is None else converters[name](value)
                for name, value in values.items()
                if name in converters and not is_unchanged(value)}

    return {"table": event.table.qualified, "op": event.op, "before": as_text(event.before),
            "after": as_text(event.after), "source_ts_ms": event.source_ts_ms,
            "lsn": event.lsn, "xid": event.xid, "commit_lsn": event.commit_lsn}


def destination_kind(destination: Destination) -> DestinationKind:
    """The implementation for ``destination`` (imported only when used)."""
    if destination.kind == "duckdb":
        from rosetta_dagster.core.destination.duckdb import DUCKDB

        return DUCKDB
    if destination.kind == "snowflake":
        from rosetta_dagster.core.destination.snowflake import SNOWFLAKE

        return SNOWFLAKE
    from rosetta_dagster.core.destination.postgres import POSTGRES

    return POSTGRES
