"""Values a change left out (unchanged TOAST) that the destination row at its key does not hold:
taken from the row at a moved row's old key, else read back from the source."""

from __future__ import annotations

import logging

import psycopg2.extensions

from rosetta_dagster.core.destination.postgres.plan import TablePlan
from rosetta_dagster.core.destination.postgres.statements import delete_staged, fill_left_out
from rosetta_dagster.core.errors import RosettaError
from rosetta_dagster.core.source_rows import SourceRows

logger = logging.getLogger("rosetta.apply")


def resolve_left_out(cursor: psycopg2.extensions.cursor, plan: TablePlan,
                     source_rows: SourceRows | None, destination: str, *, moved: bool) -> None:
    """Give staged rows the values their changes left out where the destination row at
    their own key does not hold them: from the row at a moved row's old key, else read
    back from the source (a row gone from the source since is deleted: its own delete
    follows)."""
    statements = plan.statements
    if moved:
        cursor.execute(statements.resolve_from_old_key)
    cursor.execute(statements.unresolved_rows)
    unresolved = cursor.fetchall()
    if not unresolved:
        return
    keys = len(plan.schema.key_columns)
    wanted: dict[tuple[str, ...], list[tuple[str | None, ...]]] = {}
    for row in unresolved:
        columns = tuple(c for c in row[keys] if c in plan.converter_of)
        wanted.setdefault(columns, []).append(tuple(row[:keys]))
    if source_rows is None:
        raise RosettaError(f"Destination {destination}: {len(unresolved)} change(s) of "
                           f"{plan.schema.table.qualified} left values out that no row holds, "
                           "and this applier cannot read the source.")
    gone = delete_staged(plan.schema, plan.stage_name)
    for columns, key_texts in wanted.items():
        found = source_rows.read(plan.schema, columns, key_texts)
        fill = fill_left_out(plan.schema, plan.stage_name, columns)
        for key in key_texts:
            values = found.get(key)
            if values is None:  # gone from the source since: its delete follows
                cursor.execute(gone, key)
            else:
                cursor.execute(fill, [*values, *key])
    logger.info("Destination %s: %d change(s) of %s had values left out that no destination "
                "row held; read them back from the source", destination, len(unresolved),
                plan.schema.table.qualified)
