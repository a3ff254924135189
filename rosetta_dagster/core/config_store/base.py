"""What every area of the config store shares: one pool, one query helper, the schema."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psycopg2.extras import RealDictCursor

from rosetta_dagster.core.config_store.migrations import (
    Migration,
    apply_migrations,
    current_version,
)
from rosetta_dagster.core.pool import ResilientConnectionPool


class StoreBase:
    """One pooled connection per method call; every area of the store derives from this."""

    def __init__(self, pool: ResilientConnectionPool) -> None:
        self.pool = pool


    def _query(self, query: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self.pool.connection() as conn, conn.cursor(cursor_factory=RealDictCursor) as cur:
            cur.execute(query, params)
            return [dict(row) for row in cur.fetchall()] if cur.description else []

    # -- schema ----------------------------------------------------------------------------

    def upgrade(self) -> list[Migration]:
        with self.pool.connection() as conn:
            return apply_migrations(conn)

    def schema_version(self) -> int:
        with self.pool.connection() as conn:
            return current_version(conn)
