"""A pipeline's replication slot on its source: readings for the WAL monitor, and the one
situation in which a Debezium offset file is deleted (its slot is gone).

Pure Python; the Dagster sensors and the streaming session both call into it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager as ContextManager
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import psycopg2
import psycopg2.extensions
from psycopg2.extras import LogicalReplicationConnection

from rosetta_dagster.core.config_store import ConfigStore
from rosetta_dagster.core.dsn import pinned_options, summarize_connection_error
from rosetta_dagster.core.errors import DatabaseConnectionError
from rosetta_dagster.core.pipeline_config import (
    Destination,
    OperationsSettings,
    PipelineDefinition,
    PostgresEndpoint,
    TableRef,
)

if TYPE_CHECKING:
    from rosetta_dagster.core.capture import PositionStore
    from rosetta_dagster.core.table_schema import TableSchema

logger = logging.getLogger("rosetta.replication")

Log = logging.Logger | logging.LoggerAdapter[logging.Logger]


class WalSeverity(StrEnum):
    OK = "OK"
    WARNING = "WARNING"
    CRITICAL = "CRITICAL"
    MISSING = "MISSING"  # the pipeline has no slot on its source


@dataclass(frozen=True)
class SlotReading:
    pipeline: str
    source: str
    slot_name: str
    exists: bool
    current_lsn: str
    active: bool | None = None
    wal_status: str | None = None  # reserved / extended / unreserved / lost
    confirmed_flush_lsn: str | None = None
    retained_wal_bytes: int | None = None  # current LSN - restart_lsn: WAL the slot pins
    lag_bytes: int | None = None  # current LSN - confirmed_flush_lsn: not yet confirmed

    def severity(self, operations: OperationsSettings) -> WalSeverity:
        if not self.exists:
            return WalSeverity.MISSING
        retained = self.retained_wal_bytes or 0
        if retained > operations.wal_critical_bytes:
            return WalSeverity.CRITICAL
        if retained > operations.wal_warning_bytes:
            return WalSeverity.WARNING
        return WalSeverity.OK


def format_bytes(size: int | None) -> str:
    if size is None:
        return "n/a"
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def application_name(*parts: str) -> str:
    """What a Rosetta session shows in pg_stat_activity (PostgreSQL keeps 63 bytes)."""
    return " ".join(("rosetta", *parts))[:63]


def stream_application_name(pipeline: PipelineDefinition) -> str:
    return application_name("stream", pipeline.name)


def _connect(
    pipeline: PipelineDefinition,
    role: str,
    endpoint: PostgresEndpoint,
    connection_factory: type[psycopg2.extensions.connection] | None = None,
) -> psycopg2.extensions.connection:
    """An autocommit connection; a failure is one sentence naming pipeline, role and address."""
    try:
        conn = psycopg2.connect(endpoint.dsn(), connect_timeout=10,
                                application_name=application_name(pipeline.name, role),
                                options=pinned_options(), client_encoding="UTF8",
                                connection_factory=connection_factory)
    except psycopg2.OperationalError as exc:
        raise DatabaseConnectionError(
            f"Pipeline {pipeline.name}: could not connect to {role} {endpoint.name} at "
            f"{endpoint.description}: {summarize_connection_error(exc)}."
        ) from None
    if connection_factory is None:  # replication connections are autocommit by design
        conn.autocommit = True
    return conn


def connect_source(pipeline: PipelineDefinition) -> psycopg2.extensions.connection:
    return _connect(pipeline, "source", pipeline.source)


def connect_source_replication(pipeline: PipelineDefinition) -> psycopg2.extensions.connection:
    """A logical replication connection to the source (for CREATE_REPLICATION_SLOT)."""
    return _connect(pipeline, "source", pipeline.source, LogicalReplicationConnection)


def connect_destination(
    pipeline: PipelineDefinition, destination: Destination
) -> psycopg2.extensions.connection:
    return _connect(pipeline, "destination", destination)


@contextmanager
def _closing(conn: psycopg2.extensions.connection) -> Iterator[psycopg2.extensions.connection]:
    try:
        yield conn
    finally:
        conn.close()


def source_connection(pipeline: PipelineDefinition) -> ContextManager[psycopg2.extensions.connection]:
    """An autocommit connection to the pipeline's source, closed after the block."""
    return _closing(connect_source(pipeline))


def read_source_schema(pipeline: PipelineDefinition, table: TableRef) -> TableSchema:
    """``table`` as the pipeline replicates it, read from the source's catalog now."""
    from rosetta_dagster.core.table_schema import read_table_schema

    with source_connection(pipeline) as conn:
        return read_table_schema(conn, table, f"source {pipeline.source.name}",
                                 pipeline.options(table))


def destination_connection(
    pipeline: PipelineDefinition, destination: Destination
) -> ContextManager[psycopg2.extensions.connection]:
    """An autocommit connection to one of the pipeline's destinations, closed after the block."""
    return _closing(connect_destination(pipeline, destination))


def slot_exists(conn: psycopg2.extensions.connection, slot_name: str) -> bool:
    with conn.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot_name,))
        return cursor.fetchone() is not None


def slot_confirmed_lsn(conn: psycopg2.extensions.connection, slot_name: str) -> int | None:
    """The slot's confirmed flush position as an integer LSN; None without such a slot."""
    with conn.cursor() as cursor:
        cursor.execute(
            "SELECT confirmed_flush_lsn - '0/0'::pg_lsn FROM pg_replication_slots "
            "WHERE slot_name = %s", (slot_name,),
        )
        row = cursor.fetchone()
    return None if row is None or row[0] is None else int(row[0])


def read_slot(conn: psycopg2.extensions.connection, pipeline: PipelineDefinition) -> SlotReading:
    """One reading of the pipeline's own slot (by name, on its own source database)."""
    with conn.cursor() as cursor:
        cursor.execute(
            """
            SELECT pg_current_wal_lsn()::text, s.active, s.wal_status,
                   s.confirmed_flush_lsn::text,
                   pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint,
                   pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint
            FROM (SELECT 1) one
            LEFT JOIN pg_replication_slots s ON s.slot_name = %s AND s.database = current_database()
            """,
            (pipeline.slot_name,),
        )
        row: Any = cursor.fetchone()
    current_lsn, active, wal_status, confirmed, retained, lag = row
    return SlotReading(
        pipeline=pipeline.name,
        source=pipeline.source.name,
        slot_name=pipeline.slot_name,
        exists=active is not None,
        current_lsn=current_lsn,
        active=active,
        wal_status=wal_status,
        confirmed_flush_lsn=confirmed,
        retained_wal_bytes=retained,
        lag_bytes=lag,
    )


def record_reading(
    store: ConfigStore, reading: SlotReading, operations: OperationsSettings, log: Log = logger
) -> WalSeverity:
    """Store a reading in ``wal_monitor`` and log one line with its ``wal_size``."""
    severity = reading.severity(operations)
    store.record_wal_reading(
        source=reading.source,
        slot_name=reading.slot_name,
        status=severity.value,
        pipeline=reading.pipeline,
        current_lsn=reading.current_lsn,
        confirmed_flush_lsn=reading.confirmed_flush_lsn,
        retained_wal_bytes=reading.retained_wal_bytes,
        lag_bytes=reading.lag_bytes,
        active=reading.active,
        wal_status=reading.wal_status,
    )
    line = (
        f"WAL monitor: pipeline {reading.pipeline} slot {reading.slot_name} on source "
        f"{reading.source}: wal_size={format_bytes(reading.retained_wal_bytes)} "
        f"unconfirmed={format_bytes(reading.lag_bytes)} active={reading.active} "
        f"wal_status={reading.wal_status} -> {severity.value}"
    )
    if severity is WalSeverity.CRITICAL:
        log.error("%s (critical above %d MB)", line, operations.wal_critical_mb)
    elif severity is WalSeverity.WARNING:
        log.warning("%s (warning above %d MB)", line, operations.wal_warning_mb)
    else:
        log.info("%s", line)
    return severity


def delete_stale_offset(
    pipeline: PipelineDefinition,
    positions: PositionStore,
    *,
    reason: str,
    config_store: ConfigStore | None,
    log: Log = logger,
) -> bool:
    """Forget the stream position of a pipeline whose slot is gone. The only deletion of it.

    A stale position would make the stream resume from a position the new slot never had,
    silently skipping every change in between; without it the pipeline loads afresh.
    """
    if not positions.exists():
        return False
    positions.delete(log)
    if config_store is not None:
        config_store.record_offset_cleanup(
            pipeline=pipeline.name,
            offset_file=positions.location,
            slot_name=pipeline.slot_name,
            reason=reason,
        )
    return True


def missing_slot_reason(pipeline: PipelineDefinition) -> str:
    return (
        f"replication slot {pipeline.slot_name} no longer exists on source {pipeline.source.name}"
    )


def reading_metadata(reading: SlotReading) -> Mapping[str, Any]:
    """Numeric values of a reading (for plots); absent values are left out."""
    values = {
        "retained_wal_bytes": reading.retained_wal_bytes,
        "unconfirmed_wal_bytes": reading.lag_bytes,
        "active": None if reading.active is None else int(reading.active),
    }
    return {key: value for key, value in values.items() if value is not None}
