"""Backfill chunks for a Snowflake destination: staged by the job as tables, merged by the
stream. The job copies each chunk's rows into ``_rosetta_chunkpart_<job>_<chunk>`` beside the
target (as the initial load does, ``load.upload_rows``) and renames it
``_rosetta_chunk_<job>_<chunk>`` when whole: a chunk table exists whole or not at all. At the
chunk's high watermark the stream merges it (``core.backfill.chunk_merge``; statements:
``statements.chunk_merge_statements``), records it in ``<schema>._rosetta_backfill_chunks`` in
the same transaction, and drops the table after the commit.

Refused before anything is staged, in one sentence (as for DuckDB): a job with a row filter
(the filter's columns may be kept as text, whose order is not the type's), and a table whose
key Snowflake does not sort as PostgreSQL."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import psycopg2.extensions
from psycopg2 import sql

from rosetta_dagster.core.destination.snowflake.connection import cursor
from rosetta_dagster.core.destination.snowflake.load import upload_rows
from rosetta_dagster.core.destination.snowflake.statements import (
    IN_SCHEMA,
    columns_statements,
    create_table,
    in_schema,
    quote,
)
from rosetta_dagster.core.destination.snowflake.types import ordered_like_postgres
from rosetta_dagster.core.destination.warehouse.types import refuse_backfill
from rosetta_dagster.core.pipeline_config import Destination, PipelineDefinition
from rosetta_dagster.core.table_schema import TableSchema


class SnowflakeChunkStaging:
    """One job's chunk tables for one Snowflake destination."""

    def __init__(self, pipeline: PipelineDefinition, destination: Destination,
                 schema: TableSchema, job_id: int, *, filtered: bool) -> None:
        refuse_backfill(schema, destination.name, "Snowflake", job_id, filtered=filtered,
                        ordered=ordered_like_postgres)
        self.name = destination.name
        self._destination = destination
        self._schema = schema
        self._job_id = job_id
        self._target = schema.target(destination.name, destination.schema)

    def columns_unlike_source(self) -> list[str]:
        """Columns the destination table lacks, or holds for another source type (the types
        recorded in ``_rosetta_columns``)."""
        record = columns_statements(self._target.schema)
        with cursor(self._destination) as cur:
            cur.execute(record.create)
            recorded = dict(cur.execute(record.read, [self._target.name]).fetchall())
        return [c.name for c in self._schema.columns if recorded.get(c.name) != c.type_sql]

    def stage(self, source: psycopg2.extensions.connection, select: sql.Composable,
              params: Sequence[Any], chunk: int) -> int:
        part = quote(self._target.schema, f"_rosetta_chunkpart_{self._job_id}_{int(chunk)}")
        whole = f"_rosetta_chunk_{self._job_id}_{int(chunk)}"
        with cursor(self._destination) as cur:
            cur.execute(f"DROP TABLE IF EXISTS {part}")
            cur.execute(create_table(self._schema, part))
            rows = upload_rows(cur, source, select, params, self._schema, part,
                               self._target.schema)
            cur.execute(f"DROP TABLE IF EXISTS {quote(self._target.schema, whole)}")
            cur.execute(f"ALTER TABLE {part} RENAME TO {quote(self._target.schema, whole)}")
        return rows

    def close(self) -> None:
        """Nothing held open."""


def drop_job_staging(destination: Destination, job_ids: Collection[int]) -> None:
    """The chunk tables the jobs left (their applied-chunk rows stay: a few bytes each)."""
    with cursor(destination) as cur:
        for job_id in job_ids:
            for prefix in ("_rosetta_chunk_", "_rosetta_chunkpart_"):
                names = cur.execute(
                    f"SELECT table_name FROM information_schema.tables WHERE {IN_SCHEMA} "
                    "AND STARTSWITH(table_name, ?)",
                    [*in_schema(destination.schema), f"{prefix}{int(job_id)}_"]).fetchall()
                for (name,) in names:
                    cur.execute(f"DROP TABLE IF EXISTS {quote(destination.schema, name)}")
