"""Applying a batch of a table without a key: its net count per row (``keyless_changes``),
set-wise. A batch that only adds rows is COPYed straight into the table; otherwise the
distinct rows are staged with their counts, one statement removes that many equal rows per
row removed and one adds the copies (statements in ``statements.keyless_statements``)."""

from __future__ import annotations

import logging

import psycopg2
import psycopg2.extensions

from rosetta_dagster.core.destination.errors import classify
from rosetta_dagster.core.destination.keyless_changes import KeylessChanges
from rosetta_dagster.core.destination.postgres.apply_errors import keyless_failure
from rosetta_dagster.core.destination.postgres.plan import TablePlan, keyless_lines

logger = logging.getLogger("rosetta.apply")


def apply_keyless(cursor: psycopg2.extensions.cursor, plan: TablePlan, changes: KeylessChanges,
                  destination: str, *, small: bool) -> int:
    """Apply ``changes`` in the open transaction; returns the rows removed and added.
    ``small``: clear the stage with DELETE (no new relation file) rather than TRUNCATE."""
    statements = plan.keyless
    assert statements is not None
    counts = changes.counts
    try:
        if not changes.removes_rows:
            cursor.copy_expert(statements.copy_direct, keyless_lines(counts, staged=False))
            return sum(counts.values())
        cursor.execute(statements.create_stage)
        cursor.copy_expert(statements.copy_stage, keyless_lines(counts, staged=True))
        cursor.execute(statements.analyze_stage)
        cursor.execute(statements.delete)
        removed = cursor.rowcount
        cursor.execute(statements.insert)
        added = cursor.rowcount
    except psycopg2.Error as exc:
        if classify(exc) != "data":
            raise
        raise keyless_failure(exc, plan, destination) from None
    cursor.execute(statements.clear_stage if small else statements.truncate_stage)
    wanted = -sum(count for count in counts.values() if count < 0)
    if removed < wanted:
        # As PostgreSQL's own subscriber: the row to update or delete is not there (the
        # destination was changed behind the stream); the parity check tells.
        logger.warning("Destination %s: %d row(s) of %s that changes updated or deleted were "
                       "not found; the other changes were applied", destination,
                       wanted - removed, plan.schema.table.qualified)
    return removed + added
