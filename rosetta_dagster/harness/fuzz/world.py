"""Where the fuzzer runs: real PostgreSQL servers, a config store, and one example at a time.

A :class:`FuzzWorld` lasts a whole fuzzing session: a source cluster, a destination cluster
(first destination, the native-replication oracle and the config store) and a second
destination cluster that faults take down. Each Hypothesis example is an :class:`Example`: its
own schemas, pipeline (file and name), stream process, backfills and native subscription, all
removed afterwards.

The stream is the real command (``rosetta stream``) in a process of its own, so that a kill -9 is
one; a supervisor thread starts it again when it ends, as the Dagster sensor does.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import yaml
from psycopg2 import sql

from rosetta_dagster.core.backfill import BackfillError, BackfillRunner, fail_abandoned_job
from rosetta_dagster.core.config_store import (
    BackfillJob,
    BackfillStatus,
    ConfigStore,
    PipelineStatus,
)
from rosetta_dagster.core.dsn import pinned_options
from rosetta_dagster.core.errors import RosettaError
from rosetta_dagster.core.local_postgres import LocalPostgresCluster
from rosetta_dagster.core.pipeline_config import PipelineDefinition, load_config
from rosetta_dagster.core.pool import PoolSettings, ResilientConnectionPool
from rosetta_dagster.harness.fuzz.workload import (
    FuzzTable,
    big_function,
    create_table_sql,
    fuzz_tables,
)
from rosetta_dagster.harness.type_matrix import (
    FAMILIES,
    families_for,
    pinned_connection,
    user_types_for,
)

PASSWORD = "fuzz-Pw-1"
_numbers = itertools.count(1)


@dataclass
class FuzzWorld:
    root: Path
    source: LocalPostgresCluster
    destination: LocalPostgresCluster
    second: LocalPostgresCluster  # the second destination's server: taken down by faults
    store: ConfigStore
    pool: ResilientConnectionPool
    config_url: str
    source_dbs: dict[str, str] = field(default_factory=dict)  # engine -> database
    streams: list[StreamProcess] = field(default_factory=list)  # every one started here

    @classmethod
    def start(cls, root: Path) -> FuzzWorld:
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o755)
        clusters = [LocalPostgresCluster(root / name, password=PASSWORD).start()
                    for name in ("source", "destination", "second")]
        for cluster in clusters[1:]:
            cluster.create_database("dst")
        native = pinned_connection(clusters[1].create_database("native"))
        with native.cursor() as cursor:  # the matrix table's user types
            cursor.execute(user_types_for(FAMILIES))
        native.close()
        config_url = clusters[1].create_database("config")
        pool = ResilientConnectionPool(config_url, PoolSettings(max_conn=4)).open()
        store = ConfigStore(pool)
        store.upgrade()
        return cls(root, *clusters, store, pool, config_url)

    def source_db(self, engine: str) -> str:
        """The engine's source database: the user types of the type matrix (Debezium's
        without a domain over an enum, on which it fails to start)."""
        if engine not in self.source_dbs:
            name = f"src_{engine}"
            url = self.source.create_database(name)
            conn = pinned_connection(url)
            with conn.cursor() as cursor:
                cursor.execute(user_types_for(families_for(engine)))
            conn.close()
            self.source_dbs[engine] = name
        return self.source_dbs[engine]

    def close(self) -> None:
        """Stop every stream process (kill -9: nothing of them is needed) and the servers."""
        for stream in self.streams:
            stream.wanted = False
            stream.kill()
        self.pool.close()
        for cluster in (self.source, self.destination, self.second):
            cluster.destroy()


SLOW_STOP_S = 15.0


class StreamProcess:
    """``rosetta stream NAME`` kept running by a supervisor thread while it is wanted."""

    def __init__(self, name: str, env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.env = env
        self.log_path = log_path
        self.wanted = False
        self.starts = 0
        self.exits: list[int] = []
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, daemon=True)
        self._supervisor.start()

    def _spawn(self) -> None:
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts + 1} ---\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                [sys.executable, "-m", "rosetta_dagster.cli", "stream", self.name],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        self.starts += 1

    def _supervise(self) -> None:
        while not self._closing.wait(0.3):
            with self._lock:
                process = self._process
                if process is not None and process.poll() is not None:
                    self.exits.append(process.returncode)
                    self._process = None
                if self.wanted and self._process is None:
                    if self.exits and self.exits[-1] not in (0, -signal.SIGKILL):
                        time.sleep(0.5)  # a failed start: as the supervisor would, a bit later
                    self._spawn()

    def start(self) -> None:
        with self._lock:
            self.wanted = True
            if self._process is None:
                self._spawn()

    def kill(self) -> None:
        """kill -9; the supervisor starts it again while it is wanted."""
        with self._lock:
            if self._process is not None:
                with suppress(ProcessLookupError):
                    os.kill(self._process.pid, signal.SIGKILL)

    def stop(self, timeout_s: float = 60) -> None:
        """SIGTERM (a clean close) and wait; kill -9 when it does not end in time."""
        with self._lock:
            self.wanted = False
            process = self._process
        if process is None:
            return
        asked = time.monotonic()
        with suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        took = time.monotonic() - asked
        if took > SLOW_STOP_S:  # a stream should end within seconds of SIGTERM: worth a look
            print(f"    stream {self.name} took {took:.0f} s to stop after SIGTERM"
                  + (" (killed)" if took >= timeout_s else f"; see {self.log_path}"),
                  file=sys.stderr, flush=True)
        with self._lock:
            if self._process is process:
                self.exits.append(process.returncode)
                self._process = None

    @property
    def running(self) -> bool:
        process = self._process
        return process is not None and process.poll() is None

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def close(self) -> None:
        self.stop()
        self._closing.set()
        self._supervisor.join(5)


class Backfill:
    """A backfill job of one table, copied in a thread of this process (as the Dagster asset
    does) while the example goes on; retried like a failed run is, until it completes."""

    ATTEMPTS = 10

    def __init__(self, pipeline: PipelineDefinition, store: ConfigStore, job: BackfillJob) -> None:
        self.job = job
        self.errors: list[str] = []
        self.completed = False
        self._thread = threading.Thread(target=self._run, args=(pipeline, store), daemon=True)
        self._thread.start()

    @classmethod
    def request(cls, pipeline: PipelineDefinition, store: ConfigStore, table: str) -> Backfill:
        """A user's request (``rosetta backfill request``)."""
        return cls(pipeline, store, store.create_backfill_job(pipeline.name, table))

    def _run(self, pipeline: PipelineDefinition, store: ConfigStore) -> None:
        for attempt in range(self.ATTEMPTS):
            try:
                if attempt:
                    # As the backfill sensor does: an attempt that could not record its
                    # outcome (the config store was down) leaves the job EXECUTING.
                    job = store.get_backfill_job(self.job.id)
                    if job.status is BackfillStatus.COMPLETED:  # run meanwhile as claimed below
                        self.completed = True
                        return
                    if job.status in (BackfillStatus.PENDING, BackfillStatus.QUEUED):
                        time.sleep(2)  # claimed (run_requested_backfills), as the sensor does
                        continue
                    if job.status is BackfillStatus.EXECUTING:
                        fail_abandoned_job(store, job)
                    store.retry_backfill_job(self.job.id)
                BackfillRunner(pipeline, store, self.job.id, chunk_rows=7,
                               chunk_timeout_s=20, max_attempts=self.ATTEMPTS).run()
                self.completed = True
                return
            except (RosettaError, psycopg2.Error) as exc:
                self.errors.append(str(exc).strip().splitlines()[0])
                time.sleep(2)

    def wait(self, timeout_s: float) -> bool:
        self._thread.join(timeout_s)
        return not self._thread.is_alive()


class Example:
    """One example's schemas, pipeline and stream."""

    def __init__(self, world: FuzzWorld, engine: str, *, engine_snapshot: bool = False) -> None:
        self.world = world
        self.engine = engine
        number = next(_numbers)
        self.schema = f"x{os.getpid()}_{number}"
        self.target_schema = f"r{os.getpid()}_{number}"
        self.name = f"fz{os.getpid()}_{number}"
        # Offsets flushed after (about) every batch, every 200 ms or every 2 s (Debezium): an offset
        # stored inside a group of changes, or a long stretch delivered again after a kill.
        self.offset_flush_interval_ms = (1, 200, 2000)[number % 3]
        self.source_db = world.source_db(engine)
        # Loaded (and re-synced) by the engine's own snapshot: chosen per round, never per
        # example (Hypothesis replays an example and must draw from the same tables).
        self.engine_snapshot = engine_snapshot
        self.tables = fuzz_tables(engine, engine_snapshot=self.engine_snapshot)
        self.directory = world.root / self.name
        self.directory.mkdir(parents=True, exist_ok=True)
        self.pipeline_file = self.directory / "rosetta.yaml"
        self.in_pipeline = {t.name for t in self.tables if t.in_pipeline}
        self.stream = StreamProcess(self.name, {
            **os.environ, "ROSETTA_CONFIG": str(self.pipeline_file),
            "ROSETTA_OFFSETS_DIR": str(self.directory / "offsets"),
            "CONFIG_DATABASE_URL": world.config_url, "FUZZ_PG_PASSWORD": PASSWORD,
            "PYTHONUNBUFFERED": "1"}, self.directory / "stream.log")
        world.streams.append(self.stream)
        self.backfills: list[Backfill] = []
        self.native = False
        self.native_retired: str | None = None
        self.setup_sql: list[str] = []  # as run, for the reproduction script

    # -- servers and connections -----------------------------------------------------------

    @property
    def source_url(self) -> str:
        return self.world.source.dsn(self.source_db)

    def destination_urls(self) -> list[tuple[str, str]]:
        return [("d1", self.world.destination.dsn("dst")), ("d2", self.world.second.dsn("dst"))]

    @property
    def native_url(self) -> str:
        return self.world.destination.dsn("native")

    def connect_source(self) -> psycopg2.extensions.connection:
        conn = pinned_connection(self.source_url)
        with conn.cursor() as cursor:
            cursor.execute("SET lock_timeout = '10s'")
        return conn

    def qualified(self, table: str) -> sql.Identifier:
        return sql.Identifier(self.schema, table)

    def _setup_statements(self) -> list[sql.Composable]:
        statements: list[sql.Composable] = [
            sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(self.schema)),
            big_function(self.schema)]
        for table in self.tables:
            statements += create_table_sql(self.schema, table)
        return statements

    # -- set up ------------------------------------------------------------------------------

    def create(self) -> None:
        """The example's schema, helper function and tables (empty) on the source."""
        conn = pinned_connection(self.source_url)
        with conn.cursor() as cursor:
            for statement in self._setup_statements():
                self.setup_sql.append(statement.as_string(conn))
                cursor.execute(statement)
        conn.close()
        self.write_pipeline_file()

    def mark_started(self) -> None:
        """As ``rosetta pipeline start`` does: backfills need the pipeline to be START."""
        store = self.world.store
        store.sync_pipeline(self.pipeline())
        store.set_pipeline_status(self.name, PipelineStatus.START)

    def run_requested_backfills(self) -> None:
        """Jobs the stream requested itself (changed types or options, a new target) run as the
        backfill sensor would run them; jobs of earlier examples are cancelled."""
        store = self.world.store
        for job in store.claim_pending_backfill_jobs():
            if job.pipeline != self.name:
                store.cancel_backfill_job(job.id)
                continue
            self.backfills.append(Backfill(self.pipeline(), store, job))

    def write_pipeline_file(self) -> None:
        endpoint = {"host": "127.0.0.1", "user": "postgres", "password": "${FUZZ_PG_PASSWORD}"}
        entries: list[object] = []
        for table in self.tables:
            if table.name in self.in_pipeline:
                name = f"{self.schema}.{table.name}"
                entries.append({"name": name, **table.options} if table.options else name)
        self.pipeline_file.write_text(yaml.safe_dump({
            "sources": {"src": {**endpoint, "port": self.world.source.port,
                                "database": self.source_db}},
            "destinations": {
                "d1": {**endpoint, "port": self.world.destination.port, "database": "dst",
                       "schema": self.target_schema},
                "d2": {**endpoint, "port": self.world.second.port, "database": "dst",
                       "schema": self.target_schema},
            },
            "pipelines": {self.name: {
                "source": "src", "destinations": ["d1", "d2"], "tables": entries,
                # Small batches: a transaction (pgoutput) or an LSN group of COPY rows
                # (Debezium) often spans several.
                "streaming": {"engine": self.engine, "heartbeat_interval_ms": 1000,
                              "apply_retry_seconds": 5,
                              **({"initial_load": "debezium"} if self.engine_snapshot else {}),
                              "offset_flush_interval_ms": self.offset_flush_interval_ms,
                              "max_batch_size": 16}}},
        }))

    def pipeline(self) -> PipelineDefinition:
        return load_config(self.pipeline_file, {"FUZZ_PG_PASSWORD": PASSWORD}).pipeline(self.name)

    def add_table(self, table: FuzzTable) -> None:
        """Add a table to the pipeline: the stream restarts and loads it under a fence."""
        self.in_pipeline.add(table.name)
        self.write_pipeline_file()
        self.stream.stop()
        self.stream.start()

    def drop_slot(self) -> None:
        with self.world.source.admin_cursor(self.source_db) as cursor:
            cursor.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                           "WHERE slot_name = %s AND NOT active", (f"rosetta_{self.name}",))

    # -- native logical replication, the second oracle ---------------------------------------

    def start_native(self) -> None:
        """A subscription of PostgreSQL's own to the pipeline's publication (created by the
        stream's first start), into tables made like the source's."""
        conn = pinned_connection(self.native_url)
        with conn.cursor() as cursor:
            for statement in self._setup_statements():
                cursor.execute(statement)
            source = self.world.source
            cursor.execute(sql.SQL(
                "CREATE SUBSCRIPTION {} CONNECTION %s PUBLICATION {} WITH (copy_data = true)"
            ).format(sql.Identifier(self.name), sql.Identifier(f"rosetta_{self.name}")),
                (f"host=127.0.0.1 port={source.port} dbname={self.source_db} user=postgres "
                 f"password={PASSWORD}",))
        conn.close()
        self.native = True

    def native_ddl(self, statement: sql.Composable) -> None:
        self._on_native(statement)

    def refresh_native(self) -> None:
        self._on_native(sql.SQL("ALTER SUBSCRIPTION {} REFRESH PUBLICATION").format(
            sql.Identifier(self.name)))

    def _on_native(self, statement: sql.Composable) -> None:
        """Run ``statement`` on the subscriber. It may wait for the subscription's table sync,
        which waits (creating its slot) for an open transaction of the workload, which waits for
        this: a lock timeout breaks that cycle, and the native oracle is left out of the rest of
        the example (Rosetta's destinations are still compared)."""
        if not self.native:
            return
        conn = psycopg2.connect(self.native_url, options=pinned_options("-c lock_timeout=10s"))
        conn.autocommit = True
        try:
            with conn.cursor() as cursor:
                cursor.execute(statement)
        except psycopg2.errors.LockNotAvailable:
            self.native = False
            self.native_retired = ("native replication left out: its subscriber's table sync "
                                   "held a lock the example's DDL waited for")
        finally:
            conn.close()

    # -- clean up ----------------------------------------------------------------------------

    def close(self) -> None:
        self.stream.close()
        for backfill in self.backfills:
            backfill.wait(5)
        if not self.world.second.is_running():
            self.world.second.start()
        if self.native or self.native_retired:  # created either way: its subscription goes
            with self.world.destination.admin_cursor("native") as cursor:
                cursor.execute(sql.SQL("DROP SUBSCRIPTION IF EXISTS {}").format(
                    sql.Identifier(self.name)))
                cursor.execute(self._drop_schema(self.schema))
        with self.world.source.admin_cursor(self.source_db) as cursor:
            cursor.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                           "WHERE slot_name LIKE %s AND active_pid IS NOT NULL",
                           (f"%{self.name}%",))
            time.sleep(0.2)
            cursor.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                           "WHERE slot_name LIKE %s AND NOT active", (f"%{self.name}%",))
            cursor.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(
                sql.Identifier(f"rosetta_{self.name}")))
            cursor.execute(self._drop_schema(self.schema))
        for cluster in (self.world.destination, self.world.second):
            with cluster.admin_cursor("dst") as cursor:
                cursor.execute(self._drop_schema(self.target_schema))

    @staticmethod
    def _drop_schema(name: str) -> sql.Composed:
        return sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name))


def backfill_failures(backfills: list[Backfill]) -> list[str]:
    return [f"backfill job {b.job.id}: {e}" for b in backfills for e in b.errors]


__all__ = ["Backfill", "BackfillError", "Example", "FuzzWorld", "StreamProcess"]
