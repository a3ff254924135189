"""Re-snapshot reconciliation at a PostgreSQL destination: while a re-snapshot writes its
rows, their keys are recorded per table; afterwards every row whose key was not recorded
(deleted on the source while nothing streamed) is removed. Tables without a key are re-copied
whole instead and take no part."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from rosetta_dagster.core.destination.postgres.ddl import table_exists
from rosetta_dagster.core.destination.postgres.plan import TablePlan
from rosetta_dagster.core.pipeline_config import TableRef
from rosetta_dagster.core.pool import ResilientConnectionPool

logger = logging.getLogger("rosetta.apply")


def begin_resync(pool: ResilientConnectionPool, plans: Sequence[TablePlan]) -> None:
    """Empty key tables for every table with a key."""
    with pool.connection() as conn, conn.cursor() as cursor:
        for plan in plans:
            cursor.execute(plan.resync.create_keys)
            cursor.execute(plan.resync.truncate_keys)


def resync_pending(pool: ResilientConnectionPool, plans: Sequence[TablePlan]) -> bool:
    """True when a re-snapshot began but its reconciliation has not run (e.g. a crash)."""
    with pool.connection() as conn, conn.cursor() as cursor:
        return any(table_exists(cursor, plan.resync.keys_table) for plan in plans)


def finish_resync(pool: ResilientConnectionPool, plans: Sequence[TablePlan],
                  destination: str) -> dict[TableRef, int]:
    """Delete the rows whose key was not recorded and drop the key tables, in one
    transaction; the rows removed per table."""
    removed: dict[TableRef, int] = {}
    with pool.connection() as conn, conn.cursor() as cursor:
        for plan in plans:
            cursor.execute(plan.resync.create_keys)  # a table added meanwhile has none yet
            cursor.execute(plan.resync.delete_unrecorded)
            removed[plan.schema.table] = cursor.rowcount
            cursor.execute(plan.resync.drop_keys)
    for table, count in removed.items():
        if count:
            logger.info("Destination %s: removed %d row(s) of %s that no longer exist in the "
                        "source", destination, count, table.qualified)
    return removed
