"""Backfill, part 1 of the protocol: a job's chunks read from the source between two
watermarks and staged in every destination (see the package's docstring for the whole)."""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from rosetta_dagster.core.config_store import (
    BackfillJob,
    BackfillStatus,
    ConfigStore,
    PipelineStatus,
)
from rosetta_dagster.core.destination import BackfillRefused, ChunkStaging, destination_kind
from rosetta_dagster.core.dsn import summarize_connection_error
from rosetta_dagster.core.errors import DatabaseConnectionError, RosettaError
from rosetta_dagster.core.events import BACKFILL_MESSAGE_PREFIX
from rosetta_dagster.core.filters import compile_filter, parse_filter
from rosetta_dagster.core.pipeline_config import PipelineDefinition, TableRef
from rosetta_dagster.core.publication import publication_current
from rosetta_dagster.core.replication import (
    Log,
    source_connection,
)
from rosetta_dagster.core.table_schema import (
    Column,
    TableSchema,
    exact_select,
    key_range,
    read_table_schema,
)

logger = logging.getLogger("rosetta.backfill")

FETCH_ATTEMPTS = 3


class BackfillError(RosettaError):
    """A backfill job cannot run (rejected input, stream not running, write failure)."""


class BackfillCancelled(RosettaError):  # noqa: N818 - an outcome, not a failure
    """The job was cancelled while it ran."""


def fetch_pending_jobs(
    store: ConfigStore, log: Log = logger, sleep: Callable[[float], None] = time.sleep,
    limit: int = 10, pipelines: Collection[str] | None = None,
) -> list[BackfillJob]:
    """Claim PENDING jobs (-> QUEUED) of ``pipelines`` (or any), retrying connection errors:
    3 attempts, 2 s then 4 s.

    Checklist scenario 3; other errors are not retried.
    """
    for attempt in range(1, FETCH_ATTEMPTS + 1):
        try:
            jobs = store.claim_pending_backfill_jobs(limit, pipelines)
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
        # Only this database's transactions can have changed the table (a destination on the
        # same server, busy applying the previous chunk, must not hold the next one back).
        cursor.execute(
            "SELECT array_agg(x)::text[] FROM pg_snapshot_xip(pg_current_snapshot()) x "
            "WHERE x::xid IN (SELECT backend_xid FROM pg_stat_activity "
            "                 WHERE datname = current_database() AND backend_xid IS NOT NULL "
            "                 UNION ALL SELECT transaction FROM pg_prepared_xacts "
            "                 WHERE database = current_database())")
        in_flight = cursor.fetchone()[0]  # type: ignore[index]
        while in_flight:
            cursor.execute(
                "SELECT array_agg(x)::text[] FROM unnest(%s::xid8[]) x "
                "WHERE pg_xact_status(x) = 'in progress'", (in_flight,))
            in_flight = cursor.fetchone()[0]  # type: ignore[index]
            if in_flight:
                time.sleep(0.005)


def fail_abandoned_job(store: ConfigStore, job: BackfillJob, log: Log = logger) -> bool:
    """``job``, read EXECUTING, has no run any more (the caller knows runs): its run ended
    without recording an outcome, as when the config store was unreachable when the attempt
    failed or was stopped. FAILED, so `rosetta backfill retry` can run it again; False when the
    run did record an outcome meanwhile (or a later attempt runs)."""
    message = (f"Backfill job {job.id} (attempt {job.attempts}): its run ended without "
               "recording an outcome (was the config store unreachable?); see the run's logs.")
    if not store.fail_abandoned_backfill_job(job.id, job.attempts, message):
        return False
    log.warning(message)
    return True


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
        if stored.status is not PipelineStatus.START:
            raise self._fail(
                f"Backfill job {job.id}: pipeline {self.pipeline.name} is paused; backfills are "
                "applied by its stream, start it first."
            )
        started = time.monotonic()
        self._drop_staging([j.id for j in self.store.list_backfill_jobs(
            pipeline=self.pipeline.name, status=BackfillStatus.COMPLETED)])
        with source_connection(self.pipeline) as source:
            schema = read_table_schema(source, table, f"source {self.pipeline.source.name}",
                                       self.pipeline.options(table))
            self._wait_for_publication(source, schema)
            try:
                where, params = compile_filter(parse_filter(job.filter), schema.column_names,
                                               table.qualified)
            except RosettaError as exc:
                raise self._fail(f"Backfill job {job.id} rejected: {exc}") from None
            if schema.keyless and job.filter:
                raise self._fail(f"Backfill job {job.id} rejected: {keyless_backfill(table)}")
            total = _count(source, schema, where, params)
            self.store.update_backfill_progress(job.id, count_record=job.count_record,
                                                total_record=total)
            stagings: list[ChunkStaging] = []
            try:
                for destination in self.pipeline.destinations:
                    try:
                        stagings.append(destination_kind(destination).open_staging(
                            self.pipeline, destination, schema, job.id,
                            filtered=bool(job.filter)))
                    except BackfillRefused as exc:
                        raise self._fail(str(exc)) from None
                    self._wait_for_destination_table(stagings[-1], schema)
                chunks = self._copy_chunks(job, source, schema, where, params, stagings, total,
                                           started)
            finally:
                for staging in stagings:
                    staging.close()
        final = self.store.get_backfill_job(job.id)
        self.store.set_backfill_status(job.id, BackfillStatus.COMPLETED)
        self._drop_staging([job.id])
        seconds = time.monotonic() - started
        return BackfillResult(job.id, final.count_record, total, chunks, seconds, job.attempts,
                              table, final.rows_inserted, final.rows_updated, final.rows_deleted,
                              where, list(params))

    def _drop_staging(self, job_ids: Collection[int]) -> None:
        """What completed jobs left staged, dropped where it can be: a destination that cannot
        be reached keeps it (never read again) until the pipeline's next job sweeps it, and a
        completed job stays completed."""
        for destination in self.pipeline.destinations:
            try:
                destination_kind(destination).drop_staging(self.pipeline, destination, job_ids)
            except (RosettaError, psycopg2.Error) as exc:
                self.log.warning(
                    "Backfill job %d: the staging tables of completed jobs are left in "
                    "destination %s until the pipeline's next backfill: %s", self.job_id,
                    destination.name, summarize_connection_error(exc))

    def _wait_for_publication(self, source: psycopg2.extensions.connection,
                              schema: TableSchema) -> None:
        """Chunks are read under the table's options only once the publication sends the
        same projection (the stream sets it when it starts); until then the stream could
        skip a change the chunk leaves to it."""
        deadline = time.monotonic() + self.chunk_timeout_s
        while not publication_current(source, self.pipeline, schema):
            if time.monotonic() >= deadline:
                raise self._fail(
                    f"Backfill job {self.job_id}: the publication of pipeline "
                    f"{self.pipeline.name} does not send {schema.table.qualified} with its "
                    f"current columns and row filter after {self.chunk_timeout_s:.0f}s; restart "
                    "the pipeline's stream so it applies them.")
            self._check_cancelled()
            time.sleep(0.5)

    def _wait_for_destination_table(self, staging: ChunkStaging, schema: TableSchema) -> None:
        """Chunks are staged in tables shaped like the destination table (and COPYed in binary
        where the types allow): once the stream has given it the columns the job copies, in
        the source's types (it widens tables when it starts, just after it changes the
        publication, and follows added columns and changed types within seconds)."""
        deadline = time.monotonic() + self.chunk_timeout_s
        while True:
            unlike = staging.columns_unlike_source()
            if not unlike:
                return
            if time.monotonic() >= deadline:
                raise self._fail(
                    f"Backfill job {self.job_id}: destination {staging.name} does not have "
                    f"{', '.join(unlike)} of {schema.table.qualified} as the source has them "
                    f"after {self.chunk_timeout_s:.0f}s; is the pipeline's stream running?")
            self._check_cancelled()
            time.sleep(0.2)

    def _copy_chunks(
        self,
        job: BackfillJob,
        source: psycopg2.extensions.connection,
        schema: TableSchema,
        where: sql.Composable,
        params: Sequence[Any],
        stagings: Sequence[ChunkStaging],
        total: int,
        started: float,
    ) -> int:
        resume = job.resume_position or {}
        chunk = int(resume.get("chunk", 0))
        last_key: list[Any] | None = resume.get("last_key")
        if resume.get("final"):
            return chunk
        keys = sql.SQL(", ").join(sql.Identifier(k) for k in schema.key_columns)
        keys_as_text = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(k))
                                          for k in schema.key_columns)
        selected = sql.SQL(", ").join(exact_select(c) for c in schema.columns)
        table = schema.source_sql
        # The job's filter within the rows the pipeline replicates (the table's row filter).
        where = sql.SQL("{} AND ({})").format(schema.source_filter, where)
        chunks = 0

        def issue(number: int, after: list[Any] | None, upper: list[Any] | None) -> None:
            """Read chunk ``number`` (after < key <= upper) between its two watermarks."""
            body = {"job": job.id, "chunk": number, "table": schema.table.qualified}
            _emit_watermark(source, {**body, "kind": "low"})
            _wait_for_transactions_in_flight(source)
            range_sql, range_params = key_range(schema, after, upper, _source_type)
            select = sql.SQL("SELECT {columns} FROM {table} WHERE ({where}) AND {range}").format(
                columns=selected, table=table, where=where, range=range_sql)
            rows = 0
            with _one_snapshot(source, schema.keyless) as snapshot:
                for index, staging in enumerate(stagings):
                    # Each destination reads the chunk itself, inside the same window.
                    staged = staging.stage(source, select, [*params, *range_params], number)
                    rows = staged if index == 0 else rows
            # The stream deletes what the destination has in the range and the chunk has not.
            _emit_watermark(source, {**body, "kind": "high", "after_key": after,
                                     "last_key": upper, "rows": rows, "filter": job.filter,
                                     **({"snapshot": snapshot} if snapshot else {})})

        # One chunk is read and staged while the stream applies the one before it.
        in_flight: deque[tuple[int, list[Any] | None, list[Any] | None]] = deque()
        while True:
            self._check_cancelled()
            if schema.keyless:  # no key to chunk by: the whole table is one chunk
                chunk += 1
                issue(chunk, None, None)
                while not self._wait_applied(chunk):
                    chunk += 1
                    issue(chunk, None, None)
                return chunks + 1
            bounds, bound_params = key_range(schema, last_key, None, _source_type)
            with source.cursor() as cursor:
                cursor.execute(sql.SQL(
                    "SELECT {keys_as_text} FROM (SELECT {keys} FROM {table} WHERE ({where}) AND "
                    "{bounds} ORDER BY {keys} OFFSET %s LIMIT 1) AS upper_key").format(
                        keys_as_text=keys_as_text, keys=keys, table=table, where=where,
                        bounds=bounds),
                    [*params, *bound_params, self.chunk_rows - 1])
                upper_row = cursor.fetchone()
            upper = list(upper_row) if upper_row else None
            chunk += 1
            issue(chunk, last_key, upper)
            in_flight.append((chunk, last_key, upper))
            while len(in_flight) > (0 if upper is None else 1):
                number, after, through = in_flight[0]
                if not self._wait_applied(number):
                    # The stream asks for a re-read (it did not see the low watermark): the same
                    # range under a new number, so progress never goes back to an older chunk.
                    in_flight.popleft()
                    chunk += 1
                    issue(chunk, after, through)
                    in_flight.appendleft((chunk, after, through))
                    continue
                in_flight.popleft()
                chunks += 1
                done = self.store.get_backfill_job(job.id).count_record
                elapsed = max(time.monotonic() - started, 1e-6)
                percent = 100.0 * done / total if total else 100.0
                self.log.info("Backfill job %d: chunk %d applied, %d/%d rows (%.1f%%), %.0f rows/s",
                              job.id, number, done, total, min(percent, 100.0), done / elapsed)
            if upper is None:
                return chunks
            last_key = upper

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


@contextmanager
def _one_snapshot(source: psycopg2.extensions.connection, fixed: bool) -> Iterator[str | None]:
    """``fixed``: every destination's read of the chunk in one REPEATABLE READ transaction of
    the source; yields the transactions its snapshot sees (``pg_current_snapshot()``), which
    the stream uses to tell the window's changes the chunk already holds from the others (a
    table without a key, whose rows are replaced whole). Otherwise each read is its own."""
    if not fixed:
        yield None
        return
    with source.cursor() as cursor:
        cursor.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        try:
            cursor.execute("SELECT pg_current_snapshot()::text")
            yield str(cursor.fetchone()[0])  # type: ignore[index]
        finally:
            cursor.execute("ROLLBACK")  # read only


def keyless_backfill(table: TableRef) -> str:
    """Why a backfill of a table without a key takes no filter."""
    return (f"{table.qualified} has no key, so a backfill re-copies the whole table (one chunk, "
            "replaced at once); request it without a filter.")


def _count(conn: psycopg2.extensions.connection, schema: TableSchema, where: sql.Composable,
           params: Sequence[Any]) -> int:
    with conn.cursor() as cursor:
        cursor.execute(sql.SQL("SELECT count(*) FROM {} WHERE {} AND ({})").format(
            schema.source_sql, schema.source_filter, where), list(params))
        return int(cursor.fetchone()[0])  # type: ignore[index]


def _source_type(column: Column) -> sql.Composable:
    return sql.SQL(column.type_sql)
