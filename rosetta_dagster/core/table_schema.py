"""Reading a source table's schema and creating or widening its destination copy."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import psycopg2.extensions
from psycopg2 import sql

from rosetta_dagster.core.errors import RosettaError
from rosetta_dagster.core.pipeline_config import NO_OPTIONS, TableOptions, TableRef


class SchemaError(RosettaError):
    """A source table cannot be replicated as it is (missing, no replica identity, odd types)."""


class RowIdentity(enum.Enum):
    """How the rows of a table are told apart: the source's replica identity, which is what
    its UPDATEs and DELETEs carry of the old row."""

    PRIMARY_KEY = "primary key"  # REPLICA IDENTITY DEFAULT (or FULL) with a primary key
    UNIQUE_INDEX = "unique index"  # REPLICA IDENTITY USING INDEX: that index is the key
    # REPLICA IDENTITY FULL without a primary key: no key; rows are a multiset, an UPDATE or
    # DELETE affects one row equal to its old row (duplicates stay duplicates).
    FULL_ROW = "full row"
    # No replica identity, and the table's ``replicate: inserts_only`` option: only its
    # INSERTs are published (an UPDATE or DELETE would fail on the source otherwise).
    INSERTS_ONLY = "inserts only"


@dataclass(frozen=True)
class UserType:
    """A user-defined enum, domain or composite type: created on the destination, in the
    destination's schema, before the tables that use it (its dependencies first)."""

    name: str
    kind: str  # "e" enum, "d" domain, "c" composite
    enum_labels: tuple[str, ...] = ()
    base: TypeRef | None = None  # domain: its base type
    not_null: bool = False  # domain
    default: str | None = None  # domain, as the source catalog prints it
    checks: tuple[str, ...] = ()  # domain CHECK constraints (pg_get_constraintdef)
    attributes: tuple[tuple[str, TypeRef], ...] = ()  # composite

    def dependencies(self) -> list[UserType]:
        refs = [self.base] if self.base is not None else [t for _, t in self.attributes]
        return [r.user for r in refs if r is not None and r.user is not None]


@dataclass(frozen=True)
class TypeRef:
    """A column's or attribute's type: a user type (by name), or format_type() text."""

    sql: str
    user: UserType | None = None
    is_array: bool = False

    def uses(self, type_name: str) -> bool:
        """True when this type is ``type_name`` or is built from it (arrays, domains, composites)."""
        if self.user is None:
            return self.sql.removesuffix("[]") == type_name
        if self.user.base is not None:
            return self.user.base.uses(type_name)
        return any(ref.uses(type_name) for _, ref in self.user.attributes)

    def destination(self, target_schema: str) -> sql.Composable:
        if self.user is None:
            return sql.SQL(self.sql)  # format_type() output of a built-in or extension type
        name = sql.Identifier(target_schema, self.user.name)
        return sql.Composed([name, sql.SQL("[]")]) if self.is_array else name


@dataclass(frozen=True)
class Column:
    name: str
    type_sql: str  # format_type() on the source, e.g. numeric(38,10), integer[]
    base_type: str  # typname of the type, or of the element type for arrays
    is_array: bool
    type_modifier: int  # atttypmod: the n of bit(n), -1 when absent
    enum_name: str | None = None
    enum_labels: tuple[str, ...] = ()
    # The value rows that existed when the column was added with a default read without any
    # WAL event (atthasmissing: the default evaluated once, in its text form), so the
    # destination column is added with that value as its default. Never the expression: it may
    # name the source's functions, or be now().
    missing_value: str | None = None
    type_ref: TypeRef | None = None  # None: type_sql as it is
    type_oid: int = 0


@dataclass(frozen=True)
class TableSchema:
    """A source table as a pipeline replicates it: its columns (the table's own, or the
    projection its options choose), key, row filter and destination tables."""

    table: TableRef
    columns: tuple[Column, ...]
    # The replica identity's columns: the primary key, or the USING INDEX index's columns
    # (empty for a table without a key: FULL_ROW, INSERTS_ONLY).
    key_columns: tuple[str, ...]
    identity: RowIdentity = RowIdentity.PRIMARY_KEY
    row_filter: str | None = None  # the publication's WHERE: only these rows are replicated
    # Source columns left out by the options: an event may still carry them (sent before the
    # publication changed); they are ignored, not a schema change.
    ignored_columns: frozenset[str] = frozenset()
    targets: tuple[tuple[str, TableRef], ...] = ()  # per destination name, when not the default

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @property
    def keyless(self) -> bool:
        """Rows without a key: a multiset, loaded and repaired a whole table at a time."""
        return not self.key_columns

    @property
    def column_types(self) -> dict[str, tuple[int, int]]:
        """Per column: type OID and type modifier on the source (what a retype changes)."""
        return {c.name: (c.type_oid, c.type_modifier) for c in self.columns}

    def target(self, destination: str, destination_schema: str) -> TableRef:
        """The table written in destination ``destination`` (default: same name, its schema)."""
        return dict(self.targets).get(destination, TableRef(destination_schema, self.table.name))

    def target_sql(self, destination: str, destination_schema: str) -> sql.Identifier:
        target = self.target(destination, destination_schema)
        return sql.Identifier(target.schema, target.name)

    @property
    def source_sql(self) -> sql.Identifier:
        return sql.Identifier(self.table.schema, self.table.name)

    @property
    def source_filter(self) -> sql.Composable:
        """The rows replicated, as a condition on the source table (validated as one
        expression when the pipeline file is read; PostgreSQL judged it in the publication)."""
        return replicated_rows(self.row_filter)

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)


def _scalar_xml(ref: TypeRef) -> bool:
    if ref.is_array:
        return False
    if ref.user is None:
        return ref.sql == "xml"
    return ref.user.kind == "d" and ref.user.base is not None and _scalar_xml(ref.user.base)


def xml_as_text(column: Column) -> bool:
    """An ``xml`` value (or a domain's over xml), whose exact text is its cast to text: the
    type's output function, which logical decoding and COPY use, drops an XML declaration
    with default values (``<?xml version="1.0"?>``) and normalises any other."""
    if column.type_ref is not None:
        return _scalar_xml(column.type_ref)
    return column.base_type == "xml" and not column.is_array


def nested_xml(column: Column) -> bool:
    """``xml`` inside an array or composite: its elements print through the output function,
    so their declarations cannot be carried exactly."""
    carries = (column.type_ref.uses("xml") if column.type_ref is not None
               else column.base_type == "xml")
    return carries and not xml_as_text(column)


NESTED_XML_REFUSAL = ("xml values inside an array or composite print without their XML "
                      "declaration, so they cannot be carried exactly (leave the column out "
                      "with exclude_columns)")


def exact_select(column: Column, alias: str | None = None) -> sql.Composable:
    """The column as selected wherever its value must keep its exact text (COPY out of the
    source, checksums): an xml value through its text cast."""
    name = (sql.Identifier(alias, column.name) if alias is not None
            else sql.Identifier(column.name))
    return sql.SQL("{}::text").format(name) if xml_as_text(column) else name


def replicated_rows(row_filter: str | None) -> sql.Composable:
    """A table's row filter as a condition (TRUE without one), for statements executed with
    parameters (an empty sequence when there are none): its ``%`` (``id % 3 = 0``) doubled, as
    psycopg2 then reads a single one as a placeholder."""
    if row_filter is None:
        return sql.SQL("TRUE")
    return sql.SQL("({})").format(sql.SQL(row_filter.replace("%", "%%")))


_COLUMNS_QUERY = """
    SELECT a.atttypid, a.attname,
           format_type(a.atttypid, a.atttypmod),
           coalesce(elem.typname, t.typname),
           elem.oid IS NOT NULL,
           a.atttypmod,
           coalesce(elem.typtype, t.typtype),
           CASE WHEN coalesce(elem.typtype, t.typtype) = 'e'
                THEN (SELECT array_agg(e.enumlabel ORDER BY e.enumsortorder)
                      FROM pg_enum e WHERE e.enumtypid = coalesce(elem.oid, t.oid)) END,
           CASE WHEN a.atthasmissing THEN (a.attmissingval::text::text[])[1] END
    FROM pg_attribute a
    JOIN pg_type t ON t.oid = a.atttypid
    LEFT JOIN pg_type elem ON elem.oid = t.typelem AND t.typcategory = 'A'
    WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped
    ORDER BY a.attnum
"""

_IDENTITY_QUERY = """
    SELECT c.relreplident,
           (SELECT array_agg(a.attname ORDER BY k.position) FROM pg_index i
            JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, position) ON true
            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
            WHERE i.indrelid = c.oid AND i.indisprimary),
           (SELECT array_agg(a.attname ORDER BY k.position) FROM pg_index i
            JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, position) ON true
            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
            WHERE i.indrelid = c.oid AND i.indisreplident)
    FROM pg_class c WHERE c.oid = %s::regclass
"""


def row_identity(replident: str, primary_key: Sequence[str], identity_index: Sequence[str],
                 inserts_only: bool) -> tuple[RowIdentity, tuple[str, ...]] | None:
    """The table's row identity and key from its replica identity setting (``relreplident``),
    its primary key and its replica identity index; None: it has no replica identity."""
    if inserts_only:
        return RowIdentity.INSERTS_ONLY, ()
    # An identity index that covers the primary key carries it in every old-key tuple: the
    # primary key stays the key (Debezium keys its events by it too).
    covered = bool(primary_key) and set(primary_key) <= set(identity_index)
    if replident == "i" and identity_index and not covered:
        return RowIdentity.UNIQUE_INDEX, tuple(identity_index)
    if (replident in ("d", "f") and primary_key) or covered:
        return RowIdentity.PRIMARY_KEY, tuple(primary_key)
    if replident == "f":
        return RowIdentity.FULL_ROW, ()
    return None  # NOTHING, DEFAULT without a primary key, or USING a dropped index


def no_identity_refusal(table: TableRef, where: str) -> str:
    qualified = table.qualified
    return (f"Table {qualified} in {where} has no replica identity (no primary key, no "  # noqa: S608
            "REPLICA IDENTITY FULL or USING INDEX), so publishing it would make every UPDATE "
            f"and DELETE of it fail on the source; give it one (ALTER TABLE {qualified} "
            f"REPLICA IDENTITY FULL, or a unique index on NOT NULL columns and ALTER TABLE "
            f"{qualified} REPLICA IDENTITY USING INDEX <index>) or set replicate: "
            "inserts_only on the table to replicate its inserts only, so nothing was written.")



def _regclass(table: TableRef) -> str:
    return sql.SQL("{}.{}").format(sql.Identifier(table.schema), sql.Identifier(table.name))


_TYPE_QUERY = """
    SELECT t.typtype, t.typcategory, t.typelem, n.nspname, t.typname, format_type(t.oid, %s),
           t.typbasetype, t.typtypmod, t.typnotnull, t.typdefault, t.typrelid
    FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE t.oid = %s
"""
_SYSTEM_SCHEMAS = ("pg_catalog", "information_schema")


class _TypeReader:
    """Resolves type OIDs of the source into :class:`TypeRef` (user types recursively)."""

    def __init__(self, cursor: psycopg2.extensions.cursor) -> None:
        self.cursor = cursor
        self._users: dict[int, UserType] = {}

    def ref(self, oid: int, typmod: int) -> TypeRef:
        self.cursor.execute(_TYPE_QUERY, (typmod, oid))
        row = self.cursor.fetchone()
        assert row is not None, f"type {oid} vanished"
        typtype, category, element, schema, name, formatted = row[:6]
        if category == "A" and element:
            inner = self.ref(element, typmod)
            return TypeRef(formatted, inner.user, True) if inner.user else TypeRef(formatted)
        if typtype in ("e", "d", "c") and schema not in _SYSTEM_SCHEMAS:
            return TypeRef(formatted, self._user(oid, name, typtype, row[6:]))
        return TypeRef(formatted)

    def _user(self, oid: int, name: str, kind: str, details: tuple[object, ...]) -> UserType:
        if oid in self._users:
            return self._users[oid]
        base_oid, base_typmod, not_null, default, relid = details
        cursor = self.cursor
        if kind == "e":
            cursor.execute("SELECT enumlabel FROM pg_enum WHERE enumtypid = %s ORDER BY enumsortorder",
                           (oid,))
            user = UserType(name, kind, enum_labels=tuple(r[0] for r in cursor.fetchall()))
        elif kind == "d":
            cursor.execute("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE contypid = %s "
                           "AND contype = 'c' ORDER BY conname", (oid,))
            checks = tuple(r[0] for r in cursor.fetchall())
            user = UserType(name, kind, base=self.ref(int(base_oid), int(base_typmod)),  # type: ignore[call-overload]
                            not_null=bool(not_null), default=default, checks=checks)  # type: ignore[arg-type]
        else:
            cursor.execute("SELECT attname, atttypid, atttypmod FROM pg_attribute WHERE attrelid = %s "
                           "AND attnum > 0 AND NOT attisdropped ORDER BY attnum", (relid,))
            attributes = [(a, int(t), int(m)) for a, t, m in cursor.fetchall()]
            user = UserType(name, kind, attributes=tuple(
                (a, self.ref(t, m)) for a, t, m in attributes))
        self._users[oid] = user
        return user


def read_column_types(conn: psycopg2.extensions.connection, tables: Sequence[TableRef]
                      ) -> dict[TableRef, dict[str, tuple[int, int]]]:
    """Per table and column: type OID and type modifier, as the source's catalog has them now
    (one query for all tables)."""
    with conn.cursor() as cursor:
        cursor.execute(
            "SELECT t.n, a.attname, a.atttypid, a.atttypmod FROM unnest(%s::text[]) "
            "WITH ORDINALITY AS t(name, n) JOIN pg_attribute a ON a.attrelid = "
            "to_regclass(t.name) AND a.attnum > 0 AND NOT a.attisdropped",
            ([_regclass(t).as_string(conn) for t in tables],))
        found: dict[TableRef, dict[str, tuple[int, int]]] = {}
        for index, name, oid, typmod in cursor.fetchall():
            found.setdefault(tables[index - 1], {})[name] = (int(oid), int(typmod))
    return found


_RELATION_KINDS = {"v": "a view", "m": "a materialized view", "f": "a foreign table",
                   "S": "a sequence", "i": "an index", "I": "a partitioned index",
                   "c": "a composite type", "t": "a TOAST table"}


def _not_a_table(table: TableRef, where: str, relkind: str) -> str:
    """Why a relation that is not an ordinary table is refused (logical replication publishes
    the changes of ordinary tables only)."""
    if relkind == "p":
        return (f"Table {table.qualified} in {where} is partitioned, and PostgreSQL publishes "
                "its changes per partition; list its partitions as tables instead (each "
                "replicates into a table of its own), so nothing was written.")
    return (f"{table.qualified} in {where} is {_RELATION_KINDS.get(relkind, 'not a table')}, "
            "whose rows logical replication does not carry (it publishes ordinary tables "
            "only), so nothing was written.")


def read_table_schema(conn: psycopg2.extensions.connection, table: TableRef, where: str,
                      options: TableOptions = NO_OPTIONS) -> TableSchema:
    """Columns and primary key of ``table``, projected by its ``options``; ``where`` names the
    database in errors."""
    with conn.cursor() as cursor:
        cursor.execute("SELECT relkind FROM pg_class WHERE oid = to_regclass(%s)",
                       (_regclass(table).as_string(conn),))
        row = cursor.fetchone()
        if row is None:
            raise SchemaError(f"Table {table.qualified} does not exist in {where}.")
        if row[0] != "r":
            raise SchemaError(_not_a_table(table, where, str(row[0])))
        relation = _regclass(table).as_string(conn)
        cursor.execute(_COLUMNS_QUERY, (relation,))
        rows = cursor.fetchall()
        types = _TypeReader(cursor)
        columns = []
        for oid, name, type_sql, base, is_array, typmod, typtype, labels, missing in rows:
            enum = typtype == "e"
            columns.append(
                Column(
                    name=name,
                    type_sql=type_sql,
                    base_type="enum" if enum else base,
                    is_array=bool(is_array),
                    type_modifier=typmod,
                    enum_name=base if enum else None,
                    enum_labels=tuple(labels or ()),
                    missing_value=missing,
                    type_ref=types.ref(oid, typmod),
                    type_oid=oid,
                )
            )
        cursor.execute(_IDENTITY_QUERY, (relation,))
        replident, primary_key, identity_index = cursor.fetchone()  # type: ignore[misc]
    conn.rollback()
    found = row_identity(str(replident), primary_key or (), identity_index or (),
                         options.inserts_only)
    if found is None:
        raise SchemaError(no_identity_refusal(table, where))
    identity, key_columns = found
    return _projected(TableSchema(table=table, columns=tuple(columns), key_columns=key_columns,
                                  identity=identity), options, where)


def _projected(schema: TableSchema, options: TableOptions, where: str) -> TableSchema:
    """The columns the options keep (the key always), the row filter and the targets."""
    names = set(schema.column_names)
    for key, listed in (("columns", options.columns or ()),
                        ("exclude_columns", options.exclude_columns)):
        unknown = [c for c in listed if c not in names]
        if unknown:
            raise SchemaError(
                f"Table {schema.table.qualified}: its {key} option names "
                f"{', '.join(unknown)}, which {where} does not have, so nothing was written.")
    excluded_keys = [c for c in options.exclude_columns if c in schema.key_columns]
    if excluded_keys:
        raise SchemaError(
            f"Table {schema.table.qualified}: its exclude_columns option names the key "
            f"column(s) {', '.join(excluded_keys)}, which are always replicated, so nothing was "
            "written.")
    kept = set(options.columns) | set(schema.key_columns) if options.columns is not None else (
        names - set(options.exclude_columns))
    return dataclasses.replace(
        schema, columns=tuple(c for c in schema.columns if c.name in kept),
        row_filter=options.where, ignored_columns=frozenset(names - kept),
        targets=options.targets)


def key_range(
    schema: TableSchema,
    after: Sequence[str | None] | None,
    through: Sequence[str | None] | None,
    type_of: Callable[[Column], sql.Composable],
    alias: str | None = None,
) -> tuple[sql.Composable, list[str | None]]:
    """``after < key <= through`` as SQL and parameters; a missing bound is open.

    Bounds are key values in their text form, cast to the key columns' types on the server,
    so every key type (infinity, BC, bytea, ...) round-trips exactly.
    """
    key = sql.SQL("ROW({})").format(sql.SQL(", ").join(
        sql.Identifier(alias, k) if alias else sql.Identifier(k) for k in schema.key_columns))
    parts: list[sql.Composable] = []
    params: list[str | None] = []
    for operator, bound in ((">", after), ("<=", through)):
        if bound is None:
            continue
        values = sql.SQL(", ").join(
            sql.SQL("%s::{}").format(type_of(schema.column(k))) for k in schema.key_columns)
        parts.append(sql.SQL("{} " + operator + " ROW({})").format(key, values))
        params.extend(bound)
    return (sql.SQL(" AND ").join(parts) if parts else sql.SQL("TRUE")), params


def user_types(schema: TableSchema) -> list[UserType]:
    """The user types a table needs, dependencies before the types that use them."""
    ordered: list[UserType] = []

    def visit(user: UserType) -> None:
        if user in ordered:
            return
        for dependency in user.dependencies():
            visit(dependency)
        ordered.append(user)

    for column in schema.columns:
        if column.type_ref is not None and column.type_ref.user is not None:
            visit(column.type_ref.user)
    return ordered
