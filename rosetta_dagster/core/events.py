"""Change events as every capture engine hands them to the streaming session."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from rosetta_dagster.core.pipeline_config import TableRef

# pg_logical_emit_message prefix of backfill watermarks (see rosetta_dagster.core.backfill).
BACKFILL_MESSAGE_PREFIX = "rosetta_backfill"
# pg_logical_emit_message prefix of the heartbeat that keeps an idle slot moving.
HEARTBEAT_MESSAGE_PREFIX = "rosetta_heartbeat"


def parse_lsn(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


class _Unchanged:
    """An unchanged TOAST value the source did not send: the destination keeps its value."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNCHANGED_TOAST"


UNCHANGED_TOAST = _Unchanged()


@dataclass(frozen=True, slots=True)
class Delivery:
    """Where a record stands in what an engine delivers again after a restart (Debezium
    resumes after its last stored offset): the identity of the record's offset, which the
    records of one WAL record share (a COPY page, a key move's two halves), and the record's
    ordinal among consecutive records of that identity. The same record gets the same
    delivery when it is delivered again (see core.streaming.redelivery)."""

    record: str
    ordinal: int


@dataclass(slots=True)  # not frozen: created per change, and a frozen __init__ costs ~3x
class ChangeEvent:
    """One row change. ``op`` is c(reate), u(pdate), d(elete), r(ead: snapshot), t(runcate) or
    s(chema: column types of the table changed on the source; no row). Never modified once
    created."""

    table: TableRef
    op: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    source_ts_ms: int | None = None
    lsn: int | None = None
    xid: int | None = None  # source transaction id (32-bit, as in the WAL)
    # Debezium's source.snapshot: "first", "true", "last", "*_in_data_collection" while the
    # initial snapshot runs; "false" (or "incremental") once streaming.
    snapshot: str = "false"
    # LSN of the transaction's commit record (engines that keep positions with the data):
    # a destination whose position is past it already has this change.
    commit_lsn: int | None = None
    # Engines that deliver again after a restart, in pipelines with tables without a key:
    # the change's place in what the engine delivers (see Delivery).
    delivery: Delivery | None = None

    @property
    def from_snapshot(self) -> bool:
        return self.snapshot not in ("false", "incremental")

    @property
    def carries_row(self) -> bool:
        return self.op not in ("t", "s")

    @property
    def is_delete(self) -> bool:
        return self.op == "d"

    @property
    def row(self) -> dict[str, Any]:
        """The values that identify the row: ``after``, or ``before`` for a delete."""
        values = self.before if self.op == "d" else self.after
        return values or {}


@dataclass(frozen=True, slots=True)
class PositionMarker:
    """A heartbeat record or logical message: no row, but the stream has reached the source
    time ``source_ts_ms``. Both only exist once the snapshot (if any) is over."""

    source_ts_ms: int | None


@dataclass(frozen=True, slots=True)
class Watermark:
    """A backfill chunk's low or high watermark, in the stream's commit order."""

    job_id: int
    chunk: int
    kind: str  # "low" | "high"
    table: TableRef
    last_key: list[Any] | None = None  # high only: the chunk's last key (resume point)
    rows: int = 0  # high only: rows staged for the chunk
    source_ts_ms: int | None = None
    # high only: the chunk covers after_key < key <= last_key (None: open); bounds_known is
    # False for watermarks written before chunks carried their lower bound.
    after_key: list[Any] | None = None
    bounds_known: bool = False
    row_filter: list[dict[str, Any]] | None = None  # high only: the job's filter
    # high only, a table without a key: the transactions the chunk's snapshot saw
    # (``xmin:xmax:xip``); the window's changes of the others are applied after the chunk.
    visibility: str | None = None


def watermark_from_message(content: bytes, source_ts_ms: int | None) -> Watermark:
    """A backfill watermark from its logical message's content (JSON, see core.backfill)."""
    body = orjson.loads(content)
    return Watermark(
        job_id=int(body["job"]), chunk=int(body["chunk"]), kind=body["kind"],
        table=TableRef.parse(body["table"]), last_key=body.get("last_key"),
        rows=int(body.get("rows", 0)), source_ts_ms=source_ts_ms,
        after_key=body.get("after_key"), bounds_known="after_key" in body,
        row_filter=body.get("filter"), visibility=body.get("snapshot"),
    )

