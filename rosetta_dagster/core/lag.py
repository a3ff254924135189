"""Replication lag, measured on the source for either engine, running or paused.

* **Time**: 0 when the slot holds no committed transaction of the pipeline's tables that the
  destinations do not have; otherwise the age of the oldest such commit. The slot is never
  touched: a temporary copy of it (``pg_copy_logical_replication_slot``) is peeked with the
  pipeline's publication (logical messages, i.e. heartbeats and backfill watermarks, left out),
  and a transaction counts as pending when both its commit LSN and its commit time are past
  what the stream last reported applied (an engine that reports change LSNs rather than commit
  LSNs, Debezium, is covered by the time; the LSN covers commits within the same millisecond).
* **Bytes**: the source's current WAL position minus the position applied (the newer of the
  slot's confirmed flush position and the one the stream reported).

Pure Python; the health checks, the WAL monitor sensor and ``rosetta validate`` call it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg2
import psycopg2.extensions

from rosetta_dagster.core.pipeline_config import PipelineDefinition

# Changes decoded per peek, growing only while the peek found nothing pending (applied changes
# the slot has not been told about yet come first): a backlog costs the first few, not all.
PEEK_CHANGE_LIMITS = (1_000, 20_000, 200_000)
PEEK_TIMEOUT_MS = 15_000
_POSTGRES_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_BEGIN = struct.Struct(">cqqI")  # 'B', final (commit) LSN, commit time (µs since 2000), xid


@dataclass(frozen=True)
class LagReading:
    """One measurement. ``seconds`` is None when it could not be measured (``note`` says why)."""

    seconds: float | None
    bytes: int | None
    oldest_pending_commit_at: datetime | None = None
    pending_transactions: int = 0
    note: str | None = None

    def as_metadata(self) -> dict[str, float | int | str]:
        values: dict[str, float | int | str | None] = {
            "lag_bytes": self.bytes, "pending_transactions": self.pending_transactions,
            "oldest_pending_commit_at": (self.oldest_pending_commit_at.isoformat()
                                         if self.oldest_pending_commit_at else None),
            "measurement_note": self.note,
        }
        return {k: v for k, v in values.items() if v is not None}


def measure_lag(
    conn: psycopg2.extensions.connection,
    pipeline: PipelineDefinition,
    applied_at: datetime | None,
    applied_lsn: int | None,
    now: datetime | None = None,
) -> LagReading:
    """Lag of ``pipeline`` on its source (``conn``: an autocommit connection of its own, since
    the temporary slot copy lives until the connection closes or is dropped here)."""
    with conn.cursor() as cursor:
        cursor.execute(
            "SELECT confirmed_flush_lsn - '0/0'::pg_lsn, pg_current_wal_lsn() - '0/0'::pg_lsn, "
            "pg_backend_pid() FROM (SELECT 1) one LEFT JOIN pg_replication_slots s "
            "ON s.slot_name = %s AND s.database = current_database()",
            (pipeline.slot_name,),
        )
        confirmed, current, pid = cursor.fetchone()  # type: ignore[misc]
    if confirmed is None:
        return LagReading(None, None, note=f"replication slot {pipeline.slot_name} does not exist")
    applied = max(int(confirmed), applied_lsn or 0)
    lag_bytes = max(0, int(current) - applied)
    now = now or datetime.now(UTC)
    try:
        with _slot_copy(conn, pipeline.slot_name, f"rosettalag_{pid}") as peek:
            for limit in PEEK_CHANGE_LIMITS:
                begins, decoded = peek(pipeline.publication_names, limit)
                pending = [
                    commit_at for commit_lsn, commit_at in begins
                    if (applied_lsn is None or commit_lsn > applied_lsn)
                    and (applied_at is None or commit_at > applied_at)
                ]
                if pending:
                    oldest = min(pending)
                    return LagReading(max(0.0, (now - oldest).total_seconds()), lag_bytes,
                                      oldest, len(pending))
                if decoded < limit:  # the slot had nothing more to decode: nothing pending
                    return LagReading(0.0, lag_bytes)
    except psycopg2.Error as exc:
        # No free slot, a publication not created yet, a timeout: the bytes still stand.
        reason = (exc.diag.message_primary or str(exc)).strip()
        return LagReading(None, lag_bytes, note=f"lag not measured: {reason}")
    return LagReading(None, lag_bytes, note=(
        f"lag not measured: more than {PEEK_CHANGE_LIMITS[-1]} applied changes not yet "
        "confirmed to the slot"))


Peek = Callable[[str, int], tuple[list[tuple[int, datetime]], int]]


@contextmanager
def _slot_copy(conn: psycopg2.extensions.connection, slot: str, copy: str) -> Iterator[Peek]:
    """A temporary copy of ``slot`` (dropped on leaving) and a peek at it: (commit LSN, commit
    time) of the first transactions it would send, and how many changes were decoded. Peeking
    consumes nothing, so one copy serves every peek of a measurement."""
    with conn.cursor() as cursor:
        def peek(publication: str, limit: int) -> tuple[list[tuple[int, datetime]], int]:
            cursor.execute(
                "SELECT count(*), coalesce(array_agg(substring(data FROM 1 FOR 21)) "
                "FILTER (WHERE get_byte(data, 0) = 66), '{}') "
                "FROM pg_logical_slot_peek_binary_changes(%s, NULL, %s, 'proto_version', '1', "
                "'publication_names', %s)",
                (copy, limit, publication),
            )
            decoded, raw = cursor.fetchone()  # type: ignore[misc]
            begins = []
            for message in raw:
                _, commit_lsn, commit_us, _ = _BEGIN.unpack(bytes(message))
                begins.append((commit_lsn, _POSTGRES_EPOCH + timedelta(microseconds=commit_us)))
            return begins, int(decoded)

        cursor.execute("SET statement_timeout = %s", (PEEK_TIMEOUT_MS,))
        try:
            cursor.execute("SELECT pg_copy_logical_replication_slot(%s, %s, true)", (slot, copy))
            try:
                yield peek
            finally:
                cursor.execute("SELECT pg_drop_replication_slot(%s)", (copy,))
        finally:
            cursor.execute("RESET statement_timeout")
