"""The type matrix: one source table per type family, filled with the values real data has.

Shared by the engine tests: each family is a table ``public.m_<family> (id int PRIMARY KEY,
n int, v <type>)`` so an update can leave the awkward column untouched (``n``) or change it
(``v``). Values are compared as PostgreSQL's own text of the whole row under the pinned
settings, so "equal" means exactly what the product promises.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psycopg2
from psycopg2 import sql

from rosetta_dagster.core.dsn import pinned_options

if TYPE_CHECKING:
    from rosetta_dagster.core.table_schema import TableSchema
    from rosetta_dagster.harness import StreamingEnv, TableComparison

USER_TYPES = """
CREATE TYPE public.mood AS ENUM ('sad', 'ok', 'happy', 'it''s "complicated"');
CREATE DOMAIN public.posint AS integer CHECK (VALUE > 0);
{domain_over_enum}
CREATE TYPE public.address AS (street text, zip int, tags text[], m public.mood);
"""

DOMAIN_OVER_ENUM = "CREATE DOMAIN public.mood_d AS public.mood;"
_CONTROL = "".join(chr(i) for i in range(1, 32)) + chr(127)
_ALL_BYTES = "\\x" + bytes(range(256)).hex()


@dataclass(frozen=True)
class Family:
    name: str
    type_sql: str
    values: tuple[str, ...]  # text input, as written by a user


FAMILIES = (
    Family("int", "int4", ("0", "-2147483648", "2147483647")),
    Family("bigint", "int8", ("-9223372036854775808", "9223372036854775807")),
    Family("smallint", "int2", ("-32768", "32767")),
    Family("numeric", "numeric", ("NaN", "Infinity", "-Infinity", "-0.000000000000000000001",
                                  "123456789012345678901234567890.123456789", "0.0000")),
    Family("numeric_scaled", "numeric(12,2)", ("-9999999999.99", "0", "NaN")),
    Family("real", "float4", ("NaN", "Infinity", "-Infinity", "-0", "1.4e-45", "3.4028235e38",
                              "0.1")),
    Family("double", "float8", ("NaN", "Infinity", "-Infinity", "-0", "4.9e-324",
                                "1.7976931348623157e308", "0.1")),
    Family("money", "money", ("-92233720368547758.08", "92233720368547758.07", "0")),
    Family("bool", "bool", ("t", "f")),
    Family("text", "text", ("", "it's \"quoted\" \\ back\\slash", "tab\tnew\nline\rcr",
                            _CONTROL, "\\N", "NULL", "ü 🐘 中文", " leading and trailing ")),
    Family("varchar", "varchar(20)", ("", "x", "🐘" * 20)),
    Family("bpchar", "char(5)", ("a", "", "abcde")),
    Family("char", '"char"', ("a", "\\", "\\377", "\\001")),
    Family("name", "name", ("pg_catalog", "x" * 63)),
    Family("bytea", "bytea", ("\\x", "\\x00", _ALL_BYTES)),
    Family("date", "date", ("infinity", "-infinity", "4713-01-01 BC", "0001-01-01 BC",
                            "2000-02-29", "5874897-12-31")),
    Family("time", "time", ("00:00:00", "24:00:00", "23:59:59.999999")),
    Family("timetz", "timetz", ("10:00:00+02", "23:59:59.999999-15:59", "00:00:00+15:59",
                                "12:00:00-03:30")),
    Family("timestamp", "timestamp", ("infinity", "-infinity", "4713-01-01 00:00:00 BC",
                                      "294276-12-31 23:59:59.999999",
                                      "2000-01-01 00:00:00.000001")),
    Family("timestamptz", "timestamptz", ("infinity", "-infinity", "4713-01-01 00:00:00+00 BC",
                                          "2024-06-30 23:59:59.999999+05:30",
                                          "1900-01-01 00:00:00+00", "2000-01-01 00:00:00-12:34")),
    Family("interval", "interval", ("-178000000 years", "1 year 2 mons 3 days 04:05:06.789",
                                    "-1 days +02:03:04.5", "0", "1 mon -1 days",
                                    "P1Y2M3DT4H5M6.000007S")),
    Family("uuid", "uuid", ("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
                            "00000000-0000-0000-0000-000000000000")),
    Family("json", "json", ('{"a":1,  "a" : 2}', " [ ] ", "null", '"\\u00e9 \\"q\\""')),
    Family("jsonb", "jsonb", ('{"b": [1, {"c": null}], "a": "é"}', "[]", '"🐘"', "1e400")),
    # The embedded PostgreSQL is built without libxml: xml columns exist, values cannot.
    Family("xml", "xml", ()),
    Family("bit", "bit(8)", ("00000101", "11111111")),
    Family("varbit", "varbit", ("0001", "", "1010101010101010101")),
    Family("inet", "inet", ("2001:db8::1/64", "192.168.0.1", "::ffff:1.2.3.4")),
    Family("cidr", "cidr", ("10.0.0.0/8", "2001:db8::/32")),
    Family("macaddr", "macaddr", ("08:00:2b:01:02:03",)),
    Family("macaddr8", "macaddr8", ("08:00:2b:01:02:03:04:05",)),
    Family("pg_lsn", "pg_lsn", ("0/0", "FFFFFFFF/FFFFFFFF", "16/B374D848")),
    Family("tsvector", "tsvector", ("a:1A fat:2B,4C cat:5D", "", "'it''s':1 'wörd'")),
    Family("tsquery", "tsquery", ("fat & (rat | !cat)", "'a' <-> 'b'")),
    Family("point", "point", ("(1.5,-2)", "(NaN,Infinity)")),
    Family("line", "line", ("{1,-1,0}",)),
    Family("lseg", "lseg", ("[(0,0),(1,1)]",)),
    Family("box", "box", ("(1,1),(0,0)",)),
    Family("path", "path", ("[(0,0),(1,1),(2,0)]", "((0,0),(1,1))")),
    Family("polygon", "polygon", ("((0,0),(1,1),(1,0))",)),
    Family("circle", "circle", ("<(0,0),1.5>",)),
    Family("int4range", "int4range", ("[1,10)", "empty", "(,)", "(,5]")),
    Family("int8range", "int8range", ("[-9223372036854775808,0)",)),
    Family("numrange", "numrange", ("[1.5,2.5]", "(,)")),
    Family("daterange", "daterange", ("[-infinity,infinity)", "[2000-01-01,2000-01-01]", "empty")),
    Family("tsrange", "tsrange", ('["4713-01-01 00:00:00 BC",infinity)',)),
    Family("tstzrange", "tstzrange", ('["2000-01-01 00:00:00+00",)', "empty")),
    Family("int4multirange", "int4multirange", ("{[1,3),[5,7)}", "{}")),
    Family("datemultirange", "datemultirange", ("{[2000-01-01,2000-02-01),[-infinity,1999-01-01)}",)),
    Family("tstzmultirange", "tstzmultirange", ('{["2000-01-01 00:00:00+00",infinity)}',)),
    Family("pg_snapshot", "pg_snapshot", ("10:20:10,14,15",)),
    Family("oid", "oid", ("0", "4294967295")),
    Family("tid", "tid", ("(0,1)", "(4294967295,65535)")),
    Family("xid8", "xid8", ("0", "18446744073709551615")),
    Family("int_array", "int4[]", ("{{1,2},{3,4}}", "[0:2]={1,2,3}", "{}", "{NULL}",
                                   "[-1:0][2:3]={{1,2},{3,4}}", "{{{1}}}")),
    Family("text_array", "text[]", ('{{"a,b","c\\"d"},{NULL,""}}', '{"NULL",NULL}',
                                    '{"back\\\\slash","new\nline"," "}', "{}")),
    Family("numeric_array", "numeric[]", ("{NaN,Infinity,-Infinity,1.5}",)),
    Family("timestamptz_array", "timestamptz[]",
           ('{infinity,-infinity,"4713-01-01 00:00:00+00 BC","2000-01-01 00:00:00+00"}',)),
    Family("date_array", "date[]", ("[3:4]={infinity,\"0001-01-01 BC\"}",)),
    Family("uuid_array", "uuid[]", ("{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11,NULL}",)),
    Family("bytea_array", "bytea[]", ('{"\\\\x00ff",NULL,"\\\\x"}',)),
    Family("jsonb_array", "jsonb[]", ('{"{\\"a\\": 1}",null}',)),
    Family("range_array", "int4range[]", ('{"[1,2)",empty}',)),
    Family("enum", "public.mood", ("sad", "it's \"complicated\"")),
    Family("enum_array", "public.mood[]", ('{sad,happy,NULL}', '{{sad},{ok}}')),
    Family("domain", "public.posint", ("1", "2147483647")),
    Family("domain_array", "public.posint[]", ("{1,2}", "[2:2]={3}")),
    Family("domain_over_enum", "public.mood_d", ("ok",)),
    Family("composite", "public.address", ("(,,,)", '("a,b ""q""",12345,"{x,y}",happy)',
                                           '(" ",0,{},)')),
    Family("composite_array", "public.address[]", ('{"(a,1,{},sad)",NULL,"(,,,)"}',)),
)


def families_for(engine: str) -> tuple[Family, ...]:
    """The matrix an engine runs: Debezium's type registry fails when it starts (a
    NullPointerException) on a database that holds a domain over an enum, used or not."""
    if engine == "debezium":
        return tuple(f for f in FAMILIES if f.name != "domain_over_enum")
    return FAMILIES


def user_types_for(families: tuple[Family, ...]) -> str:
    over_enum = any(f.name == "domain_over_enum" for f in families)
    return USER_TYPES.format(domain_over_enum=DOMAIN_OVER_ENUM if over_enum else "")


def pinned_connection(url: str) -> psycopg2.extensions.connection:
    """A connection under the product's pinned settings (values read and written exactly)."""
    conn = psycopg2.connect(url, options=pinned_options())
    conn.autocommit = True
    return conn


def table_name(family: Family) -> str:
    return f"m_{family.name}"


# Every family again in two tables without a primary key, one column each (``v_<family>``),
# row i holding each family's i-th value: keyed by a replica identity index, and REPLICA
# IDENTITY FULL (a multiset: every row twice).
INDEX_TABLE, FULL_TABLE = "m_index", "m_full"


def create_keyed_matrix(env: StreamingEnv) -> tuple[tuple[Family, ...], list[str]]:
    """The engine's families, and the matrix's tables created for it except the wide table
    without a key (warehouse destinations take keyless tables from pgoutput only; they have
    tests of their own)."""
    families = families_for(env.engine)
    return families, [t for t in create_matrix(env.source_url, families, env.engine)
                      if t != f"public.{FULL_TABLE}"]


def create_matrix(url: str, families: tuple[Family, ...] = FAMILIES,
                  engine: str | None = None) -> list[str]:
    """Create and fill every family's table, and the two wide tables without a primary key
    (``engine``: the FULL table keeps only the columns that engine carries without a key);
    returns their qualified names."""
    conn = pinned_connection(url)
    with conn.cursor() as cursor:
        cursor.execute(user_types_for(families))
        for family in families:
            table = sql.Identifier("public", table_name(family))
            cursor.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, n int NOT NULL DEFAULT 0, "
                                   "v {})").format(table, sql.SQL(family.type_sql)))
            insert_values(cursor, family, first_id=1)
        _create_wide_tables(cursor, families)
    wide = [INDEX_TABLE, FULL_TABLE]
    if engine is not None:
        _leave_out_uncarried(conn, engine)
    conn.close()
    return [f"public.{table_name(f)}" for f in families] + [f"public.{t}" for t in wide]


def _wide_column(family: Family) -> sql.Identifier:
    return sql.Identifier(f"v_{family.name}")


def _create_wide_tables(cursor: psycopg2.extensions.cursor, families: tuple[Family, ...]) -> None:
    columns = sql.SQL(", ").join(sql.SQL("{} {}").format(_wide_column(f), sql.SQL(f.type_sql))
                                 for f in families)
    index, full = sql.Identifier("public", INDEX_TABLE), sql.Identifier("public", FULL_TABLE)
    cursor.execute(sql.SQL(
        "CREATE TABLE {index} (id int NOT NULL, n int, {columns}); "
        "CREATE UNIQUE INDEX m_index_identity ON {index} (id); "
        "ALTER TABLE {index} REPLICA IDENTITY USING INDEX m_index_identity; "
        "CREATE TABLE {full} (n int, {columns}); "
        "ALTER TABLE {full} REPLICA IDENTITY FULL").format(index=index, full=full,
                                                           columns=columns))
    rows = max(len(f.values) for f in families) + 1  # the last row: NULL in every family
    names = sql.SQL(", ").join(_wide_column(f) for f in families)
    casts = sql.SQL(", ").join(sql.SQL("%s::{}").format(sql.SQL(f.type_sql)) for f in families)
    for row in range(rows):
        values = [f.values[row] if row < len(f.values) else None for f in families]
        cursor.execute(sql.SQL("INSERT INTO {} (id, n, {}) VALUES (%s, %s, {})").format(
            index, names, casts), (row + 1, row, *values))
    cursor.execute(sql.SQL("INSERT INTO {full} SELECT n, {names} FROM {index}; "
                           "INSERT INTO {full} SELECT * FROM {full}").format(
        full=full, index=index, names=names))


def _leave_out_uncarried(conn: psycopg2.extensions.connection, engine: str) -> None:
    """The FULL table as ``engine`` can replicate it, as the stream decides (see
    core.streaming.prestream): without the columns it re-reads by key, which it cannot do
    without one (Debezium: also those it carries in an ordinary range only, e.g. dates:
    their out-of-range values would stop the stream)."""
    from rosetta_dagster.core.capture import capture_engine
    from rosetta_dagster.core.pipeline_config import TableRef
    from rosetta_dagster.core.table_schema import read_table_schema

    capture = capture_engine(engine)
    table = sql.Identifier("public", FULL_TABLE)
    schema = read_table_schema(conn, TableRef("public", FULL_TABLE), "matrix")
    conn.autocommit = True
    dropped = [c.name for c in schema.columns if capture.values.reread(c)]
    if dropped:
        with conn.cursor() as cursor:
            cursor.execute(sql.SQL("ALTER TABLE {} {}").format(table, sql.SQL(", ").join(
                sql.SQL("DROP COLUMN {}").format(sql.Identifier(c)) for c in dropped)))


def insert_values(cursor: psycopg2.extensions.cursor, family: Family, first_id: int) -> None:
    """Every value of the family plus a NULL, as literal text input."""
    table = sql.Identifier("public", table_name(family))
    for offset, value in enumerate((*family.values, None)):
        cursor.execute(sql.SQL("INSERT INTO {} (id, v) VALUES (%s, %s::{})").format(
            table, sql.SQL(family.type_sql)), (first_id + offset, value))


def change_matrix(url: str, families: tuple[Family, ...] = FAMILIES) -> None:
    """Streamed changes: inserts (literal and copied), updates that leave ``v`` untouched,
    updates that change it, NULLs, deletes."""
    conn = pinned_connection(url)
    with conn.cursor() as cursor:
        for family in families:
            table = sql.Identifier("public", table_name(family))
            count = len(family.values) + 1
            insert_values(cursor, family, first_id=1001)
            cursor.execute(sql.SQL("INSERT INTO {0} (id, n, v) SELECT id + 2000, n, v FROM {0} "
                                   "WHERE id < 1000").format(table))
            cursor.execute(sql.SQL("UPDATE {} SET n = n + 1").format(table))
            # Rotate the values of the first rows: every row gets another row's value.
            cursor.execute(sql.SQL(
                "UPDATE {0} AS t SET v = s.v FROM {0} AS s WHERE t.id < 1000 "
                "AND s.id = t.id %% %s + 1").format(table), (count,))
            cursor.execute(sql.SQL("UPDATE {} SET v = NULL WHERE id = 1001").format(table))
            cursor.execute(sql.SQL("DELETE FROM {} WHERE id % 3 = 0").format(table))
        _change_wide_tables(cursor)
    conn.close()


def _change_wide_tables(cursor: psycopg2.extensions.cursor) -> None:
    """The same kinds of changes without a primary key: key updates on the index table; on the
    FULL table, one of two equal rows changed or deleted, and more duplicates."""
    index, full = sql.Identifier("public", INDEX_TABLE), sql.Identifier("public", FULL_TABLE)
    rest = _other_columns(cursor, INDEX_TABLE)
    cursor.execute("SELECT to_regclass(%s) IS NOT NULL", (f"public.{FULL_TABLE}",))
    with_full = bool(cursor.fetchone()[0])  # type: ignore[index]
    for statement in (
        "INSERT INTO {index} SELECT id + 2000, n, {rest} FROM {index}",
        "UPDATE {index} SET n = n + 1",
        "UPDATE {index} SET id = id + 1000 WHERE id % 4 = 1",
        "DELETE FROM {index} WHERE id % 3 = 0",
        # Each of these in a transaction of its own: every row twice, even ones three times;
        # then one copy of each changes (an update of one of several equal rows); then one
        # of each even row's two copies left goes.
        "INSERT INTO {full} SELECT * FROM {full} WHERE n % 2 = 0",
        "UPDATE {full} SET n = n + 100 WHERE ctid IN (SELECT min(ctid) FROM {full} GROUP BY n)",
        "DELETE FROM {full} WHERE ctid IN (SELECT min(ctid) FROM {full} WHERE n < 100 "
        "GROUP BY n HAVING count(*) > 1)",
    ):
        if with_full or "{full}" not in statement:
            cursor.execute(sql.SQL(statement).format(index=index, full=full, rest=rest))


def _other_columns(cursor: psycopg2.extensions.cursor, table: str) -> sql.Composed:
    """The table's columns after ``id`` and ``n``."""
    cursor.execute("SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND "
                   "attnum > 2 AND NOT attisdropped ORDER BY attnum", (f"public.{table}",))
    return sql.SQL(", ").join(sql.Identifier(r[0]) for r in cursor.fetchall())


def rows_as_text(url: str | psycopg2.extensions.connection, schema: str, table: str
                 ) -> list[tuple[int, str]]:
    """``(id, row as text)`` in key order; ``url``: a database, or a connection to reuse."""
    conn = pinned_connection(url) if isinstance(url, str) else url
    try:
        with conn.cursor() as cursor:
            cursor.execute(sql.SQL("SELECT id, ROW(t.*)::text FROM {} AS t ORDER BY id").format(
                sql.Identifier(schema, table)))
            return [(int(i), str(text)) for i, text in cursor.fetchall()]
    except psycopg2.errors.UndefinedTable:
        return []
    finally:
        if isinstance(url, str):
            conn.close()


def multiset_rows(conn: psycopg2.extensions.connection, schema: str, table: str) -> list[str]:
    """Every row's text, sorted (equal lists: equal multisets); none when the table is absent."""
    try:
        with conn.cursor() as cursor:
            cursor.execute(sql.SQL("SELECT ROW(t.*)::text FROM {} AS t ORDER BY 1").format(
                sql.Identifier(schema, table)))
            return [str(row[0]) for row in cursor.fetchall()]
    except psycopg2.errors.UndefinedTable:
        return []


def matrix_tables(families: tuple[Family, ...] = FAMILIES) -> list[str]:
    """The matrix's table names: a family's each, the index-keyed one, the keyless one."""
    return [*(table_name(f) for f in families), INDEX_TABLE, FULL_TABLE]


def matrix_differences(source_url: str, destination_url: str, schema: str,
                       tables: Sequence[str], first_only: bool = False) -> dict[str, list[str]]:
    """For each of the matrix's ``tables`` that differs, in order, its rows that differ, as
    ``table id: source text != destination text`` (the keyless table as a multiset);
    ``first_only``: the first such table's only (one connection per side: tests poll this)."""
    found: dict[str, list[str]] = {}
    source_conn, destination_conn = pinned_connection(source_url), pinned_connection(destination_url)
    try:
        for table in tables:
            if found and first_only:
                break
            if table == FULL_TABLE:
                source_rows = Counter(multiset_rows(source_conn, "public", table))
                destination_rows = Counter(multiset_rows(destination_conn, schema, table))
                lines = [f"{table}: {count} more time(s) at the source: {row!r}"
                         for row, count in (source_rows - destination_rows).items()]
                lines += [f"{table}: {count} more time(s) at the destination: {row!r}"
                          for row, count in (destination_rows - source_rows).items()]
            else:
                source = dict(rows_as_text(source_conn, "public", table))
                destination = dict(rows_as_text(destination_conn, schema, table))
                lines = [f"{table} id {key}: source {source.get(key)!r} != "
                         f"destination {destination.get(key)!r}"
                         for key in sorted(set(source) | set(destination))
                         if source.get(key) != destination.get(key)]
            if lines:
                found[table] = lines
    finally:
        source_conn.close()
        destination_conn.close()
    return found


def differences(
    source_url: str, destination_url: str, schema: str, families: tuple[Family, ...] = FAMILIES
) -> list[str]:
    """Every row of the matrix that differs (see :func:`matrix_differences`)."""
    from rosetta_dagster.harness import differing_rows  # the harness imports this module

    return differing_rows(matrix_tables(families),
                          matrix_comparison(source_url, destination_url, schema))


def matrix_comparison(source_url: str, destination_url: str, schema: str) -> TableComparison:
    """The matrix's tables compared for :func:`wait_until_tables_equal`."""
    return functools.partial(matrix_differences, source_url, destination_url, schema)


def type_table(url: str) -> str:
    """The type table of docs/design.md, from the matrix's tables in ``url``, each engine's own
    classification of their columns and each column's DuckDB and Snowflake types (the matrix tests prove
    every line exact)."""
    from rosetta_dagster.core.capture import capture_engine
    from rosetta_dagster.core.destination.duckdb.types import duck_type
    from rosetta_dagster.core.destination.snowflake.types import snow_type
    from rosetta_dagster.core.pipeline_config import CAPTURE_ENGINES, TableRef
    from rosetta_dagster.core.table_schema import read_table_schema

    conn = pinned_connection(url)
    lines = ["| family | type | " + " | ".join(CAPTURE_ENGINES) + " | in DuckDB | in Snowflake |",
             "| --- | --- | " + " | ".join("---" for _ in CAPTURE_ENGINES) + " | --- | --- |"]
    for family in FAMILIES:
        column = read_table_schema(conn, TableRef("public", table_name(family)), "matrix").column("v")
        cells = []
        for name in CAPTURE_ENGINES:
            values = capture_engine(name).values
            if family not in families_for(name):
                cells.append("refused: the engine fails to start on a database that has it")
            elif (reason := values.refusal(column, False)) is not None:
                cells.append(f"refused: {reason}")
            else:
                cells.append("exact, re-read from the source" if values.reread(column) else "exact")
        for kept in (duck_type(column), snow_type(column)):
            cells.append(f"`{kept.sql}`" if kept.native else "`VARCHAR` (PostgreSQL's text)")
        lines.append(f"| {family.name} | `{family.type_sql}` | " + " | ".join(cells) + " |")
    conn.close()
    return "\n".join(lines)


def source_schemas(env: StreamingEnv, tables: list[str]) -> list[TableSchema]:
    """The source's schema of each of ``tables`` (qualified names), read under the pinned
    settings."""
    from rosetta_dagster.core.pipeline_config import TableRef
    from rosetta_dagster.core.table_schema import read_table_schema

    conn = pinned_connection(env.source_url)
    try:
        return [read_table_schema(conn, TableRef.parse(t), "matrix") for t in tables]
    finally:
        conn.close()


def row_differences(env: StreamingEnv, schemas: Sequence[TableSchema],
                    destination_rows: Callable[[TableSchema], list[tuple[int, str]]],
                    *, first_only: bool = False) -> dict[str, list[str]]:
    """For each of ``schemas``' tables whose rows differ between the source and a destination,
    in order, those rows, both as PostgreSQL's row text by id (``destination_rows``: a table's
    ``(id, row text)`` at the destination); ``first_only``: the first such table's only."""
    found: dict[str, list[str]] = {}
    conn = pinned_connection(env.source_url)
    try:
        for schema in schemas:
            if found and first_only:
                break
            source = dict(rows_as_text(conn, "public", schema.table.name))
            target = dict(destination_rows(schema))
            lines = [f"{schema.table.name} {key}: {source.get(key)!r} != {target.get(key)!r}"
                     for key in sorted(set(source) | set(target))
                     if source.get(key) != target.get(key)]
            if lines:
                found[schema.table.name] = lines
    finally:
        conn.close()
    return found
