"""Reading a source table's schema and creating or widening its destination copy."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg2.extensions
from psycopg2 import sql

from rosetta_dagster.core.errors import RosettaError
from rosetta_dagster.core.pipeline_config import TableRef


class SchemaError(RosettaError):
    """A source table cannot be replicated as it is (missing, no primary key, odd types)."""


# Base types whose Debezium JSON values rosetta_dagster.core.apply.codecs converts exactly.
SUPPORTED_BASE_TYPES = frozenset(
    {
        "int2", "int4", "int8", "numeric", "float4", "float8", "bool", "text", "varchar",
        "bpchar", "name", "bytea", "date", "time", "timetz", "timestamp", "timestamptz",
        "interval", "uuid", "json", "jsonb", "inet", "cidr", "macaddr", "macaddr8", "money",
        "bit", "varbit", "xml", "citext", "oid",
    }
)


@dataclass(frozen=True)
class Column:
    name: str
    type_sql: str  # format_type() on the source, e.g. numeric(38,10), integer[]
    base_type: str  # typname of the type, or of the element type for arrays
    is_array: bool
    type_modifier: int  # atttypmod: the n of bit(n), -1 when absent
    enum_name: str | None = None
    enum_labels: tuple[str, ...] = ()
    # Constant default of a column added to a populated table: existing rows read it without
    # any WAL event, so the destination column must be added with the same default.
    missing_default: str | None = None


@dataclass(frozen=True)
class TableSchema:
    table: TableRef
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)


_COLUMNS_QUERY = """
    SELECT a.attname,
           format_type(a.atttypid, a.atttypmod),
           coalesce(elem.typname, t.typname),
           elem.oid IS NOT NULL,
           a.atttypmod,
           coalesce(elem.typtype, t.typtype),
           CASE WHEN coalesce(elem.typtype, t.typtype) = 'e'
                THEN (SELECT array_agg(e.enumlabel ORDER BY e.enumsortorder)
                      FROM pg_enum e WHERE e.enumtypid = coalesce(elem.oid, t.oid)) END,
           CASE WHEN a.atthasmissing THEN pg_get_expr(d.adbin, d.adrelid) END
    FROM pg_attribute a
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    JOIN pg_type t ON t.oid = a.atttypid
    LEFT JOIN pg_type elem ON elem.oid = t.typelem AND t.typcategory = 'A'
    WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped
    ORDER BY a.attnum
"""

_PRIMARY_KEY_QUERY = """
    SELECT a.attname
    FROM pg_index i
    JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, position) ON true
    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
    WHERE i.indrelid = %s::regclass AND i.indisprimary
    ORDER BY k.position
"""


def _regclass(table: TableRef) -> str:
    return sql.SQL("{}.{}").format(sql.Identifier(table.schema), sql.Identifier(table.name))


def read_table_schema(conn: psycopg2.extensions.connection, table: TableRef, where: str) -> TableSchema:
    """Columns and primary key of ``table``; ``where`` names the database in errors."""
    with conn.cursor() as cursor:
        cursor.execute("SELECT to_regclass(%s)", (_regclass(table).as_string(conn),))
        row = cursor.fetchone()
        if row is None or row[0] is None:
            raise SchemaError(f"Table {table.qualified} does not exist in {where}.")
        relation = _regclass(table).as_string(conn)
        cursor.execute(_COLUMNS_QUERY, (relation,))
        columns = []
        for name, type_sql, base, is_array, typmod, typtype, labels, missing in cursor.fetchall():
            enum = typtype == "e"
            if not enum and base not in SUPPORTED_BASE_TYPES:
                raise SchemaError(
                    f"Column {name} of table {table.qualified} in {where} has the unsupported "
                    f"type {type_sql}."
                )
            columns.append(
                Column(
                    name=name,
                    type_sql=type_sql,
                    base_type="enum" if enum else base,
                    is_array=bool(is_array),
                    type_modifier=typmod,
                    enum_name=base if enum else None,
                    enum_labels=tuple(labels or ()),
                    missing_default=missing,
                )
            )
        cursor.execute(_PRIMARY_KEY_QUERY, (relation,))
        primary_key = tuple(r[0] for r in cursor.fetchall())
    conn.rollback()
    if not primary_key:
        raise SchemaError(
            f"Table {table.qualified} in {where} has no primary key; Rosetta needs one to apply "
            "updates and deletes exactly."
        )
    return TableSchema(table=table, columns=tuple(columns), primary_key=primary_key)


def destination_type(column: Column, target_schema: str) -> sql.Composable:
    """The column's type on the destination (enums live in the destination's target schema)."""
    if column.enum_name is None:
        return sql.SQL(column.type_sql)  # format_type() output of a built-in type
    enum = sql.SQL("{}.{}").format(sql.Identifier(target_schema), sql.Identifier(column.enum_name))
    return sql.Composed([enum, sql.SQL("[]")]) if column.is_array else enum


def ensure_destination_table(
    conn: psycopg2.extensions.connection, schema: TableSchema, target_schema: str
) -> None:
    """Create the destination table (and its enum types) like the source, or add new columns."""
    target = sql.Identifier(target_schema, schema.table.name)
    with conn.cursor() as cursor:
        cursor.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(target_schema)))
        for column in schema.columns:
            if column.enum_name is not None:
                _ensure_enum(cursor, target_schema, column)
        definitions = [
            sql.SQL("{} {}").format(sql.Identifier(c.name), destination_type(c, target_schema))
            for c in schema.columns
        ]
        definitions.append(
            sql.SQL("PRIMARY KEY ({})").format(
                sql.SQL(", ").join(map(sql.Identifier, schema.primary_key))
            )
        )
        cursor.execute(
            sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(
                target, sql.SQL(", ").join(definitions)
            )
        )
        cursor.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 "
            "AND NOT attisdropped",
            (target.as_string(conn),),
        )
        existing = {row[0] for row in cursor.fetchall()}
        for column in schema.columns:
            if column.name in existing:
                continue
            default = sql.SQL("")
            if column.missing_default is not None:
                # A constant expression read from the source catalog (atthasmissing), not input.
                default = sql.SQL(" DEFAULT {}").format(sql.SQL(column.missing_default))
            cursor.execute(
                sql.SQL("ALTER TABLE {} ADD COLUMN {} {}{}").format(
                    target, sql.Identifier(column.name), destination_type(column, target_schema),
                    default,
                )
            )


def _ensure_enum(cursor: psycopg2.extensions.cursor, target_schema: str, column: Column) -> None:
    assert column.enum_name is not None
    enum = sql.Identifier(target_schema, column.enum_name)
    cursor.execute(
        "SELECT 1 FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace "
        "WHERE n.nspname = %s AND t.typname = %s",
        (target_schema, column.enum_name),
    )
    if cursor.fetchone() is None:
        cursor.execute(
            sql.SQL("CREATE TYPE {} AS ENUM ({})").format(
                enum, sql.SQL(", ").join(map(sql.Literal, column.enum_labels))
            )
        )
    else:
        for label in column.enum_labels:
            cursor.execute(
                sql.SQL("ALTER TYPE {} ADD VALUE IF NOT EXISTS {}").format(enum, sql.Literal(label))
            )
