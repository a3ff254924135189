"""Destination tables against their source: row counts and contents (in key order, chunk by
chunk), and a backfill's rows."""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from psycopg2 import sql

from rosetta_dagster.core.destination import NotComparable, TableReader, destination_kind
from rosetta_dagster.core.destination.postgres.reader import PostgresTableReader
from rosetta_dagster.core.health.outcome import CheckOutcome, KeyRange
from rosetta_dagster.core.pipeline_config import (
    PipelineDefinition,
    TableRef,
)
from rosetta_dagster.core.replication import (
    source_connection,
)
from rosetta_dagster.core.table_schema import (
    RowIdentity,
    TableSchema,
    replicated_rows,
)

# -- destination tables -------------------------------------------------------------------


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
    source: TableReader,
    destination: TableReader,
    table: TableSchema,
    target: sql.Composable,
    window_s: float,
    sleep: Callable[[float], None] = time.sleep,
) -> CheckOutcome:
    """Counts equal, allowing rows in flight: re-counted each second for up to ``window_s``.
    The source's rows are those the table's row filter replicates; ``target``: the
    destination table."""
    if table.identity is RowIdentity.INSERTS_ONLY:
        return _not_compared("row_count_parity", table)
    source_rows, destination_rows = _counts_within_window(
        lambda: source.count(table.source_sql, table.source_filter),
        lambda: destination.count(target), window_s, sleep)
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


def _not_compared(name: str, table: TableSchema) -> CheckOutcome:
    """A table that replicates its inserts only keeps the rows the source updates or deletes:
    no equality to check (said, not faked)."""
    return CheckOutcome(name, True, "ERROR", (
        f"Not compared: {table.table.qualified} replicates its inserts only (replicate: "
        "inserts_only), so the destination keeps rows the source has updated or deleted since."),
        {"value": 0, "threshold": 0, "compared": 0})


def _digest(rows: Sequence[tuple[tuple[Any, ...], str]]) -> str:
    return hashlib.md5("".join(h for _, h in rows).encode(), usedforsecurity=False).hexdigest()


def content_parity(
    source: TableReader,
    destination: TableReader,
    table: TableSchema,
    target: sql.Composable,
    chunk_rows: int,
    window_s: float,
    sleep: Callable[[float], None] = time.sleep,
    pipeline: str | None = None,
) -> CheckOutcome:
    """Ordered checksum over every column, chunk by chunk of keys on both sides (a table
    without a key: of row checksums, so equal multisets of rows compare equal).

    A differing chunk is re-read for up to ``window_s`` (changes in flight); if it still differs
    the first differing key range is reported, with its first differing keys and (given the
    ``pipeline``) the command that repairs it.
    """
    if table.identity is RowIdentity.INSERTS_ONLY:
        return _not_compared("content_parity", table)
    try:
        return _content_parity(source, destination, table, target, chunk_rows, window_s, sleep,
                               pipeline)
    except NotComparable as exc:
        return CheckOutcome("content_parity", False, "ERROR", str(exc),
                            {"value": 1, "threshold": 0, "compared": 0})


def _content_parity(
    source: TableReader, destination: TableReader, table: TableSchema, target: sql.Composable,
    chunk_rows: int, window_s: float, sleep: Callable[[float], None], pipeline: str | None,
) -> CheckOutcome:
    after: tuple[Any, ...] | None = None
    chunks = rows = 0
    while True:
        source_chunk = source.row_hashes(table.source_sql, table, after, None, chunk_rows,
                                         table.source_filter)
        through = source_chunk[-1][0] if len(source_chunk) >= chunk_rows else None
        deadline = time.monotonic() + window_s
        while True:
            destination_chunk = destination.row_hashes(target, table, after, through, None)
            if _digest(source_chunk) == _digest(destination_chunk) or time.monotonic() >= deadline:
                break
            sleep(1.0)
            source_chunk = source.row_hashes(table.source_sql, table, after, through, None,
                                             table.source_filter)
        if _digest(source_chunk) != _digest(destination_chunk) and table.keyless:
            return _multiset_difference(table, source_chunk, destination_chunk, chunks, rows,
                                        pipeline)
        if _digest(source_chunk) != _digest(destination_chunk):
            differing = _differences(source_chunk, destination_chunk)
            # The keys the chunk really holds on either side: both ends are real keys.
            keys = [key for key, _ in (*source_chunk, *destination_chunk)]
            low, high = min(keys), max(keys)
            repair = KeyRange(table.table, table.key_columns[0], _text(low[0]), _text(high[0]))
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


def _multiset_difference(
    table: TableSchema, source: Sequence[tuple[tuple[Any, ...], str]],
    destination: Sequence[tuple[tuple[Any, ...], str]], chunks: int, rows: int,
    pipeline: str | None,
) -> CheckOutcome:
    """A table without a key differs: rows (counted with their duplicates) that one side has
    more often than the other; the repair re-copies the whole table."""
    source_counts = Counter(h for _, h in source)
    destination_counts = Counter(h for _, h in destination)
    missing = sum((source_counts - destination_counts).values())
    extra = sum((destination_counts - source_counts).values())
    repair = KeyRange(table.table, None, "", "")
    metadata: dict[str, float | int | str] = {
        "value": 1, "threshold": 0, "chunks_compared": chunks, "rows_compared": rows,
        "rows_missing": missing, "rows_extra": extra}
    description = (f"Rows differ (a table without a key, compared as a multiset): "
                   f"{missing} source row(s) missing and {extra} extra row(s) at the destination "
                   f"in the first differing chunk of {max(len(source), len(destination))} rows.")
    if pipeline is not None:
        metadata["repair_command"] = repair.command(pipeline)
        description += f" Repair: {repair.command(pipeline)}"
    return CheckOutcome("content_parity", False, "ERROR", description, metadata, differing=repair)


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
    replicated = replicated_rows(pipeline.options(table).where)
    matching = sql.SQL("{} AND {}").format(replicated, conditions_sql)
    source_table = sql.Identifier(table.schema, table.name)
    with source_connection(pipeline) as conn:
        source = PostgresTableReader(conn)
        for destination in pipeline.destinations:
            written = pipeline.target(table, destination)
            written_sql = sql.Identifier(written.schema, written.name)
            with destination_kind(destination).open_reader(pipeline, destination) as target:
                expected, copied = _counts_within_window(
                    lambda: source.count(source_table, matching, params),
                    lambda: target.count(written_sql, conditions_sql, params),  # noqa: B023
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
