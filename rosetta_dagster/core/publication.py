"""The pipeline's publication: which tables the source sends, and per table the column list
and row filter its options ask for (PostgreSQL 15+).

PostgreSQL judges a row filter itself (no user-defined or mutable functions, columns that
exist) when a publication is created; each table's options are tried on a probe publication
inside a savepoint that is rolled back, so a refusal names the table and nothing is created.
What PostgreSQL only refuses later, on the source's own writes (a filter or column list that
does not cover the replica identity makes every UPDATE and DELETE of the table fail), is
checked here first.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from rosetta_dagster.core.pipeline_config import PipelineDefinition, TableRef
from rosetta_dagster.core.table_schema import RowIdentity, SchemaError, TableSchema

# Column lists and row filters in publications: PostgreSQL 15.
OPTIONS_SERVER_VERSION = 150000
_FILTER_COLUMN = re.compile(r":varattno (\d+)")


@dataclass(frozen=True)
class TableDefinition:
    """What the publication sends of one table, as PostgreSQL reports it."""

    columns: tuple[str, ...]
    row_filter: str | None


def server_version(conn: psycopg2.extensions.connection) -> int:
    return int(conn.server_version)


@contextmanager
def _transaction(conn: psycopg2.extensions.connection, *, commit: bool) -> Iterator[
        psycopg2.extensions.cursor]:
    """One transaction on ``conn`` (autocommit or not), committed or rolled back at the end."""
    autocommit = conn.autocommit
    conn.autocommit = False
    try:
        with conn.cursor() as cursor:
            yield cursor
        if commit:
            conn.commit()
        else:
            conn.rollback()
    except BaseException:
        conn.rollback()
        raise
    finally:
        conn.autocommit = autocommit


def _table_clause(schema: TableSchema) -> sql.Composed:
    parts: list[sql.Composable] = [schema.source_sql]
    if schema.ignored_columns:  # a column list only when the options leave columns out
        parts.append(sql.SQL("({})").format(
            sql.SQL(", ").join(sql.Identifier(c) for c in schema.column_names)))
    if schema.row_filter is not None:
        parts.append(sql.SQL("WHERE {}").format(schema.source_filter))
    return sql.Composed(parts).join(" ")


def _definitions(cursor: psycopg2.extensions.cursor, publication: str
                 ) -> dict[TableRef, TableDefinition]:
    cursor.execute("SELECT schemaname, tablename, attnames::text[], rowfilter "
                   "FROM pg_publication_tables "
                   "WHERE pubname = %s", (publication,))
    return {TableRef(s, t): TableDefinition(tuple(columns or ()), row_filter)
            for s, t, columns, row_filter in cursor.fetchall()}


def _identity(cursor: psycopg2.extensions.cursor, schema: TableSchema) -> tuple[str, list[str]]:
    """The table's replica identity kind (d, i, f, n) and its columns (all of them for f)."""
    cursor.execute(
        """
        SELECT c.relreplident,
               CASE WHEN c.relreplident = 'f' THEN
                   (SELECT array_agg(a.attname ORDER BY a.attnum) FROM pg_attribute a
                    WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped)
               ELSE
                   (SELECT array_agg(a.attname ORDER BY a.attnum) FROM pg_index i
                    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
                    WHERE i.indrelid = c.oid AND ((c.relreplident = 'd' AND i.indisprimary)
                                                  OR (c.relreplident = 'i' AND i.indisreplident)))
               END
        FROM pg_class c WHERE c.oid = %s::regclass
        """, (schema.source_sql.as_string(cursor),))
    kind, columns = cursor.fetchone()  # type: ignore[misc]
    return str(kind), list(columns or ())


def _filter_columns(cursor: psycopg2.extensions.cursor, publication: str,
                    schema: TableSchema) -> list[str]:
    """The columns a row filter reads (from the expression PostgreSQL stored)."""
    cursor.execute(
        "SELECT r.prqual::text FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid "
        "WHERE p.pubname = %s AND r.prrelid = %s::regclass",
        (publication, schema.source_sql.as_string(cursor)))
    row = cursor.fetchone()
    attnums = sorted({int(n) for n in _FILTER_COLUMN.findall(row[0] or "")}) if row else []
    if not attnums:
        return []
    cursor.execute("SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass "
                   "AND attnum = ANY(%s) ORDER BY attnum",
                   (schema.source_sql.as_string(cursor), attnums))
    return [r[0] for r in cursor.fetchall()]


def _refusal(schema: TableSchema, kind: str, identity: list[str], filter_columns: list[str]
             ) -> str | None:
    """Why PostgreSQL would refuse the table's UPDATEs and DELETEs under these options."""
    described = "FULL: every column" if kind == "f" else ", ".join(identity) or "none"
    outside = [c for c in filter_columns if c not in identity]
    if schema.row_filter is not None and kind != "f" and outside:
        return (f"its where option reads {', '.join(outside)}, which the table's replica "
                f"identity ({described}) does not cover, so PostgreSQL would refuse every UPDATE "
                "and DELETE of the table; filter on identity columns or widen the replica "
                "identity (ALTER TABLE ... REPLICA IDENTITY)")
    left_out = [c for c in identity if c in schema.ignored_columns]
    if left_out:
        return (f"its column list leaves out {', '.join(left_out)}, which belong to the table's "
                f"replica identity ({described}), so PostgreSQL would refuse every UPDATE and "
                "DELETE of the table; keep those columns")
    if kind == "n" and schema.row_filter is not None:
        return ("the table has REPLICA IDENTITY NOTHING, so PostgreSQL would refuse every "
                "UPDATE and DELETE of a table with a row filter")
    return None


def _desired(cursor: psycopg2.extensions.cursor, pipeline: PipelineDefinition,
             schema: TableSchema) -> TableDefinition:
    """Try the table's options on a probe publication (rolled back): PostgreSQL's verdict on
    the filter, the identity checks, and the definition it would report."""
    probe = f"_rosetta_probe_{pipeline.name}"
    source = pipeline.source.name
    inserts_only = schema.identity is RowIdentity.INSERTS_ONLY
    cursor.execute("SAVEPOINT rosetta_probe")
    try:
        try:
            cursor.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE {}{}").format(
                sql.Identifier(probe), _table_clause(schema),
                _INSERTS_ONLY if inserts_only else sql.SQL("")), ())  # () : see replicated_rows
        except psycopg2.Error as exc:
            diag = exc.diag
            reason = (diag.message_primary or str(exc).strip()).rstrip(".")
            detail = f" ({diag.message_detail.rstrip('.')})" if diag.message_detail else ""
            raise SchemaError(
                f"Table {schema.table.qualified}: source {source} refuses its options "
                f"({reason}{detail}), so nothing was written.") from None
        kind, identity = _identity(cursor, schema)
        refusal = None if inserts_only else _refusal(schema, kind, identity,
                                                      _filter_columns(cursor, probe, schema))
        if refusal is not None:
            raise SchemaError(f"Table {schema.table.qualified}: {refusal}, so nothing was "
                              "written.")
        return _definitions(cursor, probe)[schema.table]
    finally:
        cursor.execute("ROLLBACK TO SAVEPOINT rosetta_probe")


def _refuse_old_server(conn: psycopg2.extensions.connection, pipeline: PipelineDefinition
                       ) -> None:
    users = [t.qualified for t, o in pipeline.table_options if o.filters_rows_or_columns]
    if users and server_version(conn) < OPTIONS_SERVER_VERSION:
        raise SchemaError(
            f"Pipeline {pipeline.name} gives {', '.join(users)} column lists or row filters, "
            f"which need PostgreSQL 15 or newer on source {pipeline.source.name} (it runs "
            f"{conn.server_version // 10000}), so nothing was written.")


def ensure_publication(
    conn: psycopg2.extensions.connection,
    pipeline: PipelineDefinition,
    schemas: Mapping[TableRef, TableSchema],
    log: Callable[[str], None],
    before_commit: Callable[[Sequence[TableRef]], None] = lambda changed: None,
) -> list[TableRef]:
    """Create the publication, or set its tables, column lists and row filters to the
    pipeline's (tables that replicate inserts only: in a second publication that publishes
    inserts only). Returns the tables already published whose column list or filter changed;
    ``before_commit`` is called with them before the change commits (so a crash cannot leave
    a changed publication without the repair it needs)."""
    _refuse_old_server(conn, pipeline)
    tables = [schemas[t] for t in pipeline.tables]
    every_change = [s for s in tables if s.identity is not RowIdentity.INSERTS_ONLY]
    inserts = [s for s in tables if s.identity is RowIdentity.INSERTS_ONLY]
    with _transaction(conn, commit=True) as cursor:
        changed: list[TableRef] = []
        if server_version(conn) >= OPTIONS_SERVER_VERSION:
            current = {**_definitions(cursor, pipeline.publication_name),
                       **_definitions(cursor, pipeline.inserts_publication_name)}
            for schema in tables:
                wanted = _desired(cursor, pipeline, schema)
                if schema.table in current and current[schema.table] != wanted:
                    changed.append(schema.table)
        created = _set_tables(cursor, pipeline.publication_name, every_change, inserts_only=False)
        if inserts:
            _set_tables(cursor, pipeline.inserts_publication_name, inserts, inserts_only=True)
        else:
            cursor.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(
                sql.Identifier(pipeline.inserts_publication_name)))
        _name_the_list(cursor, pipeline, wanted=bool(inserts))
        if changed:
            before_commit(changed)
    if created:
        log(f"Created publication {pipeline.publication_name}")
    return changed


_INSERTS_ONLY = sql.SQL(" WITH (publish = 'insert')")


def _name_the_list(cursor: psycopg2.extensions.cursor, pipeline: PipelineDefinition, *,
                   wanted: bool) -> None:
    """Debezium reads one publication (``publication.name``): it checks that a publication of
    that name exists, then hands the name to pgoutput, which reads it as a comma-separated
    list. A pipeline with tables that replicate inserts only reads two, so it gets an empty
    publication named after the list of both (``rosetta_<p>,rosetta_<p>_inserts``)."""
    listed = sql.Identifier(f"{pipeline.publication_name},{pipeline.inserts_publication_name}")
    if wanted and pipeline.settings.engine == "debezium":
        cursor.execute("SELECT 1 FROM pg_publication WHERE pubname = %s",
                       (pipeline.publication_names,))
        if cursor.fetchone() is None:
            cursor.execute(sql.SQL("CREATE PUBLICATION {}").format(listed))
    else:
        cursor.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(listed))


def _set_tables(cursor: psycopg2.extensions.cursor, name: str, tables: Sequence[TableSchema], *,
                inserts_only: bool) -> bool:
    """Create publication ``name`` with ``tables``, or set its tables to them; True when it
    was created."""
    publication = sql.Identifier(name)
    publish = _INSERTS_ONLY if inserts_only else sql.SQL("")
    cursor.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (name,))
    exists = cursor.fetchone() is not None
    if tables:
        clauses = sql.SQL(", ").join(_table_clause(s) for s in tables)
        cursor.execute(sql.SQL("ALTER PUBLICATION {} SET TABLE {}" if exists else
                               "CREATE PUBLICATION {} FOR TABLE {}{}").format(
            publication, clauses, publish), ())  # () : see replicated_rows
    elif not exists:
        cursor.execute(sql.SQL("CREATE PUBLICATION {}{}").format(publication, publish))
    else:  # no table any more: SET TABLE needs one
        current = list(_definitions(cursor, name))
        if current:
            cursor.execute(sql.SQL("ALTER PUBLICATION {} DROP TABLE {}").format(
                publication, sql.SQL(", ").join(sql.Identifier(t.schema, t.name)
                                                for t in current)))
    return not exists


def publication_current(conn: psycopg2.extensions.connection, pipeline: PipelineDefinition,
                        schema: TableSchema) -> bool:
    """Whether the publication already sends ``schema``'s table as its options ask (the
    stream applies changed options when it starts)."""
    if server_version(conn) < OPTIONS_SERVER_VERSION:
        return True
    name = (pipeline.inserts_publication_name if schema.identity is RowIdentity.INSERTS_ONLY
            else pipeline.publication_name)
    with _transaction(conn, commit=False) as cursor:
        current = _definitions(cursor, name).get(schema.table)
        return current == _desired(cursor, pipeline, schema)
