"""Creating a source table's destination copy in PostgreSQL, and following its columns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import psycopg2.extensions
from psycopg2 import sql

from rosetta_dagster.core.destination import RetypedColumn
from rosetta_dagster.core.table_schema import (
    Column,
    RowIdentity,
    SchemaError,
    TableSchema,
    UserType,
    user_types,
)


def table_exists(cursor: psycopg2.extensions.cursor, table: sql.Identifier) -> bool:
    """Whether the destination has ``table`` (a qualified identifier)."""
    cursor.execute("SELECT to_regclass(%s) IS NOT NULL", (table.as_string(cursor),))
    row = cursor.fetchone()
    return bool(row and row[0])


def destination_type(column: Column, target_schema: str) -> sql.Composable:
    """The column's type on the destination (user types live in the destination's schema)."""
    if column.type_ref is not None:
        return column.type_ref.destination(target_schema)
    return sql.SQL(column.type_sql)


@dataclass(frozen=True)
class DestinationTable:
    """What :func:`ensure_destination_table` did."""

    created: bool
    retyped: tuple[RetypedColumn, ...] = ()


def ensure_destination_table(
    conn: psycopg2.extensions.connection, schema: TableSchema, target_schema: str,
    destination: str,
) -> DestinationTable:
    """Create the destination table (and its user types) like the source, add new columns, and
    give columns whose source type changed (ALTER COLUMN TYPE) the new type. User types live
    in ``target_schema`` (the destination's); the table where ``schema`` targets it in
    ``destination``."""
    if conn.autocommit:  # a column whose cast fails is retried under a savepoint
        raise ValueError("ensure_destination_table needs a transaction (autocommit is on)")
    table = schema.target(destination, target_schema)
    target = sql.Identifier(table.schema, table.name)
    with conn.cursor() as cursor:
        created = not table_exists(cursor, target)
        for schema_name in dict.fromkeys((target_schema, table.schema)):
            cursor.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(
                sql.Identifier(schema_name)))
        for user in user_types(schema):
            _ensure_user_type(cursor, target_schema, user)
        definitions = [
            sql.SQL("{} {}").format(sql.Identifier(c.name), destination_type(c, target_schema))
            for c in schema.columns
        ]
        key = sql.SQL(", ").join(map(sql.Identifier, schema.key_columns))
        if schema.identity is RowIdentity.PRIMARY_KEY:
            definitions.append(sql.SQL("PRIMARY KEY ({})").format(key))
        elif schema.identity is RowIdentity.UNIQUE_INDEX:
            # The source's replica identity index: unique, on NOT NULL columns.
            definitions.append(sql.SQL("UNIQUE ({})").format(key))
        cursor.execute(
            sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(
                target, sql.SQL(", ").join(definitions)
            )
        )
        cursor.execute(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
            (target.as_string(conn),),
        )
        existing = dict(cursor.fetchall())
        retyped = [] if created else _retype_columns(cursor, schema, target, target_schema,
                                                     existing, destination)
        for column in schema.columns:
            if column.name in existing:
                continue
            column_type = destination_type(column, target_schema)
            default = sql.SQL("")
            if column.missing_value is not None:
                default = sql.SQL(" DEFAULT {}::{}").format(sql.Literal(column.missing_value),
                                                            column_type)
            cursor.execute(
                sql.SQL("ALTER TABLE {} ADD COLUMN {} {}{}").format(
                    target, sql.Identifier(column.name), column_type, default,
                )
            )
    return DestinationTable(created, tuple(retyped))


def _printed_types(cursor: psycopg2.extensions.cursor, columns: Sequence[Column],
                   target_schema: str) -> list[str | None]:
    """Each column's source type as the destination prints it (its format_type of the type
    found there by name, with the source's modifier); None where the destination lacks it."""
    cursor.execute("SELECT format_type(to_regtype(w), m) FROM unnest(%s::text[], %s::int[]) "
                   "WITH ORDINALITY AS u(w, m, n) ORDER BY n",
                   ([destination_type(c, target_schema).as_string(cursor) for c in columns],
                    [c.type_modifier for c in columns]))
    return [row[0] for row in cursor.fetchall()]


def columns_unlike_source(cursor: psycopg2.extensions.cursor, schema: TableSchema,
                          target: sql.Identifier, target_schema: str) -> list[str]:
    """Columns of ``schema`` the destination table ``target`` lacks, or holds in another type
    than the source's (both as the destination prints them)."""
    cursor.execute("SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
                   "WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped",
                   (target.as_string(cursor),))
    existing = dict(cursor.fetchall())
    printed = _printed_types(cursor, schema.columns, target_schema)
    return [column.name for column, wanted in zip(schema.columns, printed, strict=True)
            if column.name not in existing or (wanted is not None
                                               and wanted != existing[column.name])]


def _retype_columns(
    cursor: psycopg2.extensions.cursor, schema: TableSchema, target: sql.Identifier,
    target_schema: str, existing: dict[str, str], destination: str,
) -> list[RetypedColumn]:
    """ALTER COLUMN TYPE where the destination's type differs from the source's.

    Both types are printed by the destination's own format_type (the source's is its type
    found by name there, with the source's type modifier), so only a real change differs. The
    rows the source converted (a table rewrite, never streamed, maybe with a USING expression)
    are the caller's to re-copy; here the cast is a best effort, and a column it cannot cast
    is emptied until then (never a key column: its cast must work).
    """
    retyped = []
    columns = [c for c in schema.columns if c.name in existing]
    wanted_types = [destination_type(c, target_schema) for c in columns]
    printed = _printed_types(cursor, columns, target_schema)
    for column, wanted, new_type in zip(columns, wanted_types, printed, strict=True):
        current = existing[column.name]
        if new_type is None or new_type == current:
            continue
        name = sql.Identifier(column.name)
        alter = sql.SQL("ALTER TABLE {} ALTER COLUMN {} TYPE {} USING {}").format(
            target, name, wanted, sql.SQL("{}::{}").format(name, wanted))
        cursor.execute("SAVEPOINT rosetta_retype")
        try:
            cursor.execute(alter)
        except psycopg2.Error as exc:
            cursor.execute("ROLLBACK TO SAVEPOINT rosetta_retype")
            if column.name in schema.key_columns:
                reason = str(exc).strip().splitlines()[0]
                raise SchemaError(
                    f"Table {schema.table.qualified}: key column {column.name} changed type on "
                    f"the source ({current} -> {new_type}), and destination {destination} cannot "
                    f"convert its copy ({reason}); re-create that table there."
                ) from None
            cursor.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN {} TYPE {} USING NULL").format(
                target, name, wanted))
        cursor.execute("RELEASE SAVEPOINT rosetta_retype")
        retyped.append(RetypedColumn(column.name, current, new_type))
    return retyped


def _ensure_user_type(cursor: psycopg2.extensions.cursor, target_schema: str, user: UserType) -> None:
    """Create the type in the destination's schema; an existing enum gains new labels."""
    name = sql.Identifier(target_schema, user.name)
    cursor.execute(
        "SELECT 1 FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace "
        "WHERE n.nspname = %s AND t.typname = %s",
        (target_schema, user.name),
    )
    exists = cursor.fetchone() is not None
    if user.kind == "e":
        if not exists:
            cursor.execute(sql.SQL("CREATE TYPE {} AS ENUM ({})").format(
                name, sql.SQL(", ").join(map(sql.Literal, user.enum_labels))))
        else:
            for label in user.enum_labels:
                cursor.execute(sql.SQL("ALTER TYPE {} ADD VALUE IF NOT EXISTS {}").format(
                    name, sql.Literal(label)))
        return
    if exists:
        return
    if user.kind == "d":
        assert user.base is not None
        # Default and checks are the source catalog's own text of the user's definition.
        parts = [sql.SQL("CREATE DOMAIN {} AS {}").format(name, user.base.destination(target_schema))]
        if user.default is not None:
            parts.append(sql.SQL("DEFAULT {}").format(sql.SQL(user.default)))
        if user.not_null:
            parts.append(sql.SQL("NOT NULL"))
        parts.extend(sql.SQL(check) for check in user.checks)
        cursor.execute(sql.SQL(" ").join(parts))
        return
    cursor.execute(sql.SQL("CREATE TYPE {} AS ({})").format(name, sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(attribute), ref.destination(target_schema))
        for attribute, ref in user.attributes)))
