"""The config store: pipelines: desired status, observed state, heartbeats, lag, apply errors."""

from __future__ import annotations

from collections.abc import Sequence

from psycopg2.extras import Json

from rosetta_dagster.core.config_store.base import StoreBase
from rosetta_dagster.core.config_store.records import (
    PIPELINE_SELECT,
    Pipeline,
    PipelineFailure,
    PipelineState,
    PipelineStatus,
)
from rosetta_dagster.core.errors import ConfigStoreError
from rosetta_dagster.core.lag import LagReading
from rosetta_dagster.core.pipeline_config import PipelineDefinition


class PipelineRecords(StoreBase):
    # -- pipelines -------------------------------------------------------------------------

    def upsert_pipeline(
        self,
        name: str,
        *,
        source: str,
        destinations: Sequence[str],
        tables: Sequence[str],
        status: PipelineStatus | None = None,
    ) -> Pipeline:
        """Create or update a pipeline's declaration; ``status`` is kept unless given."""
        self._query(
            """
            WITH upserted AS (
                INSERT INTO pipelines (name, source, destinations, tables, status)
                VALUES (%(name)s, %(source)s, %(destinations)s, %(tables)s,
                        coalesce(%(status)s, 'PAUSE'))
                ON CONFLICT (name) DO UPDATE SET
                    source = EXCLUDED.source,
                    destinations = EXCLUDED.destinations,
                    tables = EXCLUDED.tables,
                    status = coalesce(%(status)s, pipelines.status),
                    updated_at = now()
                RETURNING id
            )
            INSERT INTO pipeline_metadata (pipeline_id) SELECT id FROM upserted
            ON CONFLICT (pipeline_id) DO NOTHING
            """,
            {
                "name": name,
                "source": source,
                "destinations": Json(list(destinations)),
                "tables": Json(list(tables)),
                "status": None if status is None else PipelineStatus(status).value,
            },
        )
        return self.get_pipeline(name)

    def sync_pipeline(self, pipeline: PipelineDefinition) -> Pipeline:
        """Write a declared pipeline (from rosetta.yaml), keeping its desired status."""
        return self.upsert_pipeline(
            pipeline.name,
            source=pipeline.source.name,
            destinations=[d.name for d in pipeline.destinations],
            tables=[t.qualified for t in pipeline.tables],
        )

    def find_pipeline(self, name: str) -> Pipeline | None:
        rows = self._query(PIPELINE_SELECT + " WHERE p.name = %s", (name,))
        return Pipeline.from_row(rows[0]) if rows else None

    def get_pipeline(self, name: str) -> Pipeline:
        pipeline = self.find_pipeline(name)
        if pipeline is None:
            raise ConfigStoreError(f"Pipeline '{name}' does not exist in the config store.")
        return pipeline

    def list_pipelines(self) -> list[Pipeline]:
        return [Pipeline.from_row(row) for row in self._query(PIPELINE_SELECT + " ORDER BY p.name")]

    def set_pipeline_status(self, name: str, status: PipelineStatus | str) -> Pipeline:
        try:
            desired = PipelineStatus(str(status).upper())
        except ValueError:
            raise ConfigStoreError(
                f"Pipeline status must be START or PAUSE, got '{status}'."
            ) from None
        rows = self._query(
            "UPDATE pipelines SET status = %s, updated_at = now() WHERE name = %s RETURNING id",
            (desired.value, name),
        )
        if not rows:
            raise ConfigStoreError(f"Pipeline '{name}' does not exist in the config store.")
        return self.get_pipeline(name)

    def record_pipeline_state(
        self,
        name: str,
        state: PipelineState,
        *,
        error: str | None = None,
        run_id: str | None = None,
    ) -> None:
        """Record the observed state; RUNNING also stamps last_start_at and the heartbeat."""
        state = PipelineState(state)
        rows = self._query(
            """
            UPDATE pipeline_metadata m SET
                state = %(state)s,
                last_error = CASE WHEN %(state)s = 'ERROR' THEN %(error)s ELSE m.last_error END,
                last_error_at = CASE WHEN %(state)s = 'ERROR' THEN now() ELSE m.last_error_at END,
                last_start_at = CASE WHEN %(state)s = 'RUNNING' THEN now() ELSE m.last_start_at END,
                heartbeat_at = CASE WHEN %(state)s = 'RUNNING' THEN now() ELSE m.heartbeat_at END,
                run_id = coalesce(%(run_id)s, m.run_id),
                updated_at = now()
            FROM pipelines p
            WHERE p.id = m.pipeline_id AND p.name = %(name)s
            RETURNING m.pipeline_id
            """,
            {"state": state.value, "error": error, "run_id": run_id, "name": name},
        )
        if not rows:
            raise ConfigStoreError(f"Pipeline '{name}' does not exist in the config store.")
        if state is PipelineState.ERROR:
            self._query(
                "WITH old AS (DELETE FROM pipeline_failures WHERE failed_at < now() - interval "
                "'1 day') INSERT INTO pipeline_failures (pipeline_id, error) VALUES (%s, %s)",
                (rows[0]["pipeline_id"], error))

    def recent_failures(self, name: str, within_s: float = 3600) -> list[PipelineFailure]:
        """The stream's failures of the last ``within_s`` seconds, newest first."""
        return [PipelineFailure.from_row(r) for r in self._query(
            "SELECT f.error, f.failed_at FROM pipeline_failures f JOIN pipelines p "
            "ON p.id = f.pipeline_id WHERE p.name = %s "
            "AND f.failed_at > now() - make_interval(secs => %s) ORDER BY f.failed_at DESC",
            (name, within_s))]

    def heartbeat(self, name: str, source_position_ms: int | None = None,
                  applied_lsn: int | None = None, run_id: str | None = None) -> None:
        """Stamp the pipeline alive (by ``run_id``, when a run streams it); ``source_position_ms``:
        source time of the newest change or heartbeat message applied (epoch milliseconds),
        ``applied_lsn``: its position, both for the replication lag (core.lag)."""
        self._query(
            """
            UPDATE pipeline_metadata m SET heartbeat_at = now(),
                source_position_at = coalesce(to_timestamp(%s / 1000.0), m.source_position_at),
                applied_lsn = coalesce('0/0'::pg_lsn + %s::numeric, m.applied_lsn),
                run_id = coalesce(%s, m.run_id)
            FROM pipelines p WHERE p.id = m.pipeline_id AND p.name = %s
            """,
            (source_position_ms, applied_lsn, run_id, name),
        )

    def record_lag(self, name: str, reading: LagReading) -> None:
        """The latest lag measurement, for /metrics and the API."""
        self._query(
            """
            UPDATE pipeline_metadata m SET lag_seconds = %s, lag_bytes = %s, lag_note = %s,
                lag_measured_at = now()
            FROM pipelines p WHERE p.id = m.pipeline_id AND p.name = %s
            """,
            (reading.seconds, reading.bytes, reading.note, name),
        )
