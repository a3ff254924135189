"""A psycopg2 connection pool that survives database restarts and dead connections.

Behaviour follows the deployment checklist of the original Rosetta:

* initialisation retries 5 times with exponential backoff (2 s doubling, capped at 10 s);
* every checkout runs ``SELECT 1``; a dead connection is discarded and replaced transparently;
* TCP keepalives, ``connect_timeout`` and ``statement_timeout`` (30 s) on every connection;
* size from ``PIPELINE_POOL_MAX_CONN``; an exhausted pool makes callers wait (bounded).

No Dagster import here: the Dagster resource in ``rosetta_dagster.defs`` wraps this class.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.pool

from rosetta_dagster.core.dsn import (
    DatabaseTarget,
    is_authentication_error,
    parse_database_url,
    pinned_options,
    summarize_connection_error,
)
from rosetta_dagster.core.errors import (
    DatabaseConfigError,
    DatabaseConnectionError,
    PoolExhaustedError,
    StatementTimeoutError,
)

logger = logging.getLogger("rosetta.pool")

POOL_MAX_CONN_ENV = "PIPELINE_POOL_MAX_CONN"
CLOSED_CONNECTION_MESSAGE = "server closed the connection unexpectedly"


@dataclass(frozen=True)
class PoolSettings:
    """Tunables of a :class:`ResilientConnectionPool`; defaults are the checklist's values."""

    min_conn: int = 1
    max_conn: int = 10
    init_attempts: int = 5
    backoff_initial_s: float = 2.0
    backoff_max_s: float = 10.0
    checkout_timeout_s: float = 30.0
    connect_timeout_s: int = 10
    statement_timeout_ms: int = 30_000
    keepalives_idle_s: int = 30
    keepalives_interval_s: int = 10
    keepalives_count: int = 5
    application_name: str = "rosetta"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> PoolSettings:
        """Defaults, with ``max_conn`` from ``PIPELINE_POOL_MAX_CONN`` when it is set."""
        environ = os.environ if environ is None else environ
        settings = cls(**overrides)
        raw = environ.get(POOL_MAX_CONN_ENV, "").strip()
        if raw and "max_conn" not in overrides:
            if not raw.isdigit() or int(raw) < 1:
                raise DatabaseConfigError(
                    f"{POOL_MAX_CONN_ENV} must be a positive integer, got '{raw}'."
                )
            settings = replace(settings, max_conn=int(raw))
        return settings

    def backoff_s(self, attempt: int) -> float:
        """Delay after failed attempt ``attempt`` (1-based): 2, 4, 8, 10, 10, ..."""
        return min(self.backoff_initial_s * 2 ** (attempt - 1), self.backoff_max_s)

    def connect_kwargs(self) -> dict[str, Any]:
        return {
            "connect_timeout": self.connect_timeout_s,
            "keepalives": 1,
            "keepalives_idle": self.keepalives_idle_s,
            "keepalives_interval": self.keepalives_interval_s,
            "keepalives_count": self.keepalives_count,
            "application_name": self.application_name,
        }


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of pool health, read by asset checks and the validation command."""

    max_conn: int
    in_use: int
    idle: int
    total_created: int
    dead_detected: int
    closed_connection_errors: int
    checkout_timeouts: int
    init_attempts: int
    peak_in_use: int = 0  # most connections in use at once since the last usage report


@dataclass(frozen=True)
class PoolUsage:
    """One pool's utilisation since its previous report, for the pool_utilisation check."""

    pool: str  # the pool's label (config_db, destination dst, ...)
    owner: str  # what uses it (a stream, the sensors, the API)
    max_conn: int
    in_use: int
    peak_in_use: int


class _CountingThreadedPool(psycopg2.pool.ThreadedConnectionPool):
    """ThreadedConnectionPool that counts the connections it opens and keeps them open.

    psycopg2 opens ``minconn`` connections up front but also closes every returned connection
    beyond ``minconn``, so a busy pool would reconnect on almost every checkout. Raising
    ``minconn`` after construction keeps up to ``maxconn`` idle connections instead.
    """

    def __init__(self, *args: Any, on_connect: Callable[[], None], **kwargs: Any) -> None:
        self._on_connect = on_connect
        super().__init__(*args, **kwargs)
        self.minconn = self.maxconn

    def _connect(self, key: Any = None) -> psycopg2.extensions.connection:
        conn = super()._connect(key)
        self._on_connect()
        return conn

    def idle_count(self) -> int:
        with self._lock:
            return len(self._pool)


def _is_closed_connection_error(exc: BaseException) -> bool:
    return isinstance(exc, psycopg2.Error) and CLOSED_CONNECTION_MESSAGE in str(exc)


class ResilientConnectionPool:
    """Thread-safe pool of healthy psycopg2 connections to one database.

    ``label`` names the database in errors (``config_db``, a source, a destination) and
    ``setting`` names where its URL came from, so bad configuration is easy to trace.
    """

    def __init__(
        self,
        database_url: str,
        settings: PoolSettings | None = None,
        *,
        label: str = "config_db",
        setting: str = "CONFIG_DATABASE_URL",
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.target: DatabaseTarget = parse_database_url(database_url, label=label, setting=setting)
        self.settings = settings or PoolSettings.from_env()
        if self.settings.min_conn > self.settings.max_conn:
            raise DatabaseConfigError(
                f"Pool for {label}: min_conn {self.settings.min_conn} exceeds max_conn "
                f"{self.settings.max_conn}."
            )
        self._sleep = sleep
        self._pool: _CountingThreadedPool | None = None
        self._slots = threading.BoundedSemaphore(self.settings.max_conn)
        self._stats_lock = threading.Lock()
        self._in_use = 0
        self._peak_in_use = 0
        self._total_created = 0
        self._dead_detected = 0
        self._closed_connection_errors = 0
        self._checkout_timeouts = 0
        self._init_attempts = 0
        self._reported: dict[str, int] = {}

    @property
    def label(self) -> str:
        return self.target.label

    # -- lifecycle -------------------------------------------------------------------------

    def open(self) -> ResilientConnectionPool:
        """Create the pool, retrying while the database is unreachable. Idempotent."""
        if self._pool is not None:
            return self
        attempts = self.settings.init_attempts
        for attempt in range(1, attempts + 1):
            self._init_attempts = attempt
            try:
                self._pool = self._create_pool()
            except psycopg2.OperationalError as exc:
                reason = summarize_connection_error(exc)
                if is_authentication_error(exc):
                    raise DatabaseConnectionError(
                        f"Could not connect to {self.label} at {self.target.description}: {reason}."
                    ) from None
                if attempt == attempts:
                    logger.error(
                        "Failed to initialize connection pool after %d attempts: %s", attempts, reason
                    )
                    raise DatabaseConnectionError(
                        f"Could not connect to {self.label} at {self.target.description} after "
                        f"{attempts} attempts: {reason}."
                    ) from None
                delay = self.settings.backoff_s(attempt)
                logger.warning(
                    "Failed to initialize connection pool (attempt %d/%d): %s. Retrying in %.1fs...",
                    attempt,
                    attempts,
                    reason,
                    delay,
                )
                self._sleep(delay)
            else:
                logger.info("Connection pool initialized successfully on attempt %d", attempt)
                return self
        raise AssertionError("unreachable")  # pragma: no cover

    def _create_pool(self) -> _CountingThreadedPool:
        kwargs = self.settings.connect_kwargs()
        options = self.target.params.get("options", "")
        kwargs["options"] = (
            f"{options} {pinned_options(f'-c statement_timeout={self.settings.statement_timeout_ms}')}"
        ).strip()
        return _CountingThreadedPool(
            self.settings.min_conn,
            self.settings.max_conn,
            self.target.dsn,
            on_connect=self._count_created,
            **kwargs,
        )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.closeall()
            self._pool = None

    def __enter__(self) -> ResilientConnectionPool:
        return self.open()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- checkout --------------------------------------------------------------------------

    def getconn(self) -> psycopg2.extensions.connection:
        """A healthy connection; waits up to ``checkout_timeout_s`` when every one is in use."""
        pool = self._require_open()
        if not self._slots.acquire(timeout=self.settings.checkout_timeout_s):
            with self._stats_lock:
                self._checkout_timeouts += 1
            raise PoolExhaustedError(
                f"Timed out after {self.settings.checkout_timeout_s:g}s waiting for a connection to "
                f"{self.label}: all {self.settings.max_conn} pooled connections are in use "
                f"(raise {POOL_MAX_CONN_ENV} or look for long-running queries)."
            )
        try:
            conn = self._checkout_healthy(pool)
        except BaseException:
            self._slots.release()
            raise
        with self._stats_lock:
            self._in_use += 1
            self._peak_in_use = max(self._peak_in_use, self._in_use)
        return conn

    def _checkout_healthy(self, pool: _CountingThreadedPool) -> psycopg2.extensions.connection:
        # Every idle connection may be dead (e.g. after a server restart), plus one fresh one.
        for _ in range(self.settings.max_conn + 1):
            try:
                conn = pool.getconn()
            except psycopg2.OperationalError as exc:
                raise DatabaseConnectionError(
                    f"Could not open a connection to {self.label} at {self.target.description}: "
                    f"{summarize_connection_error(exc)}."
                ) from None
            if self._is_alive(conn):
                return conn
            logger.warning("Detected dead connection, removing from pool")
            with self._stats_lock:
                self._dead_detected += 1
            pool.putconn(conn, close=True)
        raise DatabaseConnectionError(
            f"Could not get a live connection to {self.label} at {self.target.description}: "
            "every new connection failed its health check."
        )

    @staticmethod
    def _is_alive(conn: psycopg2.extensions.connection) -> bool:
        if conn.closed:
            return False
        try:
            # One round trip: outside autocommit, psycopg2 would send BEGIN, SELECT 1 and a
            # ROLLBACK (three), on every checkout of every batch. A pooled connection is idle.
            conn.autocommit = True
            try:
                with conn.cursor() as cursor:
                    cursor.execute("SELECT 1")
            finally:
                conn.autocommit = False
        except psycopg2.Error:
            # Any failure of SELECT 1 means the connection cannot serve; a server restart shows
            # up as OperationalError, InterfaceError or, seen under load, a bare DatabaseError
            # ("server closed the connection unexpectedly").
            return False
        return True

    def putconn(self, conn: psycopg2.extensions.connection, *, close: bool = False) -> None:
        """Return a connection; closed or broken connections are discarded, not pooled."""
        pool = self._require_open()
        try:
            pool.putconn(conn, close=close or bool(conn.closed))
        finally:
            with self._stats_lock:
                self._in_use -= 1
            self._slots.release()

    @contextmanager
    def connection(self) -> Iterator[psycopg2.extensions.connection]:
        """Borrow a connection: commit on success, roll back on error, always give it back."""
        conn = self.getconn()
        discard = False
        try:
            yield conn
            conn.commit()
        except BaseException as exc:
            discard = not self._rollback_quietly(conn)
            if _is_closed_connection_error(exc):
                with self._stats_lock:
                    self._closed_connection_errors += 1
            if isinstance(exc, psycopg2.errors.QueryCanceled) and "statement timeout" in str(exc):
                raise StatementTimeoutError(
                    f"A statement on {self.label} ran longer than statement_timeout "
                    f"({self.settings.statement_timeout_ms} ms) and was cancelled."
                ) from exc
            raise
        finally:
            self.putconn(conn, close=discard)

    @staticmethod
    def _rollback_quietly(conn: psycopg2.extensions.connection) -> bool:
        """Roll back; False when the connection is unusable and must be discarded."""
        if conn.closed:
            return False
        try:
            conn.rollback()
        except psycopg2.Error:
            return False
        return True

    # -- observability ---------------------------------------------------------------------

    def stats(self) -> PoolStats:
        idle = self._pool.idle_count() if self._pool is not None else 0
        with self._stats_lock:
            return PoolStats(
                max_conn=self.settings.max_conn,
                in_use=self._in_use,
                idle=idle,
                total_created=self._total_created,
                dead_detected=self._dead_detected,
                closed_connection_errors=self._closed_connection_errors,
                checkout_timeouts=self._checkout_timeouts,
                init_attempts=self._init_attempts,
                peak_in_use=self._peak_in_use,
            )

    def take_usage(self) -> PoolUsage:
        """In use now and at most since the previous call (which starts a new peak)."""
        with self._stats_lock:
            usage = PoolUsage(self.label, self.settings.application_name, self.settings.max_conn,
                              self._in_use, self._peak_in_use)
            self._peak_in_use = self._in_use
        return usage

    def take_unreported_events(self) -> list[tuple[str, int]]:
        """``(kind, count)`` of health events since the previous call, for the config store:
        ``init_retried`` (attempts beyond the first), ``dead_connection``, ``closed_connection``
        and ``checkout_timeout``. Recorded by the owner while the pool works again."""
        stats = self.stats()
        current = {
            "init_retried": max(0, stats.init_attempts - 1),
            "dead_connection": stats.dead_detected,
            "closed_connection": stats.closed_connection_errors,
            "checkout_timeout": stats.checkout_timeouts,
        }
        with self._stats_lock:
            events = [(kind, value - self._reported.get(kind, 0)) for kind, value in current.items()
                      if value > self._reported.get(kind, 0)]
            self._reported = current
        return events

    def _count_created(self) -> None:
        with self._stats_lock:
            self._total_created += 1

    def _require_open(self) -> _CountingThreadedPool:
        if self._pool is None:
            raise DatabaseConnectionError(
                f"The connection pool for {self.label} is not open (call open() first)."
            )
        return self._pool
