"""Throwaway source/destination environments and streaming helpers, shared by the tests and
the benchmarks (real PostgreSQL clusters on 127.0.0.1; nothing here is used by the product)."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import psycopg2
import yaml
from psycopg2 import sql

from rosetta_dagster.core.backfill import BackfillRunner
from rosetta_dagster.core.capture import PositionStore, capture_engine
from rosetta_dagster.core.config_store import ConfigStore
from rosetta_dagster.core.local_postgres import LocalPostgresCluster
from rosetta_dagster.core.pipeline_config import (
    Destination,
    PipelineDefinition,
    PostgresEndpoint,
    StreamSettings,
    TableRef,
    load_config,
)
from rosetta_dagster.core.streaming import StreamingSession

# Unless told an interval, a wait polls every 0.2 s at first, then less often the longer it
# lasts (every 0.5 s after 6 s): most predicates open connections, and the long waits of
# several test workers at once cost a good share of the machine.
POLL_INITIAL_S, POLL_MAX_S, POLL_GROWTH = 0.2, 0.5, 0.05


def _poll_interval(waited_s: float) -> float:
    return min(POLL_MAX_S, POLL_INITIAL_S + waited_s * POLL_GROWTH)


def wait_until(predicate: Callable[[], bool], timeout_s: float = 60, message: str = "",
               interval_s: float | None = None) -> None:
    started = time.monotonic()
    deadline = started + timeout_s
    while not predicate():
        now = time.monotonic()
        if now > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {message or predicate}")
        time.sleep(interval_s if interval_s is not None else _poll_interval(now - started))


# ``compare(tables, first_only)``: for each of ``tables`` (names) whose destination rows differ
# from the source's, in order, the lines saying how; with ``first_only``, for the first only.
TableComparison = Callable[[Sequence[str], bool], dict[str, list[str]]]


def differing_rows(tables: Sequence[str], compare: TableComparison) -> list[str]:
    """Every row of ``tables`` that differs, as ``compare`` says it."""
    return [line for lines in compare(tables, False).values() for line in lines]


def wait_until_tables_equal(tables: Sequence[str], compare: TableComparison, timeout_s: float,
                            what: str) -> None:
    """Wait until every one of ``tables`` equals the source, else fail with (up to 40 of) the
    rows that differ. A table found equal is not read again until every table has been, which
    spares the many-table matrices most of their reads; then all are compared once more (the
    stream may have changed one meanwhile) and those that differ are waited for again."""
    started = time.monotonic()
    pending = list(tables)
    while True:
        if pending:
            differing = compare(pending, True)
            pending = pending[pending.index(next(iter(differing))):] if differing else []
        if not pending:
            pending = list(compare(tables, False))
            if not pending:
                return
        waited = time.monotonic() - started
        if waited > timeout_s:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; the rows "
                                 "that differ:\n" + "\n".join(differing_rows(tables, compare)[:40]))
        time.sleep(_poll_interval(waited))


def execute(
    url: str, *statements: str | sql.Composable, params: tuple[object, ...] = ()
) -> None:
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement, params or None)
    conn.close()


def fetch(
    url: str, statement: str | sql.Composable, params: tuple[object, ...] = ()
) -> list[tuple[object, ...]]:
    conn = psycopg2.connect(url)
    with conn.cursor() as cursor:
        cursor.execute(statement, params or None)
        rows = cursor.fetchall()
    conn.close()
    return rows


def count_rows(url: str, table: str) -> int:
    """Rows in ``schema.table``; -1 while the table does not exist yet."""
    schema, name = table.split(".")
    try:
        rows = fetch(url, sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, name)))
    except psycopg2.errors.UndefinedTable:
        return -1
    return int(rows[0][0])  # type: ignore[call-overload]


def table_fingerprint(url: str, schema: str, table: str, key: str = "id") -> tuple[int, str]:
    """Row count and an ordered checksum over every column's text form."""
    rows = fetch(
        url,
        sql.SQL(
            "SELECT count(*), coalesce(md5(string_agg(t::text, E'\\n' ORDER BY t.{key})), '') "
            "FROM {table} t"
        ).format(key=sql.Identifier(key), table=sql.Identifier(schema, table)),
    )
    count, checksum = rows[0]
    return int(count), str(checksum)  # type: ignore[arg-type]


class BackgroundWriter:
    """Writes in its own thread (``write`` until ``stopping``) for the duration of a block."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.write, daemon=True)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def write(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(30)


class EventInserter(BackgroundWriter):
    """Inserts rows with new keys into public.events (id bigint, payload text, at
    timestamptz), one transaction each, until stopped."""

    def __init__(self, url: str, first_id: int) -> None:
        self.url, self.next_id = url, first_id
        super().__init__()

    def write(self) -> None:
        conn = psycopg2.connect(self.url)
        conn.autocommit = True
        with conn.cursor() as cursor:
            while not self.stopping:
                cursor.execute("INSERT INTO public.events VALUES (%s, repeat('p', 50), now())",
                               (self.next_id,))
                self.next_id += 1
                time.sleep(0.002)
        conn.close()


@dataclass
class StreamingEnv:
    cluster: LocalPostgresCluster
    source_db: str
    destination_db: str
    offsets_dir: Path
    engine: str = "debezium"
    # Where the destination database lives, when not on the source's cluster.
    destination_cluster: LocalPostgresCluster | None = None

    @property
    def target_cluster(self) -> LocalPostgresCluster:
        return self.destination_cluster or self.cluster

    @property
    def source_url(self) -> str:
        return self.cluster.dsn(self.source_db)

    @property
    def destination_url(self) -> str:
        return self.target_cluster.dsn(self.destination_db)

    def pipeline(self, name: str, tables: list[str], **settings: object) -> PipelineDefinition:
        endpoint = {
            "host": "127.0.0.1",
            "port": self.cluster.port,
            "user": self.cluster.superuser,
            "password": self.cluster.password,
        }
        return PipelineDefinition(
            name=name,
            source=PostgresEndpoint(name="src", database=self.source_db, **endpoint),
            destinations=(
                Destination(name="dst", database=self.destination_db, schema="replica",
                            **{**endpoint, "port": self.target_cluster.port}),
            ),
            tables=tuple(TableRef.parse(t) for t in tables),
            settings=StreamSettings(**{"heartbeat_interval_ms": 1000, "engine": self.engine,  # type: ignore[arg-type]
                                       **settings}),
        )

    def positions(self, pipeline: PipelineDefinition) -> PositionStore:
        """Where this env's engine keeps the pipeline's stream position."""
        return capture_engine(self.engine).position_store(pipeline, self.offsets_dir)

    def wait_for_stored_position(self, pipeline: PipelineDefinition) -> None:
        """Until the pipeline's position is stored. An initial load's rows are visible before it
        records its position: a session stopped between the two loads again at its next start
        (nothing lost), which a test expecting the stream to resume must not let happen."""
        wait_until(lambda: self.positions(pipeline).exists(), 60,
                   f"a stored position of {pipeline.name}")

    def write_pipeline_file(
        self, path: Path, name: str, tables: Sequence[str | Mapping[str, object]],
        streaming: dict[str, object] | None = None,
        more_destinations: Mapping[str, Mapping[str, object]] | None = None,
    ) -> Path:
        """rosetta.yaml for this env; the password is ${TEST_PG_PASSWORD} (see pipeline_env).
        ``tables``: names or table entries with options; ``more_destinations``: more
        destinations after ``dst``, each as port, database and schema on this env's host."""
        endpoint = {"host": "127.0.0.1", "port": self.cluster.port, "user": self.cluster.superuser,
                    "password": "${TEST_PG_PASSWORD}"}
        destinations = {
            "dst": {**endpoint, "port": self.target_cluster.port,
                    "database": self.destination_db, "schema": "replica"},
            **{d: {**endpoint, **settings} for d, settings in (more_destinations or {}).items()},
        }
        pipeline: dict[str, object] = {
            "source": "src", "destinations": list(destinations), "tables": list(tables),
            "streaming": {"engine": self.engine, **(streaming or {})}}
        path.write_text(yaml.safe_dump({
            "sources": {"src": {**endpoint, "database": self.source_db}},
            "destinations": destinations,
            "pipelines": {name: pipeline},
        }))
        return path

    def load_pipeline(self, path: Path, name: str) -> PipelineDefinition:
        """A pipeline of a file written by :meth:`write_pipeline_file`, secrets resolved."""
        return load_config(path, {"TEST_PG_PASSWORD": self.cluster.password}).pipeline(name)

    def pipeline_env(self, pipeline_file: Path, config_url: str) -> dict[str, str]:
        """Environment of a process that streams this env's pipelines."""
        return {**os.environ, "ROSETTA_CONFIG": str(pipeline_file),
                "ROSETTA_OFFSETS_DIR": str(self.offsets_dir), "CONFIG_DATABASE_URL": config_url,
                "TEST_PG_PASSWORD": self.cluster.password}

    def converged(self, table: str, key: str = "id") -> bool:
        schema, name = table.split(".")
        try:
            return table_fingerprint(self.source_url, schema, name, key) == table_fingerprint(
                self.destination_url, "replica", name, key
            )
        except psycopg2.Error:
            return False


def new_streaming_env(
    cluster: LocalPostgresCluster, root: Path, engine: str = "debezium",
    destination_cluster: LocalPostgresCluster | None = None,
) -> StreamingEnv:
    suffix = uuid.uuid4().hex[:8]
    source_db, destination_db = f"src_{suffix}", f"dst_{suffix}"
    cluster.create_database(source_db)
    (destination_cluster or cluster).create_database(destination_db)
    return StreamingEnv(cluster, source_db, destination_db, root / f"offsets-{suffix}", engine,
                        destination_cluster)


def drop_slots(env: StreamingEnv, *, wait_s: float = 60) -> None:
    """Drop the env's replication slots once their consumers let go (slot names are per
    cluster: the next test may reuse them)."""
    wait_until(lambda: not fetch(env.cluster.dsn(), "SELECT 1 FROM pg_replication_slots "
                                 "WHERE active AND database = %s", (env.source_db,)), wait_s)
    execute(env.cluster.dsn(), "SELECT pg_drop_replication_slot(slot_name) FROM "
            "pg_replication_slots WHERE database = %s", params=(env.source_db,))


def replica_tables(env: StreamingEnv) -> int:
    """How many tables the destination's replica schema holds (0: nothing was written)."""
    rows = fetch(env.destination_url,
                 "SELECT count(*) FROM pg_tables WHERE schemaname = 'replica'")
    return int(rows[0][0])  # type: ignore[call-overload]


def run_requested_backfill(store: ConfigStore, pipeline: PipelineDefinition, jobs: int,
                           message: str) -> None:
    """Wait until the stream has requested the pipeline's ``jobs``-th backfill job (a column
    type changed on the source), then run the newest job to its end here."""
    wait_until(lambda: len(store.list_backfill_jobs(pipeline=pipeline.name)) == jobs, 60, message)
    job = max(store.list_backfill_jobs(pipeline=pipeline.name), key=lambda j: j.id)
    BackfillRunner(pipeline, store, job.id, chunk_timeout_s=60).run()


@contextmanager
def streaming(session: StreamingSession) -> Iterator[threading.Thread]:
    """Run a session in a thread for the duration of the block, then stop it cleanly."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            session.run(stop_when=lambda _: stop.is_set())
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        thread.join(60)
    if errors:
        raise errors[0]
