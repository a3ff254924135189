"""Backfill chunks in a PostgreSQL destination: staged by the job, merged by the stream.

A job stages each chunk in its own unlogged table shaped like the destination table (COPYed
in binary where the types allow) and marks it in the job's marks table, in one transaction.
At the chunk's high watermark the stream merges it (``core.backfill.chunk_merge`` says what
the merge must do; the statements are ``statements.chunk_merge_statements``) and, in the same
transaction, consumes the mark and drops the chunk's table: a replayed watermark finds no mark
and changes nothing. Marks and chunks are unlogged together, so a server crash empties both
and the stream asks for the chunk again.
"""

from __future__ import annotations

import io
import re
from collections.abc import Collection, Sequence
from typing import Any

import psycopg2.extensions
from psycopg2 import sql

from rosetta_dagster.core.destination import ChunkCounts, KeyBounds
from rosetta_dagster.core.destination.keyless_changes import KeylessChanges
from rosetta_dagster.core.destination.postgres.bulk import binary_copy, pipe_copy
from rosetta_dagster.core.destination.postgres.ddl import columns_unlike_source
from rosetta_dagster.core.destination.postgres.keyless import apply_keyless
from rosetta_dagster.core.destination.postgres.plan import TablePlan
from rosetta_dagster.core.destination.postgres.statements import (
    chunk_merge_statements,
    replace_with_chunk,
)
from rosetta_dagster.core.pipeline_config import Destination, PipelineDefinition
from rosetta_dagster.core.replication import connect_destination, destination_connection
from rosetta_dagster.core.table_schema import TableSchema
from rosetta_dagster.core.values import COPY_NULL, copy_field

STAGING_PREFIX = "_rosetta_backfill_"
_JOB_OF_STAGING = re.compile(rf"{STAGING_PREFIX}(\d+)_")


def job_prefix(job_id: int) -> str:
    """Every staging table of a job starts with this (dropped together when the job ends)."""
    return f"{STAGING_PREFIX}{int(job_id)}_"


def chunk_table(job_id: int, chunk: int) -> str:
    """Where a job stages one chunk."""
    return f"{job_prefix(job_id)}{int(chunk)}"


def marks_table(job_id: int) -> str:
    """The job's chunks that are staged and not yet applied."""
    return f"{job_prefix(job_id)}chunks"


class PostgresChunkStaging:
    """One job's staging in one destination, on a connection of its own."""

    def __init__(self, pipeline: PipelineDefinition, destination: Destination,
                 schema: TableSchema, job_id: int) -> None:
        self.name = destination.name
        self._destination = destination
        self._schema = schema
        self._job_id = job_id
        self._target = schema.target_sql(destination.name, destination.schema)
        self._conn = connect_destination(pipeline, destination)
        with self._conn.cursor() as cursor:
            # Unlogged, like the chunk tables: a server crash empties both together, and a
            # chunk without its mark is read again (see the stream).
            cursor.execute(sql.SQL(
                "CREATE UNLOGGED TABLE IF NOT EXISTS {} (chunk integer PRIMARY KEY)").format(
                    sql.Identifier(destination.schema, marks_table(job_id))))

    def columns_unlike_source(self) -> list[str]:
        with self._conn.cursor() as cursor:
            return columns_unlike_source(cursor, self._schema, self._target,
                                         self._destination.schema)

    def stage(self, source: psycopg2.extensions.connection, select: sql.Composable,
              params: Sequence[Any], chunk: int) -> int:
        """Streamed from the source (never held whole in memory)."""
        schema, target_schema = self._schema, self._destination.schema
        staging = sql.Identifier(target_schema, chunk_table(self._job_id, chunk))
        marks = sql.Identifier(target_schema, marks_table(self._job_id))
        options = sql.SQL(" (FORMAT binary)" if binary_copy(schema) else "")
        columns = sql.SQL(", ").join(sql.Identifier(c) for c in schema.column_names)
        with source.cursor() as cursor:
            copy_out = cursor.mogrify(sql.SQL("COPY ({}) TO STDOUT{}").format(select, options),
                                      list(params)).decode()
        with self._conn.cursor() as cursor:
            cursor.execute("BEGIN")
            cursor.execute(sql.SQL("DROP TABLE IF EXISTS {staging}; "
                                   "CREATE UNLOGGED TABLE {staging} (LIKE {target})").format(
                staging=staging, target=self._target))
            rows = pipe_copy(source, copy_out, self._conn, sql.SQL(
                "COPY {} ({}) FROM STDIN{}").format(staging, columns, options).as_string(
                    self._conn))
            cursor.execute(sql.SQL("INSERT INTO {} VALUES (%s) ON CONFLICT DO NOTHING").format(
                marks), (chunk,))
            cursor.execute("COMMIT")
        return rows

    def close(self) -> None:
        self._conn.close()


def drop_job_staging(pipeline: PipelineDefinition, destination: Destination,
                     job_ids: Collection[int]) -> None:
    """Drop the marks and any chunk table left (read again under another number) of the jobs."""
    jobs = {int(job_id) for job_id in job_ids}
    with destination_connection(pipeline, destination) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s "
                       "AND starts_with(tablename, %s)", (destination.schema, STAGING_PREFIX))
        for (name,) in cursor.fetchall():
            job = _JOB_OF_STAGING.match(name)
            if job and int(job[1]) in jobs:
                cursor.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(
                    sql.Identifier(destination.schema, name)))


def merge_chunk(
    conn: psycopg2.extensions.connection, plan: TablePlan, target_schema: str, job_id: int,
    chunk: int, *, excluded: set[tuple[Any, ...]], skip_all: bool, bounds: KeyBounds | None,
    row_filter: tuple[sql.Composable, list[Any]],
) -> ChunkCounts | None:
    """The stream's side: see ``DestinationWriter.merge_chunk``. One transaction (``conn``'s),
    which also consumes the chunk's mark and drops its table."""
    stage = sql.Identifier(target_schema, chunk_table(job_id, chunk))
    counts = ChunkCounts()
    with conn.cursor() as cursor:
        if not _consume_mark(cursor, target_schema, job_id, chunk):
            return None  # applied already (a replayed watermark), or the job ended
        if not skip_all:
            counts = _merge(cursor, plan, target_schema, stage, excluded, bounds, row_filter)
        cursor.execute(sql.SQL("DROP TABLE {}").format(stage))
    return counts


def replace_table(conn: psycopg2.extensions.connection, plan: TablePlan, target_schema: str,
                  job_id: int, chunk: int, *, later: KeylessChanges, destination: str
                  ) -> ChunkCounts | None:
    """The stream's side for a table without a key: see ``DestinationWriter.replace_rows``.
    One transaction (``conn``'s), which also consumes the chunk's mark and drops its table."""
    stage = sql.Identifier(target_schema, chunk_table(job_id, chunk))
    delete_all, insert_chunk = replace_with_chunk(plan.schema, plan.target, stage)
    counts = ChunkCounts()
    with conn.cursor() as cursor:
        if not _consume_mark(cursor, target_schema, job_id, chunk):
            return None
        cursor.execute(delete_all)
        counts.deleted = cursor.rowcount
        cursor.execute(insert_chunk)
        counts.inserted = cursor.rowcount
        if later.counts:
            apply_keyless(cursor, plan, later, destination, small=True)
        cursor.execute(sql.SQL("DROP TABLE {}").format(stage))
    return counts


def _consume_mark(cursor: psycopg2.extensions.cursor, target_schema: str, job_id: int,
                  chunk: int) -> bool:
    """Take the chunk's mark; False when it is not staged (applied already, or lost)."""
    stage = sql.Identifier(target_schema, chunk_table(job_id, chunk))
    marks = sql.Identifier(target_schema, marks_table(job_id))
    cursor.execute("SELECT to_regclass(%s), to_regclass(%s)",
                   (marks.as_string(cursor), stage.as_string(cursor)))
    if None in cursor.fetchone():  # type: ignore[operator]
        return False
    cursor.execute(sql.SQL("DELETE FROM {} WHERE chunk = %s").format(marks), (chunk,))
    return cursor.rowcount > 0


def _merge(cursor: psycopg2.extensions.cursor, plan: TablePlan, target_schema: str,
           stage: sql.Identifier, excluded: set[tuple[Any, ...]], bounds: KeyBounds | None,
           row_filter: tuple[sql.Composable, list[Any]]) -> ChunkCounts:
    excluded_table = sql.Identifier(f"_rosetta_excluded_{plan.stage_name}")
    statements = chunk_merge_statements(
        plan.schema, plan.target, target_schema, stage, excluded_table, bounds=bounds,
        row_filter=row_filter, any_excluded=bool(excluded))
    cursor.execute(statements.create_excluded)  # a temporary table, emptied at commit
    if excluded:
        _copy_keys(cursor, plan, statements.copy_excluded, excluded)
    counts = ChunkCounts()
    ranged = statements.range_params
    # A key range the destination has no rows in (the usual case when re-syncing what was
    # lost): nothing to delete or compare, the chunk is inserted as it is.
    occupied = True
    if bounds is not None:
        cursor.execute(statements.occupied, ranged)
        occupied = bool(cursor.fetchone()[0])  # type: ignore[index]
        if occupied:
            cursor.execute(statements.delete, [*ranged, *statements.filter_params])
            counts.deleted = cursor.rowcount
    if not occupied:
        cursor.execute(statements.insert_into_empty)
        counts.inserted = cursor.rowcount
        return counts
    if statements.update is not None:
        cursor.execute(statements.update, ranged)
        counts.updated = cursor.rowcount
    cursor.execute(statements.insert, ranged)
    counts.inserted = cursor.rowcount
    return counts


def _copy_keys(cursor: psycopg2.extensions.cursor, plan: TablePlan, copy: sql.Composed,
               keys: set[tuple[Any, ...]]) -> None:
    buffer = io.StringIO()
    for key in keys:
        buffer.write("\t".join(
            COPY_NULL if value is None else copy_field(plan.converter_of[name](value))
            for name, value in zip(plan.schema.key_columns, key, strict=True)) + "\n")
    buffer.seek(0)
    cursor.copy_expert(copy, buffer)

