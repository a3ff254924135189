"""Shared fixtures: one throwaway PostgreSQL cluster per session, a fresh database per test; the
fakesnow emulator of Snowflake for the Snowflake destination's tests."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rosetta_dagster.core.config_store import ConfigStore
from rosetta_dagster.core.local_postgres import LocalPostgresCluster
from rosetta_dagster.core.pipeline_config import Destination, SnowflakeAccount
from rosetta_dagster.core.pool import PoolSettings, ResilientConnectionPool
from rosetta_dagster.harness import StreamingEnv, drop_slots, new_streaming_env

TEST_PASSWORD = "s3cret-Test-Pw"

# The modules that take minutes, slowest first. scripts/test.sh runs three pytest-xdist workers
# with whole files as the unit (--dist loadfile: a module's tests stay together, in order, with
# their module-scoped servers) in this order (--no-loadscope-reorder): a long module started
# last would leave one worker idle while the other finishes it.
SLOWEST_FIRST = ("test_snowflake_types", "test_dagster_streaming", "test_type_matrix", "test_fuzz",
                 "test_crash_recovery", "test_snowflake_destination", "test_refused_changes",
                 "test_initial_load", "test_backfill", "test_streaming", "test_duckdb_destination")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: file order kept


@pytest.fixture(scope="session")
def pg_root() -> Iterator[Path]:
    """A directory other users can traverse (pytest's tmp dirs are 0700 under root)."""
    root = Path(tempfile.mkdtemp(prefix="rosetta-tests-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster(pg_root: Path) -> Iterator[LocalPostgresCluster]:
    cluster = LocalPostgresCluster(pg_root / "shared", password=TEST_PASSWORD).start()
    yield cluster
    cluster.destroy()


@pytest.fixture
def dedicated_cluster(pg_root: Path) -> Iterator[LocalPostgresCluster]:
    """A cluster of the test's own, for tests that stop, crash or restart the server."""
    cluster = LocalPostgresCluster(
        pg_root / f"dedicated-{uuid.uuid4().hex[:8]}", password=TEST_PASSWORD
    ).start()
    yield cluster
    cluster.destroy()


@pytest.fixture
def database_url(pg_cluster: LocalPostgresCluster) -> Iterator[str]:
    """URL of a fresh, empty database on the shared cluster."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    url = pg_cluster.create_database(name)
    yield url
    pg_cluster.drop_database(name)


@pytest.fixture
def store(database_url: str) -> Iterator[ConfigStore]:
    """A migrated config store in a fresh database."""
    pool = ResilientConnectionPool(database_url, PoolSettings(max_conn=4)).open()
    config_store = ConfigStore(pool)
    config_store.upgrade()
    yield config_store
    pool.close()


@pytest.fixture
def no_secrets_logged(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Capture logs at INFO and fail the test if the test password appears in any of them."""
    caplog.set_level(logging.INFO)
    yield caplog
    leaked = [r.getMessage() for r in caplog.records if TEST_PASSWORD in r.getMessage()]
    assert not leaked, f"password leaked into logs: {leaked}"


@pytest.fixture(params=["debezium", "pgoutput"])
def engine(request: pytest.FixtureRequest) -> str:
    """The capture engine a streaming test runs with: both, unless the test names one."""
    return str(request.param)


@pytest.fixture
def env(pg_cluster: LocalPostgresCluster, pg_root: Path, engine: str) -> Iterator[StreamingEnv]:
    """Fresh source and destination databases on the shared cluster for ``engine``; its offsets
    directory and replication slots are removed afterwards (slot names are per cluster)."""
    environment = new_streaming_env(pg_cluster, pg_root, engine)
    yield environment
    shutil.rmtree(environment.offsets_dir, ignore_errors=True)
    drop_slots(environment)


@pytest.fixture(scope="session")
def fakesnow_server(pg_root: Path) -> Iterator[dict[str, Any]]:
    """The emulator, served by a process of its own (its work would otherwise share this
    process's interpreter lock with the streams under test) on a port the OS picked; its
    databases are in memory, shared by every session."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = (pg_root / "fakesnow.log").open("ab")
    server = subprocess.Popen([sys.executable, "-m", "fakesnow", "-s", "--host", "127.0.0.1",
                               "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fakesnow did not start: see {log.name}") from None
            time.sleep(0.1)
    try:
        yield {"user": "fake", "password": "snow", "account": "fakesnow",
               "host": "127.0.0.1", "port": port}
    finally:
        server.terminate()
        server.wait(30)
        log.close()


@pytest.fixture
def emulated(fakesnow_server: dict[str, Any]) -> Destination:
    """A destination in a database of its own on the emulator."""
    from rosetta_dagster.core.destination.snowflake.connection import cursor

    database = f"TEST_{uuid.uuid4().hex[:10].upper()}"
    destination = Destination(
        name="dst", host=fakesnow_server["host"], port=fakesnow_server["port"],
        # The emulator takes any password: a distinctive one, looked for in the logs.
        database=database, user=fakesnow_server["user"], password=f"pw-{uuid.uuid4().hex}",
        schema="replica", kind="snowflake",
        snowflake=SnowflakeAccount(account=fakesnow_server["account"], protocol="http"))
    with cursor(dataclasses.replace(destination, database="")) as cur:
        cur.execute(f"CREATE DATABASE IF NOT EXISTS {database}")
    return destination
