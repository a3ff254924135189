"""A PostgreSQL destination (15 or later: MERGE).

* ``applier`` - the stream's writer: batches merged set-wise in one transaction, with the
  stream position when the engine keeps it with the data;
* ``statements`` - every statement the writer and the chunk merge run, as pure functions of a
  table description (golden-text tests, no database);
* ``ddl`` - destination tables created and widened like the source's, and their user types;
* ``staging`` - backfill chunks staged by a job and merged by the stream;
* ``bulk`` - whole tables written with COPY (the initial load);
* ``reader`` - counts and row checksums for the parity checks (the source is read alike).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rosetta_dagster.core.destination.postgres.applier import PostgresApplier
from rosetta_dagster.core.destination.postgres.bulk import PostgresTableLoad
from rosetta_dagster.core.destination.postgres.deliveries import DeliveryLog
from rosetta_dagster.core.destination.postgres.positions import PostgresPositionRow
from rosetta_dagster.core.destination.postgres.reader import PostgresTableReader
from rosetta_dagster.core.destination.postgres.staging import (
    PostgresChunkStaging,
    drop_job_staging,
)
from rosetta_dagster.core.pool import PoolSettings, ResilientConnectionPool
from rosetta_dagster.core.replication import destination_connection

if TYPE_CHECKING:
    from rosetta_dagster.core.destination import SchemaSource
    from rosetta_dagster.core.pipeline_config import Destination, PipelineDefinition
    from rosetta_dagster.core.position_tracking import PositionTracking
    from rosetta_dagster.core.source_rows import SourceRows
    from rosetta_dagster.core.table_schema import TableSchema
    from rosetta_dagster.core.values import ValueCodec


class PostgresDestinations:
    """The PostgreSQL kind of destination."""

    def open_writer(self, pipeline: PipelineDefinition, destination: Destination, *,
                    values: ValueCodec, tracking: PositionTracking | None,
                    read_schema: SchemaSource, source_rows: SourceRows | None,
                    application_name: str) -> PostgresApplier:
        pool = ResilientConnectionPool(
            destination.dsn(),
            PoolSettings.from_env(max_conn=2, init_attempts=3, statement_timeout_ms=0,
                                  application_name=application_name),
            label=f"destination {destination.name}",
            setting=f"destination {destination.name}",
        ).open()
        return PostgresApplier(pool, destination.schema, read_schema, values=values,
                               name=destination.name, tracking=tracking,
                               source_rows=source_rows,
                               deliveries=DeliveryLog(pipeline.name, destination.schema))

    def open_staging(self, pipeline: PipelineDefinition, destination: Destination,
                     schema: TableSchema, job_id: int, *, filtered: bool = False
                     ) -> PostgresChunkStaging:
        return PostgresChunkStaging(pipeline, destination, schema, job_id)

    def drop_staging(self, pipeline: PipelineDefinition, destination: Destination,
                     job_ids: Collection[int]) -> None:
        drop_job_staging(pipeline, destination, job_ids)

    def open_table_load(self, pipeline: PipelineDefinition, destination: Destination,
                        schema: TableSchema, *, widen: bool) -> PostgresTableLoad:
        return PostgresTableLoad(pipeline, destination, schema, widen=widen)

    @contextmanager
    def open_reader(self, pipeline: PipelineDefinition, destination: Destination
                    ) -> Iterator[PostgresTableReader]:
        with destination_connection(pipeline, destination) as conn:
            yield PostgresTableReader(conn)

    def position_row(self, pipeline: PipelineDefinition, destination: Destination
                     ) -> PostgresPositionRow:
        return PostgresPositionRow(pipeline, destination)


POSTGRES = PostgresDestinations()
