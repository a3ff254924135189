"""A change a PostgreSQL destination refuses, in one sentence: the source table, the row's key
and the column, never the staging table (see ``errors`` for what is done about it)."""

from __future__ import annotations

import psycopg2
import psycopg2.extensions

from rosetta_dagster.core.destination.errors import COPY_CONTEXT, ApplyError
from rosetta_dagster.core.destination.postgres.plan import TablePlan
from rosetta_dagster.core.events import ChangeEvent


def keyed_failure(cursor: psycopg2.extensions.cursor, exc: psycopg2.Error, plan: TablePlan,
                  events: list[ChangeEvent], destination: str) -> ApplyError:
    """One sentence naming the source table, the row's key and the column (never the
    staging table): from the failing COPY line, or by merging the staged rows one by one
    until one fails the same way."""
    diag = exc.diag
    culprit: ChangeEvent | None = None
    copy_line = COPY_CONTEXT.search(diag.context or "")
    if copy_line:
        culprit = events[int(copy_line.group(1)) - 1]
    else:
        cursor.execute("ROLLBACK TO SAVEPOINT _rosetta_merge")
        converters = plan.converter_of
        for event in events:
            key = [converters[k](event.row[k]) for k in plan.schema.key_columns]
            try:
                cursor.execute("SAVEPOINT _rosetta_row")
                cursor.execute(plan.statements.merge_one, key)
            except psycopg2.Error:
                culprit = event
                break
            cursor.execute("RELEASE SAVEPOINT _rosetta_row")
    where = f"Destination {destination}: a change of {plan.schema.table.qualified}"
    if culprit is not None:
        key_text = ", ".join(f"{k}={culprit.row.get(k)}" for k in plan.schema.key_columns)
        where += f" with key ({key_text})"
    column = (copy_line.group(2) if copy_line else None) or diag.column_name
    detail = f" ({diag.message_detail})" if diag.message_detail and not copy_line else ""
    reason = f"{diag.message_primary or str(exc).strip()}{detail}"
    return ApplyError(f"{where} could not be applied" + (f" at column {column}" if column else "")
                      + f": {reason}.", sqlstate=exc.pgcode, column=column, reason=reason)


def keyless_failure(exc: psycopg2.Error, plan: TablePlan, destination: str) -> ApplyError:
    """One sentence naming the source table and the column (never the staging table)."""
    diag = exc.diag
    copy_line = COPY_CONTEXT.search(diag.context or "")
    column = (copy_line.group(2) if copy_line else None) or diag.column_name
    reason = diag.message_primary or str(exc).strip()
    return ApplyError(
        f"Destination {destination}: a change of {plan.schema.table.qualified} could not be "
        "applied" + (f" at column {column}" if column else "") + f": {reason}.",
        sqlstate=exc.pgcode, column=column, reason=reason)
