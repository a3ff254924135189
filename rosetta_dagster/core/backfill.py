"""Backfill jobs: re-copy (part of) a source table into every destination while streaming goes on.

Correctness against the concurrent stream follows DBLog (Netflix; Debezium's incremental
snapshots use the same idea). For each chunk of primary keys:

1. a *low watermark* is written into the WAL (``pg_logical_emit_message``, transactional), and
   the transactions in flight at that moment are waited for (see
   :func:`_wait_for_transactions_in_flight`),
2. the chunk is read from the source with ``COPY (SELECT ...) TO STDOUT`` and COPYed into a
   staging table in every destination,
3. a *high watermark* is written.

The streaming session sees both watermarks in commit order. Between them it records the keys of
every change it applies to that table; at the high watermark it writes the staged rows that
differ, deletes the destination rows in the chunk's key range (matching the job's filter) that
the chunk does not have, both *except* those keys (their streamed values are newer than the
chunk's), and drops the chunk from staging, in one destination transaction. A row updated or
deleted while the chunk was read can therefore never be put back with an old value or
resurrected, and changes after the high watermark are applied after the chunk, as usual. Rows
move with COPY in and out and three set-wise statements per chunk; the apply runs in the
stream, the copy here.

Progress (``count_record``, the resume point) is written by the stream when it applies a chunk,
so a crashed backfill resumes after the last applied chunk. Backfills therefore need the
pipeline's stream to run (START).
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from rosetta_dagster.core.apply.applier import (
    BACKFILL_CHUNK_COLUMN,
    backfill_marks_table,
    backfill_staging_table,
)
from rosetta_dagster.core.apply.schema import Column, TableSchema, key_range, read_table_schema
from rosetta_dagster.core.config_store import BackfillJob, BackfillStatus, ConfigStore
from rosetta_dagster.core.dsn import summarize_connection_error
from rosetta_dagster.core.errors import DatabaseConnectionError, RosettaError
from rosetta_dagster.core.events import BACKFILL_MESSAGE_PREFIX
from rosetta_dagster.core.filters import compile_filter, parse_filter
from rosetta_dagster.core.pipeline_config import Destination, PipelineDefinition, TableRef
from rosetta_dagster.core.replication import (
    connect_destination,
    destination_connection,
    source_connection,
)

logger = logging.getLogger("rosetta.backfill")
Log = logging.Logger | logging.LoggerAdapter[logging.Logger]

FETCH_ATTEMPTS = 3


class BackfillError(RosettaError):
    """A backfill job cannot run (rejected input, stream not running, write failure)."""


class BackfillCancelled(RosettaError):  # noqa: N818 - an outcome, not a failure
    """The job was cancelled while it ran."""


def fetch_pending_jobs(
    store: ConfigStore, log: Log = logger, sleep: Callable[[float], None] = time.sleep,
    limit: int = 10,
) -> list[BackfillJob]:
    """Claim PENDING jobs (-> QUEUED), retrying connection errors: 3 attempts, 2 s then 4 s.

    Checklist scenario 3; other errors are not retried.
    """
    for attempt in range(1, FETCH_ATTEMPTS + 1):
        try:
            jobs = store.claim_pending_backfill_jobs(limit)
        except (psycopg2.OperationalError, psycopg2.InterfaceError, DatabaseConnectionError) as exc:
            reason = (summarize_connection_error(exc) if isinstance(exc, psycopg2.Error)
                      else str(exc))
            log.warning("Database connection error fetching pending jobs (attempt %d/%d): %s",
                        attempt, FETCH_ATTEMPTS, reason)
            if attempt == FETCH_ATTEMPTS:
                raise
            delay = 2 ** attempt
            log.info("Retrying in %ds...", delay)
            sleep(delay)
        else:
            log.info("Successfully fetched %d pending jobs", len(jobs))
            return jobs
    raise AssertionError("unreachable")


@dataclass
class BackfillResult:
    job_id: int
    rows: int
    total: int
    chunks: int
    seconds: float
    attempts: int
    table: TableRef
    inserted: int  # destination rows written: new, rewritten (differed), deleted (not in source)
    updated: int
    deleted: int
    # The job's filter as SQL, for the row-count check after the copy.
    filter_sql: sql.Composable
    filter_params: list[Any]

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def _emit_watermark(conn: psycopg2.extensions.connection, body: dict[str, Any]) -> None:
    with conn.cursor() as cursor:
        # Keys of any type travel as text; PostgreSQL casts them back when comparing.
        cursor.execute("SELECT pg_logical_emit_message(true, %s, %s)",
                       (BACKFILL_MESSAGE_PREFIX, json.dumps(body, default=str)))


def _wait_for_transactions_in_flight(conn: psycopg2.extensions.connection) -> None:
    """Wait until every transaction in progress right after the low watermark has ended.

    A transaction can have its commit record in the WAL *before* the low watermark yet still be
    invisible to a snapshot taken just after it (it has not left the proc array). The stream would
    apply it before the window opens, and the chunk, read without it, would then overwrite it
    with the older value. Once those transactions end, a new snapshot sees every change the WAL
    orders before the low watermark.
    """
    with conn.cursor() as cursor:
        cursor.execute("SELECT array_agg(x)::text[] FROM pg_snapshot_xip(pg_current_snapshot()) x")
        in_flight = cursor.fetchone()[0]  # type: ignore[index]
        while in_flight:
            cursor.execute(
                "SELECT array_agg(x)::text[] FROM unnest(%s::xid8[]) x "
                "WHERE pg_xact_status(x) = 'in progress'", (in_flight,))
            in_flight = cursor.fetchone()[0]  # type: ignore[index]
            if in_flight:
                time.sleep(0.005)


class BackfillRunner:
    """Runs one backfill job to completion (or cancellation) in the calling thread."""

    def __init__(
        self,
        pipeline: PipelineDefinition,
        store: ConfigStore,
        job_id: int,
        *,
        chunk_rows: int = 50_000,
        chunk_timeout_s: float = 300.0,
        max_attempts: int = 3,
        log: Log = logger,
    ) -> None:
        self.max_attempts = max_attempts
        self.pipeline = pipeline
        self.store = store
        self.job_id = job_id
        self.chunk_rows = chunk_rows
        self.chunk_timeout_s = chunk_timeout_s
        self.log = log

    def _fail(self, message: str) -> BackfillError:
        self.store.set_backfill_status(self.job_id, BackfillStatus.FAILED, error=message)
        return BackfillError(message)

    def _check_cancelled(self) -> None:
        if self.store.get_backfill_job(self.job_id).status is BackfillStatus.CANCELLED:
            raise BackfillCancelled(f"Backfill job {self.job_id} was cancelled.")

    def run(self) -> BackfillResult:
        """Copy the job's rows; the job ends COMPLETED, FAILED (raised) or CANCELLED (raised)."""
        job = self.store.get_backfill_job(self.job_id)
        if job.status in (BackfillStatus.CANCELLED, BackfillStatus.COMPLETED):
            raise BackfillCancelled(f"Backfill job {job.id} is already {job.status.value}.")
        if job.attempts >= self.max_attempts:
            raise self._fail(f"Backfill job {job.id} failed after {job.attempts} attempts "
                             f"(max_attempts {self.max_attempts}); last error: {job.error}")
        job = self.store.set_backfill_status(job.id, BackfillStatus.EXECUTING)
        try:
            return self._run(job)
        except (BackfillError, BackfillCancelled):
            raise
        except RosettaError as exc:
            raise self._fail(f"Backfill job {job.id} (attempt {job.attempts}): {exc}") from None
        except psycopg2.Error as exc:
            raise self._fail(f"Backfill job {job.id} (attempt {job.attempts}): database error: "
                             f"{summarize_connection_error(exc)}") from None

    def _run(self, job: BackfillJob) -> BackfillResult:
        table = TableRef.parse(job.table_name)
        if table not in self.pipeline.tables:
            raise self._fail(f"Backfill job {job.id}: pipeline {self.pipeline.name} has no table "
                             f"{job.table_name}.")
        stored = self.store.get_pipeline(self.pipeline.name)
        if stored.status.value != "START":
            raise self._fail(
                f"Backfill job {job.id}: pipeline {self.pipeline.name} is paused; backfills are "
                "applied by its stream, start it first."
            )
        started = time.monotonic()
        with source_connection(self.pipeline) as source:
            schema = read_table_schema(source, table, f"source {self.pipeline.source.name}")
            try:
                where, params = compile_filter(parse_filter(job.filter), schema.column_names,
                                               table.qualified)
            except RosettaError as exc:
                raise self._fail(f"Backfill job {job.id} rejected: {exc}") from None
            total = _count(source, schema, where, params)
            self.store.update_backfill_progress(job.id, count_record=job.count_record,
                                                total_record=total)
            targets = [(self._open_destination(d, schema), d.schema)
                       for d in self.pipeline.destinations]
            try:
                chunks = self._copy_chunks(job, source, schema, where, params, targets, total,
                                           started)
            finally:
                for target, _ in targets:
                    target.close()
        final = self.store.get_backfill_job(job.id)
        self.store.set_backfill_status(job.id, BackfillStatus.COMPLETED)
        self._drop_staging(schema)
        seconds = time.monotonic() - started
        return BackfillResult(job.id, final.count_record, total, chunks, seconds, job.attempts,
                              table, final.rows_inserted, final.rows_updated, final.rows_deleted,
                              where, list(params))

    def _open_destination(
        self, destination: Destination, schema: TableSchema
    ) -> psycopg2.extensions.connection:
        conn = connect_destination(self.pipeline, destination)
        staging = sql.Identifier(destination.schema, backfill_staging_table(self.job_id))
        with conn.cursor() as cursor:
            cursor.execute(sql.SQL(
                "CREATE TABLE IF NOT EXISTS {staging} (LIKE {target}); "
                "ALTER TABLE {staging} ADD COLUMN IF NOT EXISTS {chunk} integer NOT NULL; "
                "CREATE TABLE IF NOT EXISTS {marks} (chunk integer PRIMARY KEY)"
            ).format(staging=staging, target=sql.Identifier(destination.schema, schema.table.name),
                     chunk=sql.Identifier(BACKFILL_CHUNK_COLUMN),
                     marks=sql.Identifier(destination.schema, backfill_marks_table(self.job_id))))
        return conn

    def _copy_chunks(
        self,
        job: BackfillJob,
        source: psycopg2.extensions.connection,
        schema: TableSchema,
        where: sql.Composable,
        params: Sequence[Any],
        targets: Sequence[tuple[psycopg2.extensions.connection, str]],
        total: int,
        started: float,
    ) -> int:
        resume = job.resume_position or {}
        chunk = int(resume.get("chunk", 0))
        last_key: list[Any] | None = resume.get("last_key")
        if resume.get("final"):
            return chunk
        keys = sql.SQL(", ").join(sql.Identifier(k) for k in schema.primary_key)
        keys_as_text = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(k))
                                          for k in schema.primary_key)
        columns = sql.SQL(", ").join(sql.Identifier(c) for c in schema.column_names)
        table = sql.Identifier(schema.table.schema, schema.table.name)
        chunks = 0
        while True:
            self._check_cancelled()
            bounds, bound_params = key_range(schema, last_key, None, _source_type)
            cursor = source.cursor()
            cursor.execute(sql.SQL(
                "SELECT {keys_as_text} FROM (SELECT {keys} FROM {table} WHERE ({where}) AND "
                "{bounds} ORDER BY {keys} OFFSET %s LIMIT 1) AS upper_key").format(
                    keys_as_text=keys_as_text, keys=keys, table=table, where=where, bounds=bounds),
                [*params, *bound_params, self.chunk_rows - 1])
            upper_row = cursor.fetchone()
            upper = list(upper_row) if upper_row else None
            chunk += 1
            body = {"job": job.id, "chunk": chunk, "table": schema.table.qualified}
            _emit_watermark(source, {**body, "kind": "low"})
            _wait_for_transactions_in_flight(source)
            range_sql, range_params = key_range(schema, last_key, upper, _source_type)
            buffer = io.StringIO()
            copy = sql.SQL(
                "COPY (SELECT {columns}, {chunk} FROM {table} WHERE ({where}) AND {range}) TO STDOUT"
            ).format(columns=columns, chunk=sql.Literal(chunk), table=table, where=where,
                     range=range_sql)
            cursor.copy_expert(cursor.mogrify(copy, [*params, *range_params]).decode(), buffer)
            rows = buffer.getvalue().count("\n")
            for target, target_schema in targets:
                self._stage(target, target_schema, chunk, columns, buffer)
            # The chunk covers last_key < key <= upper: the stream deletes what the destination
            # has in that range and the source chunk has not.
            _emit_watermark(source, {**body, "kind": "high", "after_key": last_key,
                                     "last_key": upper, "rows": rows, "filter": job.filter})
            cursor.close()
            if not self._wait_applied(chunk):
                chunk -= 1  # the stream asks for a re-read: same range again
                continue
            chunks += 1
            done = self.store.get_backfill_job(job.id).count_record
            elapsed = max(time.monotonic() - started, 1e-6)
            percent = 100.0 * done / total if total else 100.0
            self.log.info("Backfill job %d: chunk %d applied, %d/%d rows (%.1f%%), %.0f rows/s",
                          job.id, chunk, done, total, min(percent, 100.0), done / elapsed)
            if upper is None:
                return chunks
            last_key = upper

    def _stage(self, target: psycopg2.extensions.connection, target_schema: str, chunk: int,
               columns: sql.Composable, buffer: io.StringIO) -> None:
        """Stage ``chunk`` in one destination and mark it staged (replacing a read made before
        the stream asked for a re-read)."""
        staging = sql.Identifier(target_schema, backfill_staging_table(self.job_id))
        marks = sql.Identifier(target_schema, backfill_marks_table(self.job_id))
        buffer.seek(0)
        with target.cursor() as cursor:
            cursor.execute("BEGIN")
            cursor.execute(sql.SQL("DELETE FROM {} WHERE {} = %s").format(
                staging, sql.Identifier(BACKFILL_CHUNK_COLUMN)), (chunk,))
            cursor.copy_expert(sql.SQL("COPY {} ({}, {}) FROM STDIN").format(
                staging, columns, sql.Identifier(BACKFILL_CHUNK_COLUMN)), buffer)
            cursor.execute(sql.SQL("INSERT INTO {} VALUES (%s) ON CONFLICT DO NOTHING").format(
                marks), (chunk,))
            cursor.execute("COMMIT")

    def _wait_applied(self, chunk: int) -> bool:
        """True once the stream applied ``chunk``; False when it asks for a re-read."""
        deadline = time.monotonic() + self.chunk_timeout_s
        while time.monotonic() < deadline:
            job = self.store.get_backfill_job(self.job_id)
            position = job.resume_position or {}
            if int(position.get("chunk", 0)) >= chunk:
                return True
            if position.get("redo") == chunk:
                return False
            if job.status is BackfillStatus.CANCELLED:
                raise BackfillCancelled(f"Backfill job {self.job_id} was cancelled.")
            time.sleep(0.05)
        raise self._fail(
            f"Backfill job {self.job_id}: pipeline {self.pipeline.name} did not apply chunk "
            f"{chunk} within {self.chunk_timeout_s:.0f}s; is its stream running?"
        )

    def _drop_staging(self, schema: TableSchema) -> None:
        for destination in self.pipeline.destinations:
            with destination_connection(self.pipeline, destination) as conn, conn.cursor() as cur:
                cur.execute(sql.SQL("DROP TABLE IF EXISTS {}, {}").format(
                    sql.Identifier(destination.schema, backfill_staging_table(self.job_id)),
                    sql.Identifier(destination.schema, backfill_marks_table(self.job_id))))


def _count(conn: psycopg2.extensions.connection, schema: TableSchema, where: sql.Composable,
           params: Sequence[Any]) -> int:
    with conn.cursor() as cursor:
        cursor.execute(sql.SQL("SELECT count(*) FROM {} WHERE {}").format(
            sql.Identifier(schema.table.schema, schema.table.name), where), list(params))
        return int(cursor.fetchone()[0])  # type: ignore[index]


def _source_type(column: Column) -> sql.Composable:
    return sql.SQL(column.type_sql)
