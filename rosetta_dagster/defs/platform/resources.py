"""Dagster resource wrapping the resilient connection pool to the config store."""

import atexit
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg2.extensions
from dagster import ConfigurableResource, InitResourceContext
from pydantic import Field, PrivateAttr

from rosetta_dagster.core.config_store import ConfigStore
from rosetta_dagster.core.errors import RosettaError
from rosetta_dagster.core.pool import PoolSettings, PoolStats, ResilientConnectionPool
from rosetta_dagster.core.replication import application_name

# One pool per process and database: the code server evaluates every sensor tick and the
# health-check schedule in one long-lived process, and each tick would otherwise open (and log)
# a pool of its own. Keyed by pid too: a forked child must not share its parent's sockets.
_POOLS: dict[tuple[int, str, PoolSettings], ResilientConnectionPool] = {}
_POOLS_LOCK = threading.Lock()


def process_pool(database_url: str, settings: PoolSettings, *, migrate: bool
                 ) -> ResilientConnectionPool:
    """This process's pool to ``database_url``: opened (with the checklist's retries, and the
    pending migrations applied) by the first user, reused by every later one."""
    key = (os.getpid(), database_url, settings)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            pool = ResilientConnectionPool(database_url, settings, label="config_db",
                                           setting="CONFIG_DATABASE_URL").open()
            if migrate:
                ConfigStore(pool).upgrade()
            _POOLS[key] = pool
            atexit.register(pool.close)
        return pool


class ConfigStoreResource(ConfigurableResource):
    """The config store (``config_db``) behind a :class:`ResilientConnectionPool`.

    The process's pool is opened when a run step or sensor tick first uses the resource (with
    the checklist's retry/backoff, pending migrations applied) and reused by every later step
    and tick of the same process (see :func:`process_pool`).
    """

    database_url: str = Field(description="PostgreSQL URL of config_db (CONFIG_DATABASE_URL).")
    max_conn: int | None = Field(
        default=None, description="Pool size; defaults to PIPELINE_POOL_MAX_CONN, else 10."
    )
    statement_timeout_ms: int = Field(default=30_000)
    checkout_timeout_s: float = Field(default=30.0)
    init_attempts: int = Field(default=5)
    apply_migrations: bool = Field(default=True)

    _pool: ResilientConnectionPool | None = PrivateAttr(default=None)

    def pool_settings(self, owner: str = "") -> PoolSettings:
        overrides: dict[str, object] = {
            "application_name": application_name(owner) if owner else "rosetta",
            "statement_timeout_ms": self.statement_timeout_ms,
            "checkout_timeout_s": self.checkout_timeout_s,
            "init_attempts": self.init_attempts,
        }
        if self.max_conn is not None:
            overrides["max_conn"] = self.max_conn
        return PoolSettings.from_env(**overrides)

    def setup_for_execution(self, context: InitResourceContext) -> None:
        run = context.run
        # A run's pool is named after its job (stream_<pipeline>, a backfill, ...); everything
        # else that opens this resource is a sensor or schedule tick of the daemon.
        owner = run.job_name if run is not None else "daemon"
        self._pool = process_pool(self.database_url, self.pool_settings(owner),
                                  migrate=self.apply_migrations)

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        if self._pool is not None:
            try:  # health events (retries, dead connections) for the pool checks
                ConfigStore(self._pool).flush_pool_events()
            except RosettaError as exc:
                context.log.warning("Could not record pool health events: %s", exc)  # type: ignore[union-attr]
            self._pool = None  # the pool stays open for the process's next user

    @property
    def pool(self) -> ResilientConnectionPool:
        if self._pool is None:
            raise RuntimeError("ConfigStoreResource is used outside of a Dagster execution.")
        return self._pool

    @property
    def store(self) -> ConfigStore:
        return ConfigStore(self.pool)

    @contextmanager
    def connection(self) -> Iterator[psycopg2.extensions.connection]:
        with self.pool.connection() as conn:
            yield conn

    def stats(self) -> PoolStats:
        return self.pool.stats()
