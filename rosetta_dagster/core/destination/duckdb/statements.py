"""The SQL a DuckDB destination runs, as pure functions of a table (golden-text tests, no
database). Identifiers are double-quoted here (:func:`quote`); values are always parameters
(``?``) or come from the staged batch, never formatted into the text.

A batch's net changes arrive as a pandas DataFrame of PostgreSQL text, registered as
``batch`` (its columns: ``warehouse.statements``), plus:

* ``op``: ``d`` (delete) or ``u`` (insert or update);
* ``l0..lN``: the column's value was left out (unchanged TOAST): the row keeps its value;
* ``keep`` and ``f0..fK``: where left-out values come from: the destination row at the key
  itself, then the destination row at the old key ``f0..fK`` of a moved row.

They are cast into a temporary *stage* of the table's DuckDB types; left-out values are
resolved in the stage (:attr:`BatchStatements.resolve_from_old_key`, then values read back from
the source); then one ``MERGE`` deletes, updates and inserts. The position row is updated in
the same transaction.
"""

from __future__ import annotations

from dataclasses import dataclass

from rosetta_dagster.core.destination.duckdb.types import duck_type
from rosetta_dagster.core.destination.warehouse import statements as shared
from rosetta_dagster.core.destination.warehouse.statements import (
    BACKFILL_CHUNKS,
    BatchStatements,
    ChunkMergeStatements,
    ResyncStatements,
    join,
    literal,
    quote,
    value_column,
)
from rosetta_dagster.core.table_schema import Column, TableSchema

__all__ = ["BACKFILL_CHUNKS", "BatchStatements", "ChunkMergeStatements", "ResyncStatements",
           "literal", "quote"]


def cast(column: Column, expression: str) -> str:
    """A PostgreSQL text value (``expression``, a VARCHAR) as the column's DuckDB type."""
    return shared.cast(duck_type, column, expression)


def create_table(schema: TableSchema, target: str) -> str:
    return shared.create_table(duck_type, schema, target)


def add_column(target: str, column: Column) -> str:
    """A column added on the source: rows that existed take the value they read as on the
    source (its missing value, as a literal: DDL)."""
    statement = f"ALTER TABLE {target} ADD COLUMN {quote(column.name)} {duck_type(column).sql}"
    if column.missing_value is None:
        return statement
    return f"{statement} DEFAULT {cast(column, literal(column.missing_value))}"


def drop_default(target: str, column: Column) -> str:
    return f"ALTER TABLE {target} ALTER COLUMN {quote(column.name)} DROP DEFAULT"


def retype_column(target: str, column: Column) -> str:
    """A column whose source type changed takes the DuckDB type of its new family (the same
    type: its values stay until the caller copies the rows again); a value the cast cannot
    take is NULL until then."""
    name = quote(column.name)
    wanted = duck_type(column).sql
    return (f"ALTER TABLE {target} ALTER COLUMN {name} SET DATA TYPE {wanted} "
            f"USING TRY_CAST({name} AS {wanted})")


def batch_statements(schema: TableSchema, target: str, stage: str) -> BatchStatements:
    """A temporary stage (the connection is let go between batches: made in each batch's
    transaction) filled from the DataFrame ``batch``; one ``MERGE``."""
    parts = shared.stage_parts(duck_type, schema, target, stage)
    columns = list(schema.columns)
    when_matched_update = (f"WHEN MATCHED THEN UPDATE SET {join(parts.updates)}" if parts.updates
                           else "WHEN MATCHED THEN DO NOTHING")
    column_list = join([quote(c.name) for c in columns])
    return BatchStatements(
        create_stage=f"CREATE TEMP TABLE IF NOT EXISTS {stage} ({join(parts.stage_columns)})",
        fill_stage=f"INSERT INTO {stage} SELECT {join(parts.fill_values)} FROM batch",
        resolve_from_old_key=parts.resolve_from_old_key,
        unresolved_rows=parts.unresolved_rows,
        merge=(f"MERGE INTO {target} AS t USING {stage} AS s ON ({parts.match}) "
               f"WHEN MATCHED AND s.op = 'd' THEN DELETE {when_matched_update} "
               f"WHEN NOT MATCHED AND s.op <> 'd' THEN INSERT ({column_list}) "
               f"VALUES ({join([f's.{quote(c.name)}' for c in columns])})",),
        clear_stage=f"DELETE FROM {stage}",
    )


def resync_statements(schema: TableSchema, target: str, stage: str, keys_table: str
                      ) -> ResyncStatements:
    return shared.resync_statements(duck_type, schema, target, stage, keys_table)


def positions_statements(catalog: str, schema_name: str) -> tuple[str, str]:
    """The positions table (one row per pipeline) and its creation."""
    table = quote(catalog, schema_name, shared.POSITIONS_TABLE)
    return table, (f"CREATE TABLE IF NOT EXISTS {table} (pipeline VARCHAR PRIMARY KEY, "
                   "slot_name VARCHAR NOT NULL, position UBIGINT NOT NULL, loads VARCHAR NOT NULL, "
                   "updated_at TIMESTAMPTZ NOT NULL DEFAULT now())")


def row_select(schema: TableSchema, relation: str, *, after: bool, through: bool,
               limit: int | None) -> str:
    return shared.row_select(duck_type, schema, relation, after=after, through=through,
                             limit=limit)


def chunk_merge_statements(schema: TableSchema, target: str, chunk_table: str,
                           excluded_table: str, *, after: bool, through: bool
                           ) -> ChunkMergeStatements:
    """The chunk from its spooled CSV into a temporary table; bounds as numbered parameters
    (the lexicographic form uses each more than once)."""
    parts = shared.chunk_merge_parts(duck_type, schema, target, chunk_table, excluded_table,
                                     after=after, through=through,
                                     parameter=lambda number: f"${number}::VARCHAR")
    keys = list(schema.key_columns)
    names = [f"k{i}" for i in range(len(keys))]
    key_columns = [f"{quote(k)} {duck_type(schema.column(k)).sql}" for k in keys]
    return ChunkMergeStatements(
        create_chunk=(f"CREATE OR REPLACE TEMP TABLE {chunk_table} ("
                      f"{join([f'{quote(c.name)} {duck_type(c).sql}' for c in schema.columns])})"),
        fill_chunk=csv_insert(schema, chunk_table),
        create_excluded=f"CREATE OR REPLACE TEMP TABLE {excluded_table} ({join(key_columns)})",
        fill_excluded=(f"INSERT INTO {excluded_table} SELECT "
                       f"{join([cast(schema.column(k), n) for k, n in zip(keys, names, strict=True)])} "
                       "FROM excluded_keys"),
        delete=f"DELETE FROM {target} AS t WHERE {parts.delete_where}",
        update=parts.update,
        insert=parts.insert,
        clear=(),
    )


# Large enough for any value PostgreSQL can hold in a row (1 GB fields).
_MAX_LINE_BYTES = 1 << 30


def csv_insert(schema: TableSchema, target: str) -> str:
    """``INSERT`` of a spooled CSV of the source's rows (every value its PostgreSQL text;
    NULL unquoted, '' quoted; the file's path as the parameter) into ``target``."""
    names = [f"c{i}" for i in range(len(schema.columns))]
    columns = "{" + ", ".join(f"'{name}': 'VARCHAR'" for name in names) + "}"
    values = ", ".join(cast(column, name) for column, name in zip(schema.columns, names,
                                                                  strict=True))
    return (f"INSERT INTO {target} SELECT {values} FROM read_csv(?, columns = {columns}, "
            "header = false, delim = ',', quote = '\"', escape = '\"', nullstr = '', "
            "allow_quoted_nulls = false, auto_detect = false, parallel = false, "
            f"max_line_size = {_MAX_LINE_BYTES}, buffer_size = {2 * _MAX_LINE_BYTES})")


@dataclass(frozen=True)
class KeylessStatements:
    """A batch of a table without a key (see ``keyless_changes``): each distinct row staged
    once with its net count (``ord``: its place in the stage); ``delete`` removes that many
    equal destination rows per row of negative count (equal: NULL-safe in every column, which
    for a family kept as text is its text), ``insert`` adds that many copies of each row of
    positive count."""

    create_stage: str
    fill_stage: str  # from the DataFrame registered as ``batch`` (c0..cN text, ord, count)
    delete: str
    insert: str
    clear_stage: str


def keyless_statements(schema: TableSchema, target: str, stage: str) -> KeylessStatements:
    columns = list(schema.columns)
    names = [quote(c.name) for c in columns]
    equal = " AND ".join(f"t.{n} IS NOT DISTINCT FROM s.{n}" for n in names)
    return KeylessStatements(
        create_stage=(f"CREATE TEMP TABLE IF NOT EXISTS {stage} ("
                      f"{join([f'{quote(c.name)} {duck_type(c).sql}' for c in columns])}, "
                      "ord INTEGER, count INTEGER)"),
        fill_stage=(f"INSERT INTO {stage} SELECT "
                    f"{join([cast(c, value_column(i)) for i, c in enumerate(columns)])}, "
                    "ord, count FROM batch"),
        delete=(f"DELETE FROM {target} WHERE rowid IN (SELECT row_id FROM (SELECT t.rowid AS "
                "row_id, s.count AS wanted, row_number() OVER (PARTITION BY s.ord ORDER BY "
                f"t.rowid) AS n FROM {target} AS t JOIN {stage} AS s ON {equal} "
                "WHERE s.count < 0) WHERE n <= -wanted)"),
        insert=(f"INSERT INTO {target} ({join(names)}) SELECT {join(names)} FROM (SELECT "
                f"{join(names)}, unnest(range(count)) FROM {stage} WHERE count > 0)"),
        clear_stage=f"DELETE FROM {stage}",
    )
