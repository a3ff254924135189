"""The config store's pools and the sessions on every server against max_connections."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.extensions

from rosetta_dagster.core.config_store import ConfigStore
from rosetta_dagster.core.errors import DatabaseConnectionError
from rosetta_dagster.core.health.outcome import CheckOutcome
from rosetta_dagster.core.pipeline_config import (
    OperationsSettings,
    PipelineDefinition,
)
from rosetta_dagster.core.replication import (
    destination_connection,
    source_connection,
)

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
    percent = round(100 * busiest.peak_in_use / busiest.max_conn, 1)
    metadata.update(value=percent, busiest_pool=busiest.pool, busiest_owner=busiest.owner,
                    busiest_process=busiest.process, peak_in_use=busiest.peak_in_use,
                    max_conn=busiest.max_conn)
    text = (f"The busiest of {len(pools)} pool(s), {busiest.pool} of {busiest.owner} "
            f"({busiest.process}), had {busiest.peak_in_use} of {busiest.max_conn} "
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
                      for d in pipeline.destinations if d.kind == "postgres"]
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
        text += f". Not read: {' '.join(u.rstrip('.') for u in unread)}"
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
