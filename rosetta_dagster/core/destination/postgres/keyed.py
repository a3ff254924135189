"""Applying a batch of a table with a key: its net change per key (``net_changes``),
set-wise. New rows carrying every value are COPYed straight into the table; anything else
is staged and merged by one statement (statements in ``statements.batch_statements``)."""

from __future__ import annotations

import io
from collections.abc import Callable

import psycopg2
import psycopg2.extensions

from rosetta_dagster.core.destination.errors import classify
from rosetta_dagster.core.destination.net_changes import NetChanges
from rosetta_dagster.core.destination.postgres.apply_errors import keyed_failure
from rosetta_dagster.core.destination.postgres.left_out import resolve_left_out
from rosetta_dagster.core.destination.postgres.plan import TablePlan, copy_lines
from rosetta_dagster.core.source_rows import SourceRows
from rosetta_dagster.core.values import ValueCodec


def apply_keyed(cursor: psycopg2.extensions.cursor, plan: TablePlan, changes: NetChanges,
                values: ValueCodec, source_rows: SourceRows | None, destination: str, *,
                record_keys: bool, small: Callable[[int], bool]) -> tuple[int, int]:
    """Apply ``changes`` in the open transaction; returns the rows written and the unchanged
    TOAST values kept. ``record_keys``: a re-snapshot's batch (its keys are recorded).
    ``small(rows)``: clear the stage with DELETE (no new relation file) rather than TRUNCATE."""
    events = list(changes.changes.values())
    statements = plan.statements
    # Only new rows carrying every value (the common case of an insert-heavy stream): COPY
    # them straight into the table; a key already there, or any refusal, falls back to
    # staging + MERGE, which upserts (or reports) exactly as before.
    if not record_keys and all(e.op == "c" for e in events):
        direct, rows, _, left_out = copy_lines(plan, events, values, staged=False)
        # (an insert that leaves values out: Debezium's half of a key update whose other
        # half came in the batch before)
        if not left_out and _copy_direct(cursor, plan, direct):
            return rows, 0
    buffer, rows, unchanged_toast, left_out = copy_lines(
        plan, events, values, origins=changes.origins, staged=True)
    cursor.execute(statements.create_stage)
    try:
        cursor.copy_expert(statements.copy_stage, buffer)
        if left_out:
            resolve_left_out(cursor, plan, source_rows, destination, moved=any(
                o.moved_from is not None for o in changes.origins.values()))
        cursor.execute("SAVEPOINT _rosetta_merge")
        cursor.execute(statements.merge)
    except psycopg2.Error as exc:
        if classify(exc) != "data":
            raise
        raise keyed_failure(cursor, exc, plan, events, destination) from None
    if record_keys:
        cursor.execute(plan.resync.create_keys)  # a table added during the snapshot
        cursor.execute(plan.resync.record_keys)
    cursor.execute(statements.clear_stage if small(rows) else statements.truncate_stage)
    return rows, unchanged_toast


def _copy_direct(cursor: psycopg2.extensions.cursor, plan: TablePlan, rows: io.StringIO) -> bool:
    """COPY new rows into the table itself; False (nothing written) when it refuses."""
    rows.seek(0)
    cursor.execute("SAVEPOINT _rosetta_direct")
    try:
        cursor.copy_expert(plan.statements.copy_direct, rows)
    except psycopg2.Error as exc:
        if classify(exc) == "transient":
            raise
        cursor.execute("ROLLBACK TO SAVEPOINT _rosetta_direct")
        return False
    cursor.execute("RELEASE SAVEPOINT _rosetta_direct")
    return True
