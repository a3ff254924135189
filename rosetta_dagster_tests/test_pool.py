"""The resilient connection pool against real PostgreSQL: checklist scenarios 1 and 2 and more."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg2
import pytest

from rosetta_dagster.core.errors import (
    DatabaseConfigError,
    DatabaseConnectionError,
    PoolExhaustedError,
    StatementTimeoutError,
)
from rosetta_dagster.core.local_postgres import LocalPostgresCluster, find_free_port
from rosetta_dagster.core.pool import PoolSettings, ResilientConnectionPool
from rosetta_dagster_tests.conftest import TEST_PASSWORD


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "rosetta.pool"]


def _scalar(pool: ResilientConnectionPool, statement: str, params: tuple[object, ...] = ()) -> object:
    with pool.connection() as conn, conn.cursor() as cursor:
        cursor.execute(statement, params)
        return cursor.fetchone()[0]


def test_checklist_1_pool_waits_for_a_database_that_starts_late(
    dedicated_cluster: LocalPostgresCluster, no_secrets_logged: pytest.LogCaptureFixture
) -> None:
    url = dedicated_cluster.create_database("late")
    dedicated_cluster.stop()
    pool = ResilientConnectionPool(url, PoolSettings())
    opener = threading.Thread(target=pool.open)
    opener.start()
    # Bring the server back once the first attempt has failed, as in a docker-compose start.
    deadline = time.monotonic() + 10
    while not any("attempt 1/5" in m for m in _messages(no_secrets_logged)):
        assert time.monotonic() < deadline, "the first attempt never failed"
        time.sleep(0.05)
    dedicated_cluster.start()
    opener.join(timeout=30)
    assert not opener.is_alive()

    messages = _messages(no_secrets_logged)
    assert messages[0] == (
        "Failed to initialize connection pool (attempt 1/5): Connection refused. Retrying in 2.0s..."
    )
    assert messages[-1] == f"Connection pool initialized successfully on attempt {len(messages)}"
    assert len(messages) >= 2
    assert _scalar(pool, "SELECT 1") == 1
    assert pool.stats().init_attempts == len(messages)
    pool.close()


def test_pool_initialized_on_first_attempt_logs_it(
    database_url: str, no_secrets_logged: pytest.LogCaptureFixture
) -> None:
    with ResilientConnectionPool(database_url) as pool:
        assert _scalar(pool, "SELECT 1") == 1
        assert pool.stats().init_attempts == 1
    assert _messages(no_secrets_logged) == ["Connection pool initialized successfully on attempt 1"]


def test_init_gives_up_after_five_attempts_with_exponential_backoff(
    no_secrets_logged: pytest.LogCaptureFixture,
) -> None:
    url = f"postgresql://rosetta:{TEST_PASSWORD}@127.0.0.1:{find_free_port()}/config_db"
    delays: list[float] = []
    pool = ResilientConnectionPool(url, PoolSettings(), sleep=delays.append)
    with pytest.raises(DatabaseConnectionError) as raised:
        pool.open()
    assert delays == [2.0, 4.0, 8.0, 10.0]
    assert _messages(no_secrets_logged) == [
        f"Failed to initialize connection pool (attempt {n}/5): Connection refused. "
        f"Retrying in {delay:.1f}s..."
        for n, delay in enumerate(delays, start=1)
    ] + ["Failed to initialize connection pool after 5 attempts: Connection refused"]
    message = str(raised.value)
    assert message.startswith("Could not connect to config_db at rosetta@127.0.0.1:")
    assert message.endswith("after 5 attempts: Connection refused.")
    assert TEST_PASSWORD not in message


def test_wrong_password_fails_at_once_with_a_clear_masked_error(
    pg_cluster: LocalPostgresCluster, no_secrets_logged: pytest.LogCaptureFixture
) -> None:
    url = pg_cluster.dsn("postgres").replace(TEST_PASSWORD, "Wrong-" + TEST_PASSWORD)
    delays: list[float] = []
    with pytest.raises(DatabaseConnectionError) as raised:
        ResilientConnectionPool(url, sleep=delays.append).open()
    assert delays == []  # credentials do not fix themselves: no retries
    assert str(raised.value) == (
        f"Could not connect to config_db at postgres@127.0.0.1:{pg_cluster.port}/postgres: "
        'password authentication failed for user "postgres".'
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (None, "CONFIG_DATABASE_URL for config_db is not set."),
        ("", "CONFIG_DATABASE_URL for config_db is not set."),
        (
            f"mysql://u:{TEST_PASSWORD}@127.0.0.1/db",
            "CONFIG_DATABASE_URL for config_db uses the scheme 'mysql://' but must be a "
            "PostgreSQL URL (postgresql://user:password@host:port/database).",
        ),
        (
            f"postgresql://u:{TEST_PASSWORD}@127.0.0.1:notaport/db",
            "CONFIG_DATABASE_URL for config_db is not a valid PostgreSQL connection URL",
        ),
        (
            f"host=127.0.0.1 password={TEST_PASSWORD} dbname",
            "CONFIG_DATABASE_URL for config_db is not a valid PostgreSQL connection URL",
        ),
    ],
)
def test_malformed_url_is_one_clear_sentence_without_the_password(
    url: str | None, expected: str
) -> None:
    with pytest.raises(DatabaseConfigError) as raised:
        ResilientConnectionPool(url)  # type: ignore[arg-type]
    message = str(raised.value)
    assert message.startswith(expected)
    assert TEST_PASSWORD not in message
    assert message.endswith(".") and "\n" not in message


def test_sqlalchemy_style_scheme_is_accepted(database_url: str) -> None:
    url = database_url.replace("postgresql://", "postgresql+psycopg2://")
    with ResilientConnectionPool(url) as pool:
        assert _scalar(pool, "SELECT 1") == 1


def test_checklist_2_dead_connections_are_detected_and_replaced(
    database_url: str, pg_cluster: LocalPostgresCluster, no_secrets_logged: pytest.LogCaptureFixture
) -> None:
    settings = PoolSettings(max_conn=4, application_name="rosetta-dead-conn-test")
    with ResilientConnectionPool(database_url, settings) as pool:
        held = [pool.getconn() for _ in range(4)]
        pids_before = {conn.get_backend_pid() for conn in held}
        for conn in held:
            pool.putconn(conn)
        assert pool.stats().idle == 4

        with pg_cluster.admin_cursor() as cursor:
            cursor.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = %s",
                ("rosetta-dead-conn-test",),
            )
            assert cursor.fetchone()[0] == 4

        # Callers see only working connections: every checkout succeeds and runs a query.
        held = [pool.getconn() for _ in range(4)]
        for conn in held:
            with conn.cursor() as cursor:
                cursor.execute("SELECT 41 + 1")
                assert cursor.fetchone()[0] == 42
        assert not pids_before & {conn.get_backend_pid() for conn in held}
        for conn in held:
            pool.putconn(conn)

        stats = pool.stats()
        assert stats.dead_detected == 4
        assert stats.total_created == 8
        assert stats.in_use == 0
    dead_lines = [m for m in _messages(no_secrets_logged) if "dead" in m]
    assert dead_lines == ["Detected dead connection, removing from pool"] * 4


def test_server_restart_is_invisible_to_callers(
    dedicated_cluster: LocalPostgresCluster, no_secrets_logged: pytest.LogCaptureFixture
) -> None:
    url = dedicated_cluster.create_database("restart")
    with ResilientConnectionPool(url, PoolSettings(max_conn=3)) as pool:
        with ThreadPoolExecutor(3) as executor:  # fill the pool with idle connections
            list(executor.map(lambda _: _scalar(pool, "SELECT pg_sleep(0.1)"), range(3)))
        dedicated_cluster.restart()
        assert _scalar(pool, "SELECT 7") == 7
        assert pool.stats().dead_detected >= 1
    assert "Detected dead connection, removing from pool" in _messages(no_secrets_logged)


def test_connection_settings_keepalives_timeout_and_utc(database_url: str) -> None:
    with ResilientConnectionPool(database_url) as pool:
        assert _scalar(pool, "SHOW statement_timeout") == "30s"
        assert _scalar(pool, "SHOW TimeZone") == "UTC"
        conn = pool.getconn()
        try:
            params = conn.get_dsn_parameters()
        finally:
            pool.putconn(conn)
    assert params["keepalives"] == "1"
    assert params["keepalives_idle"] == "30"
    assert params["keepalives_interval"] == "10"
    assert params["keepalives_count"] == "5"
    assert params["connect_timeout"] == "10"


def test_statement_timeout_cancels_with_clear_error_and_connection_stays_usable(
    database_url: str,
) -> None:
    settings = PoolSettings(max_conn=1, statement_timeout_ms=300)
    with ResilientConnectionPool(database_url, settings) as pool:
        started = time.monotonic()
        with pytest.raises(StatementTimeoutError) as raised:
            _scalar(pool, "SELECT pg_sleep(5)")
        assert time.monotonic() - started < 3
        assert str(raised.value) == (
            "A statement on config_db ran longer than statement_timeout (300 ms) and was cancelled."
        )
        assert isinstance(raised.value.__cause__, psycopg2.errors.QueryCanceled)
        assert _scalar(pool, "SELECT 1") == 1
        assert pool.stats().total_created == 1  # the same connection, rolled back and reused


def test_context_manager_commits_on_success_and_rolls_back_on_error(database_url: str) -> None:
    with ResilientConnectionPool(database_url) as pool:
        with pool.connection() as conn, conn.cursor() as cursor:
            cursor.execute("CREATE TABLE t (id int PRIMARY KEY)")
            cursor.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(ZeroDivisionError), pool.connection() as conn:
            with conn.cursor() as cursor:
                cursor.execute("INSERT INTO t VALUES (2)")
            raise ZeroDivisionError
        with pytest.raises(psycopg2.errors.UniqueViolation), pool.connection() as conn:
            with conn.cursor() as cursor:
                cursor.execute("INSERT INTO t VALUES (1)")
        assert _scalar(pool, "SELECT array_agg(id) FROM t") == [1]
        assert pool.stats().in_use == 0


def test_exhausted_pool_makes_borrowers_wait_then_succeed(database_url: str) -> None:
    settings = PoolSettings(max_conn=2, checkout_timeout_s=30)
    with ResilientConnectionPool(database_url, settings) as pool:
        with ThreadPoolExecutor(max_workers=6) as executor:
            results = list(executor.map(lambda i: _scalar(pool, "SELECT %s FROM pg_sleep(0.3)", (i,)),
                                        range(6)))
        assert results == list(range(6))
        stats = pool.stats()
        assert stats.total_created <= 2
        assert stats.in_use == 0


def test_exhausted_pool_times_out_with_a_clear_error(database_url: str) -> None:
    settings = PoolSettings(max_conn=2, checkout_timeout_s=0.3)
    with ResilientConnectionPool(database_url, settings) as pool:
        held = [pool.getconn(), pool.getconn()]
        started = time.monotonic()
        with pytest.raises(PoolExhaustedError) as raised:
            pool.getconn()
        assert 0.25 < time.monotonic() - started < 2
        assert str(raised.value) == (
            "Timed out after 0.3s waiting for a connection to config_db: all 2 pooled connections "
            "are in use (raise PIPELINE_POOL_MAX_CONN or look for long-running queries)."
        )
        pool.putconn(held.pop())
        assert _scalar(pool, "SELECT 1") == 1  # a freed slot is usable again
        pool.putconn(held.pop())
        assert pool.stats().checkout_timeouts == 1


def test_pool_size_comes_from_pipeline_pool_max_conn() -> None:
    assert PoolSettings.from_env({}).max_conn == 10
    assert PoolSettings.from_env({"PIPELINE_POOL_MAX_CONN": "15"}).max_conn == 15
    with pytest.raises(DatabaseConfigError, match="PIPELINE_POOL_MAX_CONN must be a positive"):
        PoolSettings.from_env({"PIPELINE_POOL_MAX_CONN": "lots"})
    with pytest.raises(DatabaseConfigError, match="PIPELINE_POOL_MAX_CONN must be a positive"):
        PoolSettings.from_env({"PIPELINE_POOL_MAX_CONN": "0"})


def test_any_failure_of_the_health_check_counts_as_a_dead_connection() -> None:
    """Found by the fuzzer: after a server restart under load, SELECT 1 on a pooled connection
    raised a bare DatabaseError ("server closed the connection unexpectedly"), which the health
    check let through to the caller instead of replacing the connection. (A unit: that error
    cannot be provoked on demand.)"""
    from rosetta_dagster.core.destination.errors import classify

    class _Cursor:
        def __enter__(self) -> _Cursor:
            return self

        def __exit__(self, *exc_info: object) -> None:
            pass

        def execute(self, query: str) -> None:
            raise psycopg2.DatabaseError("server closed the connection unexpectedly")

    class _Connection:
        closed = 0

        def cursor(self) -> _Cursor:
            return _Cursor()

    assert ResilientConnectionPool._is_alive(_Connection()) is False  # type: ignore[arg-type]
    assert classify(psycopg2.DatabaseError("server closed the connection unexpectedly")) == (
        "transient")
    assert classify(psycopg2.DataError("invalid input")) == "other"  # no SQLSTATE, not a break
