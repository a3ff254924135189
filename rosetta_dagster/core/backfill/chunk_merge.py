"""Backfill, part 3 of the protocol: at a chunk's high watermark, one destination's rows in the
chunk's key range are made equal to the staged chunk, except the keys the stream changed inside
the window (see the package's docstring for the whole). The statements come from
``apply.statements.chunk_merge_statements``; this module executes them."""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg2.extensions
from psycopg2 import sql

from rosetta_dagster.core.apply.applier import PostgresApplier, TablePlan
from rosetta_dagster.core.apply.statements import chunk_merge_statements
from rosetta_dagster.core.apply.values import COPY_NULL, copy_field
from rosetta_dagster.core.backfill.staging import chunk_table, marks_table
from rosetta_dagster.core.pipeline_config import TableRef

logger = logging.getLogger("rosetta.apply")

KeyBounds = tuple[Sequence[str | None] | None, Sequence[str | None] | None]


@dataclass
class ChunkCounts:
    """What applying one backfill chunk changed on one destination."""

    inserted: int = 0
    updated: int = 0
    deleted: int = 0

    def __iadd__(self, other: ChunkCounts) -> ChunkCounts:
        self.inserted += other.inserted
        self.updated += other.updated
        self.deleted += other.deleted
        return self


def apply_chunk(
    applier: PostgresApplier,
    table: TableRef,
    job_id: int,
    chunk: int,
    *,
    excluded: set[tuple[Any, ...]],
    skip_all: bool = False,
    bounds: KeyBounds | None = None,
    row_filter: tuple[sql.Composable, list[Any]] = (sql.SQL("TRUE"), []),
) -> ChunkCounts | None:
    """Make the destination's rows in the chunk's key range equal the staged chunk.

    Staged rows that differ are written (identical ones are left alone), and destination rows
    inside ``bounds`` (``after < key <= through``; None = open) that match ``row_filter`` but
    are not in the chunk are deleted. Keys in ``excluded`` (changed by the stream inside the
    chunk's window) are not touched: their streamed state is newer. ``bounds`` None (unknown)
    deletes nothing; ``skip_all`` (the table was truncated inside the window) writes nothing.
    One transaction, which also consumes the chunk's staged mark and drops its table, so a
    replayed high watermark changes nothing. None: the chunk is not staged (already applied,
    or lost with the unlogged staging in a server crash).
    """
    plan = applier.plan(table)
    stage = sql.Identifier(applier.target_schema, chunk_table(job_id, chunk))
    marks = sql.Identifier(applier.target_schema, marks_table(job_id))
    counts = ChunkCounts()
    with applier.pool.connection() as conn, conn.cursor() as cursor:
        cursor.execute("SELECT to_regclass(%s), to_regclass(%s)",
                       (marks.as_string(conn), stage.as_string(conn)))
        if None in cursor.fetchone():  # type: ignore[operator]
            return None  # applied already (a replayed watermark), or the job ended
        cursor.execute(sql.SQL("DELETE FROM {} WHERE chunk = %s").format(marks), (chunk,))
        if cursor.rowcount == 0:
            return None
        if not skip_all:
            counts = _merge(cursor, applier.target_schema, plan, stage, excluded, bounds,
                            row_filter)
        cursor.execute(sql.SQL("DROP TABLE {}").format(stage))
    logger.info("Destination %s: backfill chunk %d of %s applied (%d inserted, %d updated, "
                "%d deleted, %d keys left to the stream%s)", applier.name, chunk,
                table.qualified, counts.inserted, counts.updated, counts.deleted,
                len(excluded), ", table truncated meanwhile" if skip_all else "")
    return counts


def _merge(cursor: psycopg2.extensions.cursor, target_schema: str, plan: TablePlan,
           stage: sql.Identifier, excluded: set[tuple[Any, ...]], bounds: KeyBounds | None,
           row_filter: tuple[sql.Composable, list[Any]]) -> ChunkCounts:
    excluded_table = sql.Identifier(f"_rosetta_excluded_{plan.stage_name}")
    statements = chunk_merge_statements(
        plan.schema, plan.target, target_schema, stage, excluded_table, bounds=bounds,
        row_filter=row_filter, any_excluded=bool(excluded))
    cursor.execute(statements.create_excluded)  # a temporary table, emptied at commit
    if excluded:
        _copy_keys(cursor, plan, statements.copy_excluded, excluded)
    counts = ChunkCounts()
    ranged = statements.range_params
    # A key range the destination has no rows in (the usual case when re-syncing what was
    # lost): nothing to delete or compare, the chunk is inserted as it is.
    occupied = True
    if bounds is not None:
        cursor.execute(statements.occupied, ranged)
        occupied = bool(cursor.fetchone()[0])  # type: ignore[index]
        if occupied:
            cursor.execute(statements.delete, [*ranged, *statements.filter_params])
            counts.deleted = cursor.rowcount
    if not occupied:
        cursor.execute(statements.insert_into_empty)
        counts.inserted = cursor.rowcount
        return counts
    if statements.update is not None:
        cursor.execute(statements.update, ranged)
        counts.updated = cursor.rowcount
    cursor.execute(statements.insert, ranged)
    counts.inserted = cursor.rowcount
    return counts


def _copy_keys(cursor: psycopg2.extensions.cursor, plan: TablePlan, copy: sql.Composed,
               keys: set[tuple[Any, ...]]) -> None:
    buffer = io.StringIO()
    key_columns = plan.schema.primary_key
    for key in keys:
        buffer.write("\t".join(
            COPY_NULL if value is None else copy_field(plan.converter_of[name](value))
            for name, value in zip(key_columns, key, strict=True)) + "\n")
    buffer.seek(0)
    cursor.copy_expert(copy, buffer)
