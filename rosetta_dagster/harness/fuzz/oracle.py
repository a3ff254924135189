"""The oracle: the source itself, compared row by row as text under the pinned settings.

A table's expected rows are the source rows its row filter replicates, with the columns the
pipeline carries (its options leave some out), each as PostgreSQL's exact text (``xml`` through
its cast). A destination, or the native replica, matches when it holds exactly those rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from rosetta_dagster.core.dsn import pinned_options

Row = tuple[str | None, ...]


@dataclass(frozen=True)
class TableView:
    """Which rows and columns of a source table a destination must hold."""

    schema: str
    name: str
    key: tuple[str, ...]
    excluded: tuple[str, ...] = ()
    replicated: str = "TRUE"


def _columns(cursor: psycopg2.extensions.cursor, schema: str, name: str) -> list[tuple[str, str]]:
    cursor.execute("SELECT a.attname, format_type(a.atttypid, NULL) FROM pg_attribute a "
                   "WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped "
                   "ORDER BY a.attnum", (sql.Identifier(schema, name).as_string(cursor),))
    return [(str(n), str(t)) for n, t in cursor.fetchall()]


def connect(url: str) -> psycopg2.extensions.connection:
    """A connection for comparisons: pinned settings, and never waiting on a lock an open
    transaction of the workload holds, nor on a server that is down."""
    conn = psycopg2.connect(url, options=pinned_options("-c lock_timeout=2000"), connect_timeout=5)
    conn.autocommit = True
    return conn


def rows(conn: psycopg2.extensions.connection, schema: str, name: str, key: Sequence[str],
         columns: Sequence[str], condition: str = "TRUE") -> dict[Row, Row] | None:
    """``key text -> column texts`` of a table (None: the table does not exist)."""
    with conn.cursor() as cursor:
        present = dict(_columns(cursor, schema, name))
        if not present:
            return None
        selected = [sql.SQL("{}::text").format(sql.Identifier(c)) if c in present
                    else sql.SQL("'<column missing>'") for c in columns]
        values = sql.SQL(", ").join(selected)
        keys: sql.Composable = sql.SQL(", ").join(
            sql.SQL("{}::text").format(sql.Identifier(k)) for k in key)
        if not key:  # a multiset: each row by its text and which of its equal copies it is
            keys = sql.SQL("ROW({0})::text, (row_number() OVER (PARTITION BY {0}))::text").format(
                values)
        cursor.execute(sql.SQL("SELECT {keys}, {values} FROM {table} WHERE {condition}").format(
            keys=keys, values=values, table=sql.Identifier(schema, name),
            condition=sql.SQL(condition)))
        width = len(key) or 2
        return {tuple(row[:width]): tuple(row[width:]) for row in cursor.fetchall()}


def expected_columns(conn: psycopg2.extensions.connection, view: TableView) -> list[str]:
    with conn.cursor() as cursor:
        return [c for c, _ in _columns(cursor, view.schema, view.name) if c not in view.excluded]


def differences(expected: dict[Row, Row] | None, actual: dict[Row, Row] | None,
                columns: Sequence[str], limit: int = 8) -> list[str]:
    """Readable lines for rows that differ (first ``limit``)."""
    if expected is None:
        return ["the source table is gone"]
    if actual is None:
        return ["the table does not exist"]
    lines = []
    for key in sorted(expected.keys() | actual.keys(), key=lambda k: tuple(map(str, k))):
        want, got = expected.get(key), actual.get(key)
        if want == got:
            continue
        if want is None:
            lines.append(f"key {key}: not in the source, but present: {_short(got)}")
        elif got is None:
            lines.append(f"key {key}: missing")
        else:
            changed = [f"{c}: {_short(w)} != {_short(g)}" for c, w, g in zip(
                columns, want, got, strict=True) if w != g]
            lines.append(f"key {key}: " + "; ".join(changed))
        if len(lines) >= limit:
            lines.append("...")
            break
    return lines


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:60] + f"...({len(text)} chars)"
