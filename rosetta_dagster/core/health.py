"""The checklist's success criteria and alert thresholds as checks over real data.

Pure Python: the Dagster asset checks and ``rosetta validate`` both evaluate these. Every
outcome carries the measured value and its threshold, so the UI can plot its history.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from rosetta_dagster.core.apply.errors import RefusedChange
from rosetta_dagster.core.apply.schema import (
    TableSchema,
    exact_select,
    read_table_schema,
    replicated_rows,
)
from rosetta_dagster.core.config_store import ConfigStore, Pipeline, PipelineStatus
from rosetta_dagster.core.errors import DatabaseConnectionError
from rosetta_dagster.core.lag import LagReading, measure_lag
from rosetta_dagster.core.pipeline_config import (
    Destination,
    OperationsSettings,
    PipelineDefinition,
    TableRef,
)
from rosetta_dagster.core.replication import (
    SlotReading,
    WalSeverity,
    destination_connection,
    read_slot,
    source_connection,
)

Severity = Literal["WARN", "ERROR"]


@dataclass(frozen=True)
class KeyRange:
    """Where a table differs from its source, as a backfill can take it: the first key
    column's values from ``first`` through ``last`` (PostgreSQL's text of each)."""

    table: TableRef
    column: str
    first: str
    last: str

    def backfill_filter(self) -> list[dict[str, object]]:
        return [{"column": self.column, "operator": "between", "value": [self.first, self.last]}]

    def command(self, pipeline: str) -> str:
        """The one command that requests the repair."""
        return shlex.join(["rosetta", "backfill", "request", pipeline, self.table.qualified,
                           "--key-range", self.column, self.first, self.last])


@dataclass(frozen=True)
class CheckOutcome:
    name: str
    passed: bool
    severity: Severity  # how bad a failure is (meaningless when passed)
    description: str
    metadata: dict[str, float | int | str] = field(default_factory=dict)
    differing: KeyRange | None = None  # content_parity: the range to repair


def _threshold_outcome(
    name: str, value: float, warning: float, critical: float, what: str, unit: str = ""
) -> CheckOutcome:
    """Fails WARN above ``warning`` and ERROR above ``critical``."""
    metadata: dict[str, float | int | str] = {
        "value": value, "warning_threshold": warning, "critical_threshold": critical,
    }
    if value > critical:
        return CheckOutcome(name, False, "ERROR", f"{what} is {value:g}{unit} (> {critical:g}{unit}).",
                            metadata)
    if value > warning:
        return CheckOutcome(name, False, "WARN", f"{what} is {value:g}{unit} (> {warning:g}{unit}).",
                            metadata)
    return CheckOutcome(name, True, "WARN", f"{what} is {value:g}{unit}.", metadata)


# -- destination tables -------------------------------------------------------------------


_EVERY_ROW = sql.SQL("TRUE")


def _count(conn: psycopg2.extensions.connection, relation: sql.Composable,
           condition: sql.Composable = _EVERY_ROW) -> int:
    with conn.cursor() as cursor:
        cursor.execute(sql.SQL("SELECT count(*) FROM {} WHERE {}").format(relation, condition),
                       ())  # () : see replicated_rows
        return int(cursor.fetchone()[0])  # type: ignore[index]


def _counts_within_window(
    count_source: Callable[[], int], count_destination: Callable[[], int], window_s: float,
    sleep: Callable[[float], None],
) -> tuple[int, int]:
    """Both counts, re-taken each second until equal or ``window_s`` passed (rows in flight)."""
    deadline = time.monotonic() + window_s
    while True:
        source_rows, destination_rows = count_source(), count_destination()
        if source_rows == destination_rows or time.monotonic() >= deadline:
            return source_rows, destination_rows
        sleep(1.0)


def row_count_parity(
    source: psycopg2.extensions.connection,
    destination: psycopg2.extensions.connection,
    table: TableSchema,
    target: sql.Composable,
    window_s: float,
    sleep: Callable[[float], None] = time.sleep,
) -> CheckOutcome:
    """Counts equal, allowing rows in flight: re-counted each second for up to ``window_s``.
    The source's rows are those the table's row filter replicates; ``target``: the
    destination table."""
    source_rows, destination_rows = _counts_within_window(
        lambda: _count(source, table.source_sql, table.source_filter),
        lambda: _count(destination, target), window_s, sleep)
    difference = destination_rows - source_rows
    metadata: dict[str, float | int | str] = {
        "value": abs(difference), "threshold": 0, "source_rows": source_rows,
        "destination_rows": destination_rows, "difference": difference,
        "lag_window_seconds": window_s,
    }
    if difference == 0:
        return CheckOutcome("row_count_parity", True, "ERROR",
                            f"{source_rows} rows on both sides.", metadata)
    return CheckOutcome(
        "row_count_parity", False, "ERROR",
        f"Source has {source_rows} rows, destination {destination_rows} (difference {difference:+d}) "
        f"after waiting {window_s:g}s for rows in flight.", metadata,
    )


def _row_hashes(
    conn: psycopg2.extensions.connection,
    relation: sql.Composable,
    table: TableSchema,
    after: tuple[Any, ...] | None,
    through: tuple[Any, ...] | None,
    limit: int | None,
    condition: sql.Composable = _EVERY_ROW,
) -> list[tuple[tuple[Any, ...], str]]:
    """``(key, md5 of the row's text)`` in key order, for keys in (after, through], of the
    table's replicated columns."""
    keys = sql.SQL(", ").join(sql.Identifier(k) for k in table.primary_key)
    key_row = sql.SQL("ROW({})").format(keys)
    conditions: list[sql.Composable] = [condition]
    params: list[Any] = []
    if after is not None:
        conditions.append(sql.SQL("{} > ROW({})").format(
            key_row, sql.SQL(", ").join(sql.Placeholder() * len(after))))
        params.extend(after)
    if through is not None:
        conditions.append(sql.SQL("{} <= ROW({})").format(
            key_row, sql.SQL(", ").join(sql.Placeholder() * len(through))))
        params.extend(through)
    query = sql.SQL("SELECT {keys}, md5(ROW({columns})::text) FROM {table} {where} ORDER BY {keys}"
                    ).format(
        keys=keys,
        columns=sql.SQL(", ").join(exact_select(c) for c in table.columns),
        table=relation,
        where=sql.SQL("WHERE ") + sql.SQL(" AND ").join(conditions),
    )
    if limit is not None:
        query = query + sql.SQL(" LIMIT {}").format(sql.Literal(limit))
    width = len(table.primary_key)
    with conn.cursor() as cursor:
        cursor.execute(query, params)
        return [(tuple(row[:width]), row[width]) for row in cursor.fetchall()]


def _digest(rows: Sequence[tuple[tuple[Any, ...], str]]) -> str:
    return hashlib.md5("".join(h for _, h in rows).encode(), usedforsecurity=False).hexdigest()


def content_parity(
    source: psycopg2.extensions.connection,
    destination: psycopg2.extensions.connection,
    table: TableSchema,
    target: sql.Composable,
    chunk_rows: int,
    window_s: float,
    sleep: Callable[[float], None] = time.sleep,
    pipeline: str | None = None,
) -> CheckOutcome:
    """Ordered checksum over every column, chunk by chunk of primary keys on both sides.

    A differing chunk is re-read for up to ``window_s`` (changes in flight); if it still differs
    the first differing key range is reported, with its first differing keys and (given the
    ``pipeline``) the command that repairs it.
    """
    after: tuple[Any, ...] | None = None
    chunks = rows = 0
    while True:
        source_chunk = _row_hashes(source, table.source_sql, table, after, None, chunk_rows,
                                   table.source_filter)
        through = source_chunk[-1][0] if len(source_chunk) == chunk_rows else None
        deadline = time.monotonic() + window_s
        while True:
            destination_chunk = _row_hashes(destination, target, table, after, through, None)
            if _digest(source_chunk) == _digest(destination_chunk) or time.monotonic() >= deadline:
                break
            sleep(1.0)
            source_chunk = _row_hashes(source, table.source_sql, table, after, through, None,
                                       table.source_filter)
        if _digest(source_chunk) != _digest(destination_chunk):
            differing = _differences(source_chunk, destination_chunk)
            # The keys the chunk really holds on either side: both ends are real keys.
            keys = [key for key, _ in (*source_chunk, *destination_chunk)]
            low, high = min(keys), max(keys)
            repair = KeyRange(table.table, table.primary_key[0], _text(low[0]), _text(high[0]))
            metadata: dict[str, float | int | str] = {
                "value": 1, "threshold": 0, "chunks_compared": chunks, "rows_compared": rows,
                "first_differing_key": _fmt(differing[0]),
                "first_differing_keys": "; ".join(_fmt(k) for k in differing[:5]),
                "differing_rows_in_range": len(differing),
                "range_start": _fmt(low), "range_end": _fmt(high),
            }
            description = (f"Rows differ in key range [{_fmt(low)}, {_fmt(high)}]; first "
                           f"differing key {_fmt(differing[0])}.")
            if pipeline is not None:
                metadata["repair_command"] = repair.command(pipeline)
                description += f" Repair: {repair.command(pipeline)}"
            return CheckOutcome("content_parity", False, "ERROR", description, metadata,
                                differing=repair)
        chunks += 1
        rows += len(source_chunk)
        if through is None:
            return CheckOutcome("content_parity", True, "ERROR",
                                f"{rows} rows identical in {chunks} chunk(s).",
                                {"value": 0, "threshold": 0, "chunks_compared": chunks,
                                 "rows_compared": rows})
        after = through


def _differences(
    source: Sequence[tuple[tuple[Any, ...], str]], destination: Sequence[tuple[tuple[Any, ...], str]]
) -> list[tuple[Any, ...]]:
    """The keys whose rows differ (or exist on one side only), in key order."""
    source_map, destination_map = dict(source), dict(destination)
    return sorted(k for k in source_map.keys() | destination_map.keys()
                  if source_map.get(k) != destination_map.get(k))


def _text(value: Any) -> str:
    """A key value as PostgreSQL reads it back (for a command line)."""
    if isinstance(value, memoryview | bytes):
        return "\\x" + bytes(value).hex()
    return str(value)


def _fmt(key: tuple[Any, ...] | None) -> str:
    """A key for messages (one column: the value; several: a tuple)."""
    if key is None:
        return "none"
    return str(key[0]) if len(key) == 1 else "(" + ", ".join(str(part) for part in key) + ")"


def replication_lag(
    pipeline: Pipeline, operations: OperationsSettings, reading: LagReading
) -> CheckOutcome:
    """The age of the oldest source commit the destinations do not have, 0 when none is
    pending (core.lag). Judged only while the pipeline is START; measured always."""
    if reading.seconds is None:
        metadata: dict[str, float | int | str] = {
            "value": 0, "warning_threshold": operations.lag_warning_seconds,
            "critical_threshold": operations.lag_critical_seconds, **reading.as_metadata()}
        return CheckOutcome("replication_lag", False, "WARN",
                            f"Replication lag of pipeline {pipeline.name} is unknown: "
                            f"{reading.note}.", metadata)
    lag = round(reading.seconds, 1)
    outcome = _threshold_outcome("replication_lag", lag, operations.lag_warning_seconds,
                                 operations.lag_critical_seconds, "Replication lag", "s")
    outcome.metadata.update(reading.as_metadata())
    if pipeline.status is not PipelineStatus.START:
        return dataclasses.replace(
            outcome, passed=True, severity="WARN",
            description=f"Pipeline {pipeline.name} is paused: lag {lag:g}s "
                        f"({reading.pending_transactions} pending transaction(s)) not judged.")
    return outcome


def measure_and_record_lag(
    pipeline: PipelineDefinition, store: ConfigStore | None,
    applied_at: datetime | None, applied_lsn: int | None,
) -> LagReading:
    """Measure on a connection of its own and keep the reading for /metrics and the API; a
    source that cannot be reached gives an unmeasured reading, not an error."""
    try:
        with source_connection(pipeline) as conn:
            reading = measure_lag(conn, pipeline, applied_at, applied_lsn)
    except DatabaseConnectionError as exc:
        reading = LagReading(None, None, note=f"lag not measured: {exc}")
    if store is not None:
        store.record_lag(pipeline.name, reading)
    return reading


def apply_errors(pipeline: Pipeline, since: datetime, destination: str, table: TableRef
                 ) -> CheckOutcome:
    """ERROR when the pipeline stopped on a change of this table that this destination refused
    (the report as metadata), or failed otherwise since ``since``."""
    report = pipeline.last_apply_error
    if report is not None:
        refused = RefusedChange.from_dict(report)
        if (refused.destination, refused.table) == (destination, table.qualified):
            metadata: dict[str, float | int | str] = {"value": 1, "threshold": 0}
            metadata.update({k: json.dumps(v) if isinstance(v, dict) else str(v)
                             for k, v in report.items() if v is not None})
            return CheckOutcome("apply_errors", False, "ERROR", refused.sentence(), metadata)
        return CheckOutcome("apply_errors", True, "ERROR",
                            f"Pipeline {pipeline.name} stopped on a change of {refused.table} "
                            f"on {refused.destination}, not of this table.",
                            {"value": 0, "threshold": 0})
    failed = pipeline.last_error_at is not None and pipeline.last_error_at > since
    metadata = {"value": int(failed), "threshold": 0}
    if failed:
        return CheckOutcome("apply_errors", False, "ERROR",
                            f"Pipeline {pipeline.name} failed at "
                            f"{pipeline.last_error_at:%Y-%m-%d %H:%M:%S}: {pipeline.last_error}",
                            metadata)
    return CheckOutcome("apply_errors", True, "ERROR", "No failed batch.", metadata)


def parked_events(pipeline: str, destination: str, table: TableRef, parked: int) -> CheckOutcome:
    """ERROR while changes of this table wait parked for this destination."""
    metadata: dict[str, float | int | str] = {"value": parked, "threshold": 0}
    if parked:
        return CheckOutcome("parked_events", False, "ERROR",
                            f"{parked} change(s) of {table.qualified} are parked for destination "
                            f"{destination}: `rosetta parked list --pipeline {pipeline}`, then "
                            "retry or discard them.", metadata)
    return CheckOutcome("parked_events", True, "ERROR", "Nothing parked.", metadata)


# -- replication slots ------------------------------------------------------------------


def slot_active(reading: SlotReading, pipeline: Pipeline) -> CheckOutcome:
    metadata: dict[str, float | int | str] = {"value": int(bool(reading.active)), "threshold": 1,
                                              "exists": int(reading.exists)}
    if pipeline.status is not PipelineStatus.START:
        return CheckOutcome("slot_active", True, "ERROR",
                            f"Pipeline {pipeline.name} is paused: the slot may be inactive.", metadata)
    if not reading.exists:
        return CheckOutcome("slot_active", False, "ERROR",
                            f"Slot {reading.slot_name} does not exist on {reading.source}.", metadata)
    if not reading.active:
        return CheckOutcome("slot_active", False, "WARN",
                            f"Slot {reading.slot_name} exists but no stream reads it.", metadata)
    return CheckOutcome("slot_active", True, "ERROR", f"Slot {reading.slot_name} is active.",
                        metadata)


def retained_wal(reading: SlotReading, operations: OperationsSettings) -> CheckOutcome:
    """Checklist "Debezium WAL lag": WARN > wal_warning_mb, ERROR > wal_critical_mb."""
    if reading.severity(operations) is WalSeverity.MISSING:
        return CheckOutcome("retained_wal", False, "WARN",
                            f"Replication slot {reading.slot_name} does not exist on {reading.source}.",
                            {"value": 0, "warning_threshold": operations.wal_warning_bytes,
                             "critical_threshold": operations.wal_critical_bytes})
    return _threshold_outcome("retained_wal", reading.retained_wal_bytes or 0,
                              operations.wal_warning_bytes, operations.wal_critical_bytes,
                              f"WAL retained by {reading.slot_name}", " bytes")


# -- the config store's pools --------------------------------------------------------------


CHECKLIST_POOL_SIZE = 10  # the checklist's "> 8 / > 9 active" are out of a pool of 10


def pool_utilisation(store: ConfigStore, operations: OperationsSettings) -> CheckOutcome:
    """Checklist "Connection pool size" (WARN > 8, ERROR > 9 active of 10), applied to each
    pool of each process (every stream, the daemon's sensors, the API) as a share of that
    pool's size, from what the pools report; the busiest pool decides."""
    warning = 100 * operations.pool_warning_connections / CHECKLIST_POOL_SIZE
    critical = 100 * operations.pool_critical_connections / CHECKLIST_POOL_SIZE
    pools = store.pool_usage()
    metadata: dict[str, float | int | str] = {"value": 0.0, "pools": len(pools),
                                              "warning_threshold": warning,
                                              "critical_threshold": critical}
    if not pools:
        return CheckOutcome("pool_utilisation", True, "WARN",
                            "No connection pool reported its use in the last 5 minutes.", metadata)
    busiest = pools[0]
    percent = round(100 * busiest["peak_in_use"] / busiest["max_conn"], 1)
    metadata.update(value=percent, busiest_pool=busiest["pool"], busiest_owner=busiest["owner"],
                    busiest_process=busiest["process"], peak_in_use=busiest["peak_in_use"],
                    max_conn=busiest["max_conn"])
    text = (f"The busiest of {len(pools)} pool(s), {busiest['pool']} of {busiest['owner']} "
            f"({busiest['process']}), had {busiest['peak_in_use']} of {busiest['max_conn']} "
            f"connections in use at once ({percent:g}%)")
    if percent > critical:
        return CheckOutcome("pool_utilisation", False, "ERROR", f"{text}, above {critical:g}%.",
                            metadata)
    if percent > warning:
        return CheckOutcome("pool_utilisation", False, "WARN", f"{text}, above {warning:g}%.",
                            metadata)
    return CheckOutcome("pool_utilisation", True, "WARN", f"{text}.", metadata)


@dataclass(frozen=True)
class ServerConnections:
    """Client sessions on one PostgreSQL server against its ``max_connections``."""

    server: str  # what Rosetta calls it: config_db, source <name>, destination <name>
    address: str  # host:port
    sessions: int
    max_connections: int

    @property
    def percent(self) -> float:
        return round(100 * self.sessions / self.max_connections, 1)


def read_server_connections(
    conn: psycopg2.extensions.connection, server: str, address: str
) -> ServerConnections:
    with conn.cursor() as cursor:
        # Client backends only: walsenders have their own limit (max_wal_senders).
        cursor.execute("SELECT count(*) FILTER (WHERE backend_type = 'client backend'), "
                       "current_setting('max_connections')::int FROM pg_stat_activity")
        sessions, maximum = cursor.fetchone()  # type: ignore[misc]
    return ServerConnections(server, address, int(sessions), int(maximum))


def servers_of(
    store: ConfigStore, pipelines: Sequence[PipelineDefinition]
) -> tuple[list[ServerConnections], list[str]]:
    """Every server Rosetta uses, once each (config_db, the sources, the destinations), and
    one sentence per server that could not be read."""
    readings: list[ServerConnections] = []
    unread: list[str] = []
    seen: set[str] = set()
    params = store.pool.target.params
    address = f"{params.get('host', 'localhost')}:{params.get('port', '5432')}"
    with store.pool.connection() as conn:
        readings.append(read_server_connections(conn, "config_db", address))
    seen.add(address)
    for pipeline in pipelines:
        endpoints: list[tuple[str, Callable[[], Any], str]] = [
            (f"source {pipeline.source.name}", lambda p=pipeline: source_connection(p),
             f"{pipeline.source.host}:{pipeline.source.port}")]
        endpoints += [(f"destination {d.name}",
                       lambda p=pipeline, d=d: destination_connection(p, d), f"{d.host}:{d.port}")
                      for d in pipeline.destinations]
        for server, connect, where in endpoints:
            if where in seen:
                continue
            seen.add(where)
            try:
                with connect() as conn:
                    readings.append(read_server_connections(conn, server, where))
            except DatabaseConnectionError as exc:
                unread.append(str(exc))
    return readings, unread


def server_connections(
    readings: Sequence[ServerConnections], unread: Sequence[str], operations: OperationsSettings
) -> CheckOutcome:
    """Sessions against max_connections on each server: what breaks first when pipelines,
    destinations and workers multiply. WARN at 80 %, ERROR at 95 % (operations settings)."""
    warning = operations.server_connections_warning_percent
    critical = operations.server_connections_critical_percent
    fullest = max(readings, key=lambda r: r.percent)
    metadata: dict[str, float | int | str] = {
        "value": fullest.percent, "warning_threshold": warning, "critical_threshold": critical,
        "fullest_server": f"{fullest.server} ({fullest.address})", "sessions": fullest.sessions,
        "max_connections": fullest.max_connections, "servers": len(readings),
    }
    listed = "; ".join(f"{r.server} ({r.address}) {r.sessions} of {r.max_connections}"
                       for r in sorted(readings, key=lambda r: -r.percent))
    text = f"Sessions per server: {listed}"
    if unread:
        text += f". Not read: {' '.join(unread)}"
    if fullest.percent >= critical:
        return CheckOutcome("server_connections", False, "ERROR",
                            f"{text}. {fullest.server} is at {fullest.percent:g}% of "
                            f"max_connections (>= {critical}%).", metadata)
    if fullest.percent >= warning:
        return CheckOutcome("server_connections", False, "WARN",
                            f"{text}. {fullest.server} is at {fullest.percent:g}% of "
                            f"max_connections (>= {warning}%).", metadata)
    return CheckOutcome("server_connections", True, "WARN", f"{text}.", metadata)


def closed_connection_errors(store: ConfigStore) -> CheckOutcome:
    """Checklist "Closed connection errors": WARN >= 1 per hour, ERROR >= 1 per minute."""
    kinds = ("closed_connection", "dead_connection")
    last_hour = sum(store.pool_event_counts(3600).get(k, 0) for k in kinds)
    last_minute = sum(store.pool_event_counts(60).get(k, 0) for k in kinds)
    metadata: dict[str, float | int | str] = {"value": last_hour, "last_minute": last_minute,
                                              "warning_threshold_per_hour": 1,
                                              "critical_threshold_per_minute": 1}
    if last_minute >= 1:
        return CheckOutcome("closed_connection_errors", False, "ERROR",
                            f"{last_minute} closed/dead connection(s) in the last minute.", metadata)
    if last_hour >= 1:
        return CheckOutcome("closed_connection_errors", False, "WARN",
                            f"{last_hour} closed/dead connection(s) in the last hour.", metadata)
    return CheckOutcome("closed_connection_errors", True, "WARN",
                        "No closed or dead connections in the last hour.", metadata)


def pool_initialised(store: ConfigStore) -> CheckOutcome:
    """Pools open on their first attempt; WARN when one needed retries in the last hour."""
    retries = store.pool_event_counts(3600).get("init_retried", 0)
    metadata: dict[str, float | int | str] = {"value": retries, "threshold": 0}
    if retries:
        return CheckOutcome("pool_initialised", False, "WARN",
                            f"Connection pools needed {retries} extra attempt(s) to initialise in "
                            "the last hour.", metadata)
    return CheckOutcome("pool_initialised", True, "WARN",
                        "Connection pools initialised on their first attempt.", metadata)


# -- everything, for the schedule and `rosetta validate` ----------------------------------------


@dataclass(frozen=True)
class CheckTarget:
    """What a check judges: a destination table, a pipeline's slot, or the config store."""

    kind: Literal["destination_table", "replication_slot", "config_db"]
    pipeline: str | None = None
    destination: Destination | None = None
    table: TableRef | None = None
    target: TableRef | None = None  # the table written in the destination

    @property
    def label(self) -> str:
        if self.kind == "destination_table" and self.destination and self.target:
            return f"destination/{self.destination.name}/{self.target.schema}/{self.target.name}"
        if self.kind == "replication_slot":
            return f"replication_slot/{self.pipeline}"
        return "config_db"


def evaluate_pipeline(
    pipeline: PipelineDefinition, stored: Pipeline, operations: OperationsSettings,
    parked: Mapping[tuple[str, str], int] | None = None,
) -> Iterator[tuple[CheckTarget, CheckOutcome]]:
    """Every check of one pipeline (slot first, then each destination table). ``parked``:
    parked changes by (destination, table)."""
    parked = parked or {}
    since = datetime.now(UTC) - timedelta(minutes=operations.health_check_interval_minutes)
    slot = CheckTarget("replication_slot", pipeline.name)
    with source_connection(pipeline) as source:
        reading = read_slot(source, pipeline)
        lag = measure_lag(source, pipeline, stored.source_position_at, stored.applied_lsn)
        yield slot, slot_active(reading, stored)
        yield slot, retained_wal(reading, operations)
        for destination in pipeline.destinations:
            with destination_connection(pipeline, destination) as target:
                for table in pipeline.tables:
                    where = CheckTarget("destination_table", pipeline.name, destination, table,
                                        pipeline.target(table, destination))
                    schema = read_table_schema(source, table, f"source {pipeline.source.name}",
                                               pipeline.options(table))
                    written = schema.target_sql(destination.name, destination.schema)
                    yield where, row_count_parity(source, target, schema, written,
                                                  operations.parity_window_seconds)
                    yield where, content_parity(source, target, schema, written,
                                                operations.parity_chunk_rows,
                                                operations.parity_window_seconds,
                                                pipeline=pipeline.name)
                    yield where, replication_lag(stored, operations, lag)
                    yield where, apply_errors(stored, since, destination.name, table)
                    yield where, parked_events(pipeline.name, destination.name, table,
                                               parked.get((destination.name, table.qualified), 0))


def evaluate_config_store(
    store: ConfigStore, operations: OperationsSettings,
    pipelines: Sequence[PipelineDefinition] = (),
) -> list[CheckOutcome]:
    """The pool checks, and sessions against max_connections on config_db and on the servers
    of ``pipelines``."""
    store.flush_pool_events()  # this process's own events count too
    return [pool_utilisation(store, operations),
            server_connections(*servers_of(store, pipelines), operations),
            closed_connection_errors(store), pool_initialised(store)]


# -- backfill jobs -------------------------------------------------------------------------------


def backfill_retry_attempts(job_id: int, attempts: int) -> CheckOutcome:
    """Checklist "Backfill retry attempts": WARN > 1 per job, ERROR > 2 per job."""
    return _threshold_outcome("retry_attempts", attempts, 1, 2,
                              f"Backfill job {job_id} attempts")


def backfill_row_parity(
    pipeline: PipelineDefinition, table: TableRef, conditions_sql: sql.Composable,
    params: Sequence[Any], window_s: float, sleep: Callable[[float], None] = time.sleep,
) -> CheckOutcome:
    """After a backfill: every destination holds as many rows matching the job's filter as the
    source (re-counted for ``window_s`` while changes are in flight)."""
    def matching(conn: psycopg2.extensions.connection, relation: TableRef,
                 replicated: sql.Composable = _EVERY_ROW) -> int:
        with conn.cursor() as cursor:
            cursor.execute(sql.SQL("SELECT count(*) FROM {} WHERE {} AND {}").format(
                sql.Identifier(relation.schema, relation.name), replicated, conditions_sql),
                list(params))
            return int(cursor.fetchone()[0])  # type: ignore[index]

    replicated = replicated_rows(pipeline.options(table).where)
    with source_connection(pipeline) as source:
        for destination in pipeline.destinations:
            written = pipeline.target(table, destination)
            with destination_connection(pipeline, destination) as target:
                expected, copied = _counts_within_window(
                    lambda: matching(source, table, replicated),
                    lambda: matching(target, written),  # noqa: B023 - used at once
                    window_s, sleep)
            metadata: dict[str, float | int | str] = {
                "value": abs(expected - copied), "threshold": 0, "source_rows": expected,
                "destination_rows": copied}
            if expected != copied:
                return CheckOutcome("row_count", False, "ERROR",
                                    f"Destination {destination.name} has {copied} rows matching "
                                    f"the job's filter, the source {expected}.", metadata)
    return CheckOutcome("row_count", True, "ERROR",
                        f"{expected} rows matching the job's filter on both sides.", metadata)
