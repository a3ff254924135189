"""Backfill filters: shapes refused with the condition named, compiled SQL run on real rows,
and hostile names and values kept as identifiers and parameters."""

from __future__ import annotations

import psycopg2
import pytest
from psycopg2 import sql

from rosetta_dagster.core.filters import FilterError, compile_filter, parse_filter

COLUMNS = ("id", "status", "note", "amount")


@pytest.fixture
def conn(database_url: str) -> psycopg2.extensions.connection:
    connection = psycopg2.connect(database_url)
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE items (id int PRIMARY KEY, status text, note text, "
                       "amount numeric(10,2))")
        cursor.execute("INSERT INTO items SELECT g, CASE WHEN g % 2 = 0 THEN 'a' ELSE 'b' END, "
                       "CASE WHEN g % 5 = 0 THEN NULL ELSE 'n' || g END, g * 1.5 "
                       "FROM generate_series(1, 100) g")
    return connection


def _ids(conn: psycopg2.extensions.connection, raw: list[dict[str, object]]) -> list[int]:
    where, params = compile_filter(parse_filter(raw), COLUMNS, "public.items")
    with conn.cursor() as cursor:
        cursor.execute(sql.SQL("SELECT id FROM items WHERE {} ORDER BY id").format(where), params)
        return [row[0] for row in cursor.fetchall()]


def test_every_operator_selects_the_expected_rows(conn: psycopg2.extensions.connection) -> None:
    assert len(_ids(conn, [])) == 100
    assert _ids(conn, [{"column": "id", "operator": "between", "value": [3, 5]}]) == [3, 4, 5]
    assert _ids(conn, [{"column": "id", "operator": "in", "value": ["7", 9]}]) == [7, 9]
    assert _ids(conn, [{"column": "id", "operator": "<", "value": 3}]) == [1, 2]
    assert _ids(conn, [{"column": "id", "operator": ">=", "value": 99}]) == [99, 100]
    assert _ids(conn, [{"column": "id", "operator": "<=", "value": 1},
                       {"column": "id", "operator": "!=", "value": 0}]) == [1]
    assert _ids(conn, [{"column": "id", "operator": ">", "value": 97},
                       {"column": "status", "operator": "=", "value": "a"}]) == [98, 100]
    assert _ids(conn, [{"column": "note", "operator": "is null"},
                       {"column": "id", "operator": "<", "value": 20}]) == [5, 10, 15]
    assert len(_ids(conn, [{"column": "note", "operator": "IS NOT NULL"}])) == 80
    assert _ids(conn, [{"column": "note", "operator": "like", "value": "n9%"}]) == [9, 91, 92, 93,
                                                                                  94, 96, 97, 98, 99]
    assert _ids(conn, [{"column": "amount", "operator": ">", "value": "148.5"}]) == [100]


def test_hostile_values_are_plain_parameters(conn: psycopg2.extensions.connection) -> None:
    hostile = "'; DROP TABLE items; --"
    assert _ids(conn, [{"column": "note", "operator": "=", "value": hostile}]) == []
    assert _ids(conn, [{"column": "note", "operator": "in", "value": [hostile, "n1"]}]) == [1]
    with conn.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM items")
        assert cursor.fetchone() == (100,)


@pytest.mark.parametrize(("raw", "message"), [
    ("id = 1", "The filter must be a list"),
    ([{"column": "id", "operator": "drop", "value": 1}], "filter[0].operator must be one of"),
    ([{"column": "id", "operator": "=", "value": [1]}], "filter[0]: '=' needs one value"),
    ([{"column": "id", "operator": "in", "value": []}], "'in' needs a non-empty list"),
    ([{"column": "id", "operator": "is null", "value": 1}], "'is null' takes no value"),
    ([{"column": "", "operator": "=", "value": 1}], "filter[0].column must be a column name"),
    ([{"column": "id", "operator": "=", "value": 1, "sql": "x"}], "unknown field 'sql'"),
])
def test_malformed_filters_are_refused_naming_the_condition(raw: object, message: str) -> None:
    with pytest.raises(FilterError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_filter(raw)


def test_unknown_and_hostile_column_names_are_refused_before_any_sql() -> None:
    for column in ("nope", 'id"; DROP TABLE items; --'):
        conditions = parse_filter([{"column": column, "operator": "=", "value": 1}])
        with pytest.raises(FilterError, match="table public.items has no column"):
            compile_filter(conditions, COLUMNS, "public.items")
