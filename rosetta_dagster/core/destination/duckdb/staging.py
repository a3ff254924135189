"""Backfill chunks for a DuckDB destination: staged by the job as files, merged by the stream.

The job runs in a process of its own, which may not open the database file while the stream
owns it. So it stages each chunk as a CSV file of the source's rows beside the database
(``<file>.rosetta-staging/job<id>/chunk<n>.csv``, written under a temporary name and renamed:
a chunk file exists whole or not at all). At the chunk's high watermark the stream merges it
(``core.backfill.chunk_merge`` says what the merge must do; statements:
``statements.chunk_merge_statements``) and records the chunk as applied in
``<schema>._rosetta_backfill_chunks`` in the same transaction: a replayed watermark finds it
recorded and changes nothing. The file is removed after the commit.

Refused before anything is staged, in one sentence: a job with a row filter (the filter's
columns may be kept as text, whose order is not the type's), and a table whose key DuckDB does
not sort as PostgreSQL (the chunk's key range would hold other rows).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import psycopg2.extensions
from psycopg2 import sql

from rosetta_dagster.core.destination.duckdb.database import read_access
from rosetta_dagster.core.destination.duckdb.types import ordered_like_postgres
from rosetta_dagster.core.destination.warehouse.types import refuse_backfill
from rosetta_dagster.core.pipeline_config import Destination, PipelineDefinition
from rosetta_dagster.core.table_schema import TableSchema


def staging_root(path: str) -> Path:
    return Path(f"{path}.rosetta-staging")


def chunk_file(path: str, job_id: int, chunk: int) -> Path:
    return staging_root(path) / f"job{int(job_id)}" / f"chunk{int(chunk)}.csv"



class DuckDBChunkStaging:
    """One job's chunk files for one DuckDB destination."""

    def __init__(self, pipeline: PipelineDefinition, destination: Destination,
                 schema: TableSchema, job_id: int, *, filtered: bool) -> None:
        refuse_backfill(schema, destination.name, "DuckDB", job_id, filtered=filtered,
                        ordered=ordered_like_postgres)
        assert destination.path is not None
        self.name = destination.name
        self._path = destination.path
        self._schema = schema
        self._job_id = job_id
        self._target = schema.target(destination.name, destination.schema)

    def columns_unlike_source(self) -> list[str]:
        """Columns the destination table lacks, or holds for another source type (each
        column's comment names its source type)."""
        if not Path(self._path).exists():
            return list(self._schema.column_names)
        with read_access(self._path) as conn:
            existing = dict(conn.execute(
                "SELECT column_name, comment FROM duckdb_columns() WHERE schema_name = ? "
                "AND table_name = ?", [self._target.schema, self._target.name]).fetchall())
        return [c.name for c in self._schema.columns
                if c.name not in existing or existing[c.name] != c.type_sql]

    def stage(self, source: psycopg2.extensions.connection, select: sql.Composable,
              params: Sequence[Any], chunk: int) -> int:
        final = chunk_file(self._path, self._job_id, chunk)
        final.parent.mkdir(parents=True, exist_ok=True)
        partial = final.with_suffix(".partial")
        with source.cursor() as cursor:
            copy_out = cursor.mogrify(sql.SQL("COPY ({}) TO STDOUT WITH (FORMAT csv)").format(
                select), list(params)).decode()
            with partial.open("wb") as out:
                cursor.copy_expert(copy_out, out)
                out.flush()
                os.fsync(out.fileno())
            rows = cursor.rowcount
        os.replace(partial, final)
        return int(rows)

    def close(self) -> None:
        """Nothing held open."""


def drop_job_staging(destination: Destination, job_ids: Collection[int]) -> None:
    """The chunk files the jobs left (their applied-chunk rows stay: a few bytes each)."""
    assert destination.path is not None
    for job_id in job_ids:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(staging_root(destination.path) / f"job{int(job_id)}")
