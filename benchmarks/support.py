"""What every benchmark needs: a throwaway PostgreSQL cluster with a source and a destination,
the native logical replication anchor, and result lines the runner collects."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg2
from psycopg2 import sql

from rosetta_dagster.core.local_postgres import LocalPostgresCluster
from rosetta_dagster.core.streaming.termination import exit_now
from rosetta_dagster.harness import StreamingEnv, execute, fetch, new_streaming_env

# The W2 row shape of the issue: bigint pk, int, text, numeric(12,2), timestamptz, jsonb.
W2_COLUMNS = ("id bigint PRIMARY KEY, i int, t text, n numeric(12,2), ts timestamptz, j jsonb")
RESULT_PREFIX = "BENCHMARK_RESULT "
RESULTS_FILE = Path(__file__).with_name("RESULTS.md")


@contextmanager
def benchmark_env(engine: str = "debezium") -> Iterator[StreamingEnv]:
    root = Path(tempfile.mkdtemp(prefix="rosetta-bench-"))
    root.chmod(0o755)  # the server runs as its own OS user under root
    cluster = LocalPostgresCluster(root / "pg", password="bench").start()
    try:
        yield new_streaming_env(cluster, root, engine)
    finally:
        cluster.destroy()
        shutil.rmtree(root, ignore_errors=True)


def emit(result: dict[str, Any]) -> None:
    """One machine-readable line for ``benchmarks.run`` (and a readable copy for humans)."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def create_table(url: str, table: str, columns: str) -> None:
    schema, name = table.split(".")
    # Column definitions are this module's constants, not input.
    execute(url, sql.SQL("CREATE TABLE {} (" + columns + ")").format(  # noqa: S608
        sql.Identifier(schema, name)))


def aggregate(url: str, table: str, column: str = "i") -> tuple[Any, ...]:
    """A cheap convergence probe (count and sums); the full fingerprint is checked once after."""
    schema, name = table.split(".")
    try:
        return fetch(url, sql.SQL("SELECT count(*), sum(id), sum({}) FROM {}").format(
            sql.Identifier(column), sql.Identifier(schema, name)))[0]
    except psycopg2.errors.UndefinedTable:  # the pipeline has not created it yet
        return (-1, None, None)


def wait_for(predicate: Any, timeout_s: float, interval_s: float = 0.1) -> float:
    """Seconds until ``predicate()`` held (polled every ``interval_s``)."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"not reached within {timeout_s}s")
        time.sleep(interval_s)
    return time.monotonic() - started


class NativeSubscription:
    """The anchor: a PostgreSQL publication + subscription of the same table into its own
    database on the same cluster (slot created beforehand, as a same-cluster subscription
    requires)."""

    def __init__(self, env: StreamingEnv, table: str, columns: str, name: str = "native") -> None:
        self.env, self.table, self.name = env, table, name
        self.database = f"{env.destination_db}_{name}"
        env.cluster.create_database(self.database)
        self.url = env.cluster.dsn(self.database)
        create_table(self.url, table, columns)
        schema, relation = table.split(".")
        execute(env.source_url, sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
            sql.Identifier(name), sql.Identifier(schema, relation)))
        execute(env.source_url, "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')",
                params=(name,))
        conninfo = (f"host=127.0.0.1 port={env.cluster.port} dbname={env.source_db} "
                    f"user={env.cluster.superuser} password={env.cluster.password}")
        execute(self.url, sql.SQL(
            "CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION {} WITH (create_slot = false, "
            "slot_name = {}, copy_data = false, enabled = false)").format(
                sql.Identifier(name), sql.Literal(conninfo), sql.Identifier(name), sql.Literal(name)))

    def enable(self) -> None:
        self._alter("ENABLE")

    def disable(self) -> None:
        self._alter("DISABLE")

    def _alter(self, action: str) -> None:
        execute(self.url, sql.SQL("ALTER SUBSCRIPTION {} " + action).format(  # noqa: S608
            sql.Identifier(self.name)))

    def drop(self) -> None:
        execute(self.url, sql.SQL("DROP SUBSCRIPTION {}").format(sql.Identifier(self.name)))


def binary_copy_seconds(
    env: StreamingEnv, source_url: str, destination_url: str, table: str, columns: str
) -> float:
    """The anchor: ``psql -c "COPY t TO STDOUT (FORMAT binary)" | psql -c "COPY t_copy FROM STDIN
    (FORMAT binary)"`` into an empty table with the same primary key."""
    schema, name = table.split(".")
    execute(destination_url, sql.SQL("DROP TABLE IF EXISTS {}").format(
        sql.Identifier(schema, f"{name}_copy")))
    create_table(destination_url, f"{schema}.{name}_copy", columns)
    conn = psycopg2.connect(source_url)
    copy_out = sql.SQL("COPY {} TO STDOUT (FORMAT binary)").format(
        sql.Identifier(schema, name)).as_string(conn)
    copy_in = sql.SQL("COPY {} FROM STDIN (FORMAT binary)").format(
        sql.Identifier(schema, f"{name}_copy")).as_string(conn)
    conn.close()
    psql = env.cluster.binaries.path("psql")

    def command(url: str, statement: str) -> list[str]:
        params = psycopg2.extensions.parse_dsn(url)
        params.pop("password", None)  # given through PGPASSWORD, not the command line
        conninfo = " ".join(f"{key}={value}" for key, value in params.items())
        return [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", conninfo, "-c", statement]

    process_env = {**os.environ, "PGPASSWORD": env.cluster.password}
    started = time.monotonic()
    reader = subprocess.Popen(command(source_url, copy_out), stdout=subprocess.PIPE,
                              env=process_env)
    writer = subprocess.run(command(destination_url, copy_in), stdin=reader.stdout,
                            env=process_env, check=True, capture_output=True)
    if reader.stdout is not None:
        reader.stdout.close()
    if reader.wait() != 0 or writer.returncode != 0:
        raise RuntimeError("the binary COPY pipe failed")
    return time.monotonic() - started


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def write_results_section(name: str, text: str) -> None:
    """Replace one benchmark's section of RESULTS.md (between its markers), keeping the others."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    current = RESULTS_FILE.read_text() if RESULTS_FILE.exists() else "# Benchmark results\n"
    section = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in current and end in current:
        before, rest = current.split(begin, 1)
        updated = before + section + rest.split(end, 1)[1]
    else:
        updated = current.rstrip() + "\n\n" + section + "\n"
    RESULTS_FILE.write_text(updated)


def run_main(main: Callable[[], None]) -> None:
    """Run a benchmark's ``main`` and end the process as the CLI does: a JVM may run in it,
    and a normal exit that a Java thread calling into Python meets can abort (SIGABRT; seen
    once at the end of W2's Debezium snapshot)."""
    main()
    exit_now(0)
