"""The config store: flows, WAL readings, metrics, pool reports, notifications and offset clean-ups."""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Sequence

from psycopg2.extras import RealDictCursor

from rosetta_dagster.core.config_store.base import StoreBase
from rosetta_dagster.core.config_store.records import (
    POOL_PEAK_WINDOW_S,
    POOL_REPORT_FRESH_S,
    BackfillRows,
    FlowCount,
    MetricsSnapshot,
    NotificationAttempt,
    OffsetCleanup,
    ParkedCount,
    PipelineGauge,
    PoolUsage,
    WalReading,
)
from rosetta_dagster.core.pool import ResilientConnectionPool


class TelemetryRecords(StoreBase):
    # -- monitoring ------------------------------------------------------------------------

    def record_flows(self, pipeline: str, flows: Sequence[tuple[str, str, int]],
                     at: Sequence[datetime.datetime] | None = None) -> None:
        """Append applied record counts, ``(destination, table, count)`` each, one row per
        batch and table; ``at``: when each was applied (now when not given)."""
        if not flows:
            return
        destinations, tables, counts = (list(column) for column in zip(*flows, strict=True))
        self._query(
            """
            INSERT INTO data_flow_record_monitoring (pipeline_id, destination, table_name,
                                                     record_count, created_at)
            SELECT p.id, f.destination, f.table_name, f.record_count, coalesce(f.at, now())
            FROM pipelines p,
                 unnest(%s::text[], %s::text[], %s::bigint[], %s::timestamptz[])
                     AS f(destination, table_name, record_count, at)
            WHERE p.name = %s
            """,
            (destinations, tables, counts, list(at) if at is not None else [None] * len(flows),
             pipeline),
        )

    def record_wal_reading(
        self,
        *,
        source: str,
        slot_name: str,
        status: str,
        pipeline: str | None = None,
        current_lsn: str | None = None,
        confirmed_flush_lsn: str | None = None,
        retained_wal_bytes: int | None = None,
        lag_bytes: int | None = None,
        active: bool | None = None,
        wal_status: str | None = None,
    ) -> None:
        self._query(
            """
            INSERT INTO wal_monitor (source, slot_name, pipeline_id, current_lsn,
                                     confirmed_flush_lsn, retained_wal_bytes, lag_bytes, status,
                                     active, wal_status)
            VALUES (%s, %s, (SELECT id FROM pipelines WHERE name = %s), %s, %s, %s, %s, %s, %s,
                    %s)
            """,
            (source, slot_name, pipeline, current_lsn, confirmed_flush_lsn, retained_wal_bytes,
             lag_bytes, status, active, wal_status),
        )

    def latest_wal_readings(self, limit_per_slot: int = 1) -> list[WalReading]:
        return [WalReading.from_row(r) for r in self._query(
            """
            SELECT * FROM (
                SELECT w.*, p.name AS pipeline,
                       row_number() OVER (PARTITION BY w.source, w.slot_name
                                          ORDER BY w.checked_at DESC, w.id DESC) AS n
                FROM wal_monitor w LEFT JOIN pipelines p ON p.id = w.pipeline_id
            ) r WHERE n <= %s ORDER BY source, slot_name, checked_at DESC
            """,
            (limit_per_slot,),
        )]

    def metrics_snapshot(self) -> MetricsSnapshot:
        """Aggregates for /metrics, in one connection checkout."""
        with self.pool.connection() as conn, conn.cursor(cursor_factory=RealDictCursor) as cur:
            cur.execute(
                """
                SELECT p.name AS pipeline, f.destination, f.table_name, sum(f.record_count) AS events
                FROM data_flow_record_monitoring f JOIN pipelines p ON p.id = f.pipeline_id
                GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
                """
            )
            flows = [FlowCount.from_row(r) for r in cur.fetchall()]
            cur.execute(
                """
                SELECT p.name, p.status, coalesce(m.state, 'PAUSED') AS state, m.source_position_at,
                       m.last_apply_error IS NOT NULL AS stopped_on_refused_change,
                       m.lag_seconds, m.lag_bytes, m.lag_measured_at
                FROM pipelines p LEFT JOIN pipeline_metadata m ON m.pipeline_id = p.id ORDER BY 1
                """
            )
            pipelines = [PipelineGauge.from_row(r) for r in cur.fetchall()]
            cur.execute(
                """
                SELECT p.name AS pipeline, j.status, sum(j.count_record) AS rows
                FROM backfill_jobs j JOIN pipelines p ON p.id = j.pipeline_id GROUP BY 1, 2
                """
            )
            backfills = [BackfillRows.from_row(r) for r in cur.fetchall()]
        parked = [ParkedCount(*row) for row in self.parked_counts()]
        return MetricsSnapshot(flows, pipelines, backfills, self.latest_wal_readings(), parked)

    def flush_pool_events(self, others: Sequence[ResilientConnectionPool] = ()) -> int:
        """Record the unreported health events (see ``take_unreported_events``) and the
        utilisation of this store's pool and of ``others`` (e.g. a stream's destination pools)."""
        process = f"{socket.gethostname()}:{os.getpid()}"
        pools = [self.pool, *others]
        events = [(pool.label, kind, count) for pool in pools
                  for kind, count in pool.take_unreported_events()]
        if events:
            labels, kinds, counts = (list(c) for c in zip(*events, strict=True))
            self._query(
                """
                INSERT INTO pool_events (process, pool, kind, count)
                SELECT %s, p, k, c FROM unnest(%s::text[], %s::text[], %s::int[]) AS e(p, k, c)
                """,
                (process, labels, kinds, counts),
            )
        usage = [pool.take_usage() for pool in pools]
        # The peak is kept over windows of POOL_PEAK_WINDOW_S: a busy moment between two
        # reports stays visible to the check for at least that long.
        self._query(
            """
            INSERT INTO pool_usage AS u (process, pool, owner, max_conn, in_use, peak_in_use)
            SELECT %s, p, o, m, i, k
            FROM unnest(%s::text[], %s::text[], %s::int[], %s::int[], %s::int[]) AS e(p, o, m, i, k)
            ON CONFLICT (process, pool, owner) DO UPDATE SET
                max_conn = excluded.max_conn, in_use = excluded.in_use, reported_at = now(),
                peak_in_use = CASE WHEN u.peak_since > now() - make_interval(secs => %s)
                                   THEN greatest(u.peak_in_use, excluded.peak_in_use)
                                   ELSE excluded.peak_in_use END,
                peak_since = CASE WHEN u.peak_since > now() - make_interval(secs => %s)
                                  THEN u.peak_since ELSE now() END
            """,
            (process, [u.pool for u in usage], [u.owner for u in usage],
             [u.max_conn for u in usage], [u.in_use for u in usage],
             [u.peak_in_use for u in usage], POOL_PEAK_WINDOW_S, POOL_PEAK_WINDOW_S),
        )
        return len(events)

    def pool_usage(self, fresh_seconds: float = POOL_REPORT_FRESH_S) -> list[PoolUsage]:
        """Pools reported in the last ``fresh_seconds`` (older rows: processes that ended)."""
        self._query("DELETE FROM pool_usage WHERE reported_at < now() - interval '1 day'")
        return [PoolUsage.from_row(r) for r in self._query(
            "SELECT process, pool, owner, max_conn, in_use, peak_in_use, reported_at "
            "FROM pool_usage WHERE reported_at > now() - make_interval(secs => %s) "
            "ORDER BY peak_in_use::float8 / max_conn DESC, owner, pool",
            (fresh_seconds,),
        )]

    def pool_event_counts(self, since_seconds: float) -> dict[str, int]:
        rows = self._query(
            "SELECT kind, sum(count)::int AS n FROM pool_events "
            "WHERE created_at > now() - make_interval(secs => %s) GROUP BY kind",
            (since_seconds,),
        )
        return {row["kind"]: row["n"] for row in rows}

    def database_connections(self) -> int:
        """Sessions on the config store's database (the checklist's pg_stat_activity count)."""
        rows = self._query(
            "SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database()"
        )
        return rows[0]["n"]

    # -- notifications (core.notify) ------------------------------------------------------------

    def record_notification_attempt(
        self, *, channel: str, dedupe_key: str, alert_key: str, pipeline: str | None,
        transition: str, severity: str, text: str, attempt: int, delivered: bool,
        http_status: int | None, error: str | None,
    ) -> None:
        self._query(
            """
            INSERT INTO notification_log (channel, dedupe_key, alert_key, pipeline, transition,
                                          severity, text, attempt, delivered, http_status, error)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
            """,
            (channel, dedupe_key, alert_key, pipeline, transition, severity, text, attempt,
             delivered, http_status, error),
        )

    def notification_delivered(self, dedupe_key: str) -> bool:
        rows = self._query("SELECT 1 FROM notification_log WHERE dedupe_key = %s AND delivered "
                           "LIMIT 1", (dedupe_key,))
        return bool(rows)

    def list_notifications(self, limit: int = 50, pipeline: str | None = None
                           ) -> list[NotificationAttempt]:
        """The latest delivery attempts, newest first."""
        return [NotificationAttempt.from_row(r) for r in self._query(
            """
            SELECT id, channel, alert_key, pipeline, transition, severity, text, attempt,
                   delivered, http_status, error, created_at
            FROM notification_log WHERE %(pipeline)s::text IS NULL OR pipeline = %(pipeline)s
            ORDER BY id DESC LIMIT %(limit)s
            """,
            {"pipeline": pipeline, "limit": limit},
        )]

    def record_offset_cleanup(
        self, *, pipeline: str, offset_file: str, slot_name: str, reason: str
    ) -> None:
        self._query(
            """
            INSERT INTO offset_cleanups (pipeline_id, offset_file, slot_name, reason)
            VALUES ((SELECT id FROM pipelines WHERE name = %s), %s, %s, %s)
            """,
            (pipeline, offset_file, slot_name, reason),
        )

    def list_offset_cleanups(self, limit: int = 20) -> list[OffsetCleanup]:
        return [OffsetCleanup.from_row(r) for r in self._query(
            """
            SELECT c.id, p.name AS pipeline, c.offset_file, c.slot_name, c.reason, c.created_at
            FROM offset_cleanups c LEFT JOIN pipelines p ON p.id = c.pipeline_id
            ORDER BY c.created_at DESC, c.id DESC LIMIT %s
            """,
            (limit,),
        )]
