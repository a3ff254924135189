"""Destination tables against their source: row counts and contents (in key order, chunk by
chunk), and a backfill's rows."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from rosetta_dagster.core.health.outcome import CheckOutcome, KeyRange
from rosetta_dagster.core.pipeline_config import (
    PipelineDefinition,
    TableRef,
)
from rosetta_dagster.core.replication import (
    destination_connection,
    source_connection,
)
from rosetta_dagster.core.table_schema import (
    TableSchema,
    exact_select,
    replicated_rows,
)

# -- destination tables -------------------------------------------------------------------


_EVERY_ROW = sql.SQL("TRUE")


def _count(conn: psycopg2.extensions.connection, relation: sql.Composable,
           condition: sql.Composable = _EVERY_ROW) -> int:
    with conn.cursor() as cursor:
        cursor.execute(sql.SQL("SELECT count(*) FROM {} WHERE {}").format(relation, condition),
                       ())  # () : see replicated_rows
        return int(cursor.fetchone()[0])  # type: ignore[index]


def _counts_within_window(
    count_source: Callable[[], int], count_destination: Callable[[], int], window_s: float,
    sleep: Callable[[float], None],
) -> tuple[int, int]:
    """Both counts, re-taken each second until equal or ``window_s`` passed (rows in flight)."""
    deadline = time.monotonic() + window_s
    while True:
        source_rows, destination_rows = count_source(), count_destination()
        if source_rows == destination_rows or time.monotonic() >= deadline:
            return source_rows, destination_rows
        sleep(1.0)


def row_count_parity(
    source: psycopg2.extensions.connection,
    destination: psycopg2.extensions.connection,
    table: TableSchema,
    target: sql.Composable,
    window_s: float,
    sleep: Callable[[float], None] = time.sleep,
) -> CheckOutcome:
    """Counts equal, allowing rows in flight: re-counted each second for up to ``window_s``.
    The source's rows are those the table's row filter replicates; ``target``: the
    destination table."""
    source_rows, destination_rows = _counts_within_window(
        lambda: _count(source, table.source_sql, table.source_filter),
        lambda: _count(destination, target), window_s, sleep)
    difference = destination_rows - source_rows
    metadata: dict[str, float | int | str] = {
        "value": abs(difference), "threshold": 0, "source_rows": source_rows,
        "destination_rows": destination_rows, "difference": difference,
        "lag_window_seconds": window_s,
    }
    if difference == 0:
        return CheckOutcome("row_count_parity", True, "ERROR",
                            f"{source_rows} rows on both sides.", metadata)
    return CheckOutcome(
        "row_count_parity", False, "ERROR",
        f"Source has {source_rows} rows, destination {destination_rows} (difference {difference:+d}) "
        f"after waiting {window_s:g}s for rows in flight.", metadata,
    )


def _row_hashes(
    conn: psycopg2.extensions.connection,
    relation: sql.Composable,
    table: TableSchema,
    after: tuple[Any, ...] | None,
    through: tuple[Any, ...] | None,
    limit: int | None,
    condition: sql.Composable = _EVERY_ROW,
) -> list[tuple[tuple[Any, ...], str]]:
    """``(key, md5 of the row's text)`` in key order, for keys in (after, through], of the
    table's replicated columns."""
    keys = sql.SQL(", ").join(sql.Identifier(k) for k in table.primary_key)
    key_row = sql.SQL("ROW({})").format(keys)
    conditions: list[sql.Composable] = [condition]
    params: list[Any] = []
    if after is not None:
        conditions.append(sql.SQL("{} > ROW({})").format(
            key_row, sql.SQL(", ").join(sql.Placeholder() * len(after))))
        params.extend(after)
    if through is not None:
        conditions.append(sql.SQL("{} <= ROW({})").format(
            key_row, sql.SQL(", ").join(sql.Placeholder() * len(through))))
        params.extend(through)
    query = sql.SQL("SELECT {keys}, md5(ROW({columns})::text) FROM {table} {where} ORDER BY {keys}"
                    ).format(
        keys=keys,
        columns=sql.SQL(", ").join(exact_select(c) for c in table.columns),
        table=relation,
        where=sql.SQL("WHERE ") + sql.SQL(" AND ").join(conditions),
    )
    if limit is not None:
        query = query + sql.SQL(" LIMIT {}").format(sql.Literal(limit))
    width = len(table.primary_key)
    with conn.cursor() as cursor:
        cursor.execute(query, params)
        return [(tuple(row[:width]), row[width]) for row in cursor.fetchall()]


def _digest(rows: Sequence[tuple[tuple[Any, ...], str]]) -> str:
    return hashlib.md5("".join(h for _, h in rows).encode(), usedforsecurity=False).hexdigest()


def content_parity(
    source: psycopg2.extensions.connection,
    destination: psycopg2.extensions.connection,
    table: TableSchema,
    target: sql.Composable,
    chunk_rows: int,
    window_s: float,
    sleep: Callable[[float], None] = time.sleep,
    pipeline: str | None = None,
) -> CheckOutcome:
    """Ordered checksum over every column, chunk by chunk of primary keys on both sides.

    A differing chunk is re-read for up to ``window_s`` (changes in flight); if it still differs
    the first differing key range is reported, with its first differing keys and (given the
    ``pipeline``) the command that repairs it.
    """
    after: tuple[Any, ...] | None = None
    chunks = rows = 0
    while True:
        source_chunk = _row_hashes(source, table.source_sql, table, after, None, chunk_rows,
                                   table.source_filter)
        through = source_chunk[-1][0] if len(source_chunk) == chunk_rows else None
        deadline = time.monotonic() + window_s
        while True:
            destination_chunk = _row_hashes(destination, target, table, after, through, None)
            if _digest(source_chunk) == _digest(destination_chunk) or time.monotonic() >= deadline:
                break
            sleep(1.0)
            source_chunk = _row_hashes(source, table.source_sql, table, after, through, None,
                                       table.source_filter)
        if _digest(source_chunk) != _digest(destination_chunk):
            differing = _differences(source_chunk, destination_chunk)
            # The keys the chunk really holds on either side: both ends are real keys.
            keys = [key for key, _ in (*source_chunk, *destination_chunk)]
            low, high = min(keys), max(keys)
            repair = KeyRange(table.table, table.primary_key[0], _text(low[0]), _text(high[0]))
            metadata: dict[str, float | int | str] = {
                "value": 1, "threshold": 0, "chunks_compared": chunks, "rows_compared": rows,
                "first_differing_key": _fmt(differing[0]),
                "first_differing_keys": "; ".join(_fmt(k) for k in differing[:5]),
                "differing_rows_in_range": len(differing),
                "range_start": _fmt(low), "range_end": _fmt(high),
            }
            description = (f"Rows differ in key range [{_fmt(low)}, {_fmt(high)}]; first "
                           f"differing key {_fmt(differing[0])}.")
            if pipeline is not None:
                metadata["repair_command"] = repair.command(pipeline)
                description += f" Repair: {repair.command(pipeline)}"
            return CheckOutcome("content_parity", False, "ERROR", description, metadata,
                                differing=repair)
        chunks += 1
        rows += len(source_chunk)
        if through is None:
            return CheckOutcome("content_parity", True, "ERROR",
                                f"{rows} rows identical in {chunks} chunk(s).",
                                {"value": 0, "threshold": 0, "chunks_compared": chunks,
                                 "rows_compared": rows})
        after = through


def _differences(
    source: Sequence[tuple[tuple[Any, ...], str]], destination: Sequence[tuple[tuple[Any, ...], str]]
) -> list[tuple[Any, ...]]:
    """The keys whose rows differ (or exist on one side only), in key order."""
    source_map, destination_map = dict(source), dict(destination)
    return sorted(k for k in source_map.keys() | destination_map.keys()
                  if source_map.get(k) != destination_map.get(k))


def _text(value: Any) -> str:
    """A key value as PostgreSQL reads it back (for a command line)."""
    if isinstance(value, memoryview | bytes):
        return "\\x" + bytes(value).hex()
    return str(value)


def _fmt(key: tuple[Any, ...] | None) -> str:
    """A key for messages (one column: the value; several: a tuple)."""
    if key is None:
        return "none"
    return str(key[0]) if len(key) == 1 else "(" + ", ".join(str(part) for part in key) + ")"



def backfill_row_parity(
    pipeline: PipelineDefinition, table: TableRef, conditions_sql: sql.Composable,
    params: Sequence[Any], window_s: float, sleep: Callable[[float], None] = time.sleep,
) -> CheckOutcome:
    """After a backfill: every destination holds as many rows matching the job's filter as the
    source (re-counted for ``window_s`` while changes are in flight)."""
    def matching(conn: psycopg2.extensions.connection, relation: TableRef,
                 replicated: sql.Composable = _EVERY_ROW) -> int:
        with conn.cursor() as cursor:
            cursor.execute(sql.SQL("SELECT count(*) FROM {} WHERE {} AND {}").format(
                sql.Identifier(relation.schema, relation.name), replicated, conditions_sql),
                list(params))
            return int(cursor.fetchone()[0])  # type: ignore[index]

    replicated = replicated_rows(pipeline.options(table).where)
    with source_connection(pipeline) as source:
        for destination in pipeline.destinations:
            written = pipeline.target(table, destination)
            with destination_connection(pipeline, destination) as target:
                expected, copied = _counts_within_window(
                    lambda: matching(source, table, replicated),
                    lambda: matching(target, written),  # noqa: B023 - used at once
                    window_s, sleep)
            metadata: dict[str, float | int | str] = {
                "value": abs(expected - copied), "threshold": 0, "source_rows": expected,
                "destination_rows": copied}
            if expected != copied:
                return CheckOutcome("row_count", False, "ERROR",
                                    f"Destination {destination.name} has {copied} rows matching "
                                    f"the job's filter, the source {expected}.", metadata)
    return CheckOutcome("row_count", True, "ERROR",
                        f"{expected} rows matching the job's filter on both sides.", metadata)
