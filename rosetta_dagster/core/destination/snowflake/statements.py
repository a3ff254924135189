"""The SQL a Snowflake destination runs, as pure functions of a table (golden-text tests, no
database); what it shares with DuckDB is in ``warehouse.statements``. Names are kept as in
PostgreSQL, double-quoted (case-sensitive in Snowflake: ``SELECT * FROM "replica"."orders"``).

Snowflake commits an open transaction at any DDL, so every table a batch uses exists before
its transaction begins: the stage tables are ordinary tables beside the target, made (or
replaced) when the table's plan is made, and emptied by each batch in its transaction. Rows
reach them as bound parameters inline (the connector's upload of large bindings would create
a stage: DDL). A batch's merge is a DELETE of the staged keys and an INSERT of the staged rows
that are not deletes, in one transaction with the position (left-out values taken from the row
at the key first): the effect of a MERGE with delete, update and insert branches, ordered by
source position because the stage holds the last change per key.

Each destination column's source type is recorded in ``_rosetta_columns`` (Snowflake cannot
change a column's type in place, and a recorded type tells a column still to be filled from a
column already filled, across a crash).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rosetta_dagster.core.destination.snowflake.types import snow_type
from rosetta_dagster.core.destination.warehouse import statements as shared
from rosetta_dagster.core.destination.warehouse.statements import (
    BACKFILL_CHUNKS,
    POSITIONS_TABLE,
    BatchStatements,
    ChunkMergeStatements,
    ResyncStatements,
    join,
    literal,
    quote,
    value_column,
)
from rosetta_dagster.core.table_schema import Column, TableSchema

COLUMNS_TABLE = "_rosetta_columns"
# A text parameter (its parser takes no ``?::VARCHAR`` inside a CAST).
TEXT_PARAMETER = "CAST(? AS VARCHAR)"


def cast(column: Column, expression: str) -> str:
    return shared.cast(snow_type, column, expression)


def create_table(schema: TableSchema, target: str) -> str:
    return shared.create_table(snow_type, schema, target)


def add_column(target: str, column: Column) -> str:
    return f"ALTER TABLE {target} ADD COLUMN {quote(column.name)} {snow_type(column).sql}"


def fill_added_column(target: str, column: Column) -> str:
    """Rows that existed take the value they read as on the source (its missing value); run
    before any batch writes the column, so a NULL there is a row that existed."""
    assert column.missing_value is not None
    name = quote(column.name)
    return (f"UPDATE {target} SET {name} = {cast(column, literal(column.missing_value))} "
            f"WHERE {name} IS NULL")


def drop_column(target: str, name: str) -> str:
    return f"ALTER TABLE {target} DROP COLUMN {quote(name)}"


@dataclass(frozen=True)
class ColumnsStatements:
    """The recorded source type of each destination column."""

    table: str  # rows: table name, column name, source type
    create: str
    read: str  # column, source type (parameter: the table's name)
    read_all: str  # table, column, source type: every table's

    def forget(self, columns: int) -> str:
        """Delete the records of ``columns`` columns (parameters: the table, the columns)."""
        return (f"DELETE FROM {self.table} WHERE table_name = ? AND column_name IN "
                f"({join(['?'] * columns)})")


def columns_statements(schema_name: str) -> ColumnsStatements:
    table = quote(schema_name, COLUMNS_TABLE)
    return ColumnsStatements(
        table=table,
        create=(f"CREATE TABLE IF NOT EXISTS {table} (table_name VARCHAR NOT NULL, "
                "column_name VARCHAR NOT NULL, source_type VARCHAR NOT NULL)"),
        read=f"SELECT column_name, source_type FROM {table} WHERE table_name = ?",
        read_all=f"SELECT table_name, column_name, source_type FROM {table}",
    )


# The catalog's rows of a schema, by its name as written (quoted: case kept; the connection
# has no current schema, whose name the emulator would report in upper case).
IN_SCHEMA = "table_schema = ?"


def in_schema(schema_name: str) -> list[str]:
    """The parameters of :data:`IN_SCHEMA`."""
    return [schema_name]


def table_columns(schema_name: str) -> tuple[str, list[str]]:
    """The destination table's columns and their types (parameters, then the table's name)."""
    return ("SELECT column_name, data_type FROM information_schema.columns WHERE "
            f"{IN_SCHEMA} AND table_name = ? ORDER BY ordinal_position", in_schema(schema_name))


def schema_columns(schema_name: str) -> tuple[str, list[str]]:
    """Every destination table's columns and their types, of one schema (parameters)."""
    return ("SELECT table_name, column_name, data_type FROM information_schema.columns WHERE "
            f"{IN_SCHEMA}", in_schema(schema_name))


def raw_columns(schema: TableSchema) -> list[str]:
    """The raw stage: the batch's text rows as bound (``warehouse.statements``' columns)."""
    width = len(schema.columns)
    return ([f"{value_column(i)} VARCHAR" for i in range(width)] + ["op VARCHAR", "keep BOOLEAN"]
            + [f"{shared.left_out_column(i)} BOOLEAN" for i in range(width)]
            + [f"{shared.from_column(j)} VARCHAR" for j in range(len(schema.key_columns))])


def insert_rows(table: str, width: int) -> str:
    """Rows bound as parameters, one ``?`` a column."""
    return f"INSERT INTO {table} VALUES ({join(['?'] * width)})"


@dataclass(frozen=True)
class StageTables:
    """The tables a plan makes before any batch (``CREATE OR REPLACE``: a new plan is a new
    schema version)."""

    create: tuple[str, ...]


def stage_tables(schema: TableSchema, stage: str, raw: str, excluded: str,
                 excluded_raw: str) -> StageTables:
    parts = shared.stage_parts(snow_type, schema, "", stage)
    keys = schema.key_columns
    return StageTables(create=(
        f"CREATE OR REPLACE TABLE {raw} ({join(raw_columns(schema))})",
        f"CREATE OR REPLACE TABLE {stage} ({join(parts.stage_columns)})",
        f"CREATE OR REPLACE TABLE {excluded_raw} "
        f"({join([f'k{i} VARCHAR' for i in range(len(keys))])})",
        f"CREATE OR REPLACE TABLE {excluded} "
        f"({join([f'{quote(k)} {snow_type(schema.column(k)).sql}' for k in keys])})",
    ))


def batch_statements(schema: TableSchema, target: str, stage: str, raw: str) -> BatchStatements:
    parts = shared.stage_parts(snow_type, schema, target, stage)
    columns = list(schema.columns)
    column_list = join([quote(c.name) for c in columns])
    merge: list[str] = []
    if parts.updates:  # left-out values of rows that stay: the row's own
        merge.append(f"UPDATE {stage} AS s SET "
                     + join(parts.updates)
                     + f" FROM {target} AS t WHERE {parts.match} AND s.op <> 'd'")
    merge.append(f"DELETE FROM {target} AS t WHERE EXISTS (SELECT 1 FROM {stage} AS s "
                 f"WHERE {parts.match})")
    merge.append(f"INSERT INTO {target} ({column_list}) SELECT "
                 f"{join([f's.{quote(c.name)}' for c in columns])} FROM {stage} AS s "
                 "WHERE s.op <> 'd'")
    return BatchStatements(
        create_stage=None,
        fill_stage=f"INSERT INTO {stage} SELECT {join(parts.fill_values)} FROM {raw}",
        resolve_from_old_key=parts.resolve_from_old_key,
        unresolved_rows=parts.unresolved_rows,
        merge=tuple(merge),
        clear_stage=f"DELETE FROM {stage}",
    )


def resync_statements(schema: TableSchema, target: str, stage: str, keys_table: str
                      ) -> ResyncStatements:
    return shared.resync_statements(snow_type, schema, target, stage, keys_table)


def positions_statements(schema_name: str) -> tuple[str, str]:
    """The positions table (one row per pipeline) and its creation."""
    table = quote(schema_name, POSITIONS_TABLE)
    return table, (f"CREATE TABLE IF NOT EXISTS {table} (pipeline VARCHAR NOT NULL, "
                   "slot_name VARCHAR NOT NULL, position NUMBER(20, 0) NOT NULL, "
                   "loads VARCHAR NOT NULL, updated_at TIMESTAMP_TZ)")


def chunks_statements(schema_name: str) -> tuple[str, str]:
    table = quote(schema_name, BACKFILL_CHUNKS)
    return table, (f"CREATE TABLE IF NOT EXISTS {table} (job NUMBER(19, 0) NOT NULL, "
                   "chunk NUMBER(10, 0) NOT NULL)")


def row_select(schema: TableSchema, relation: str, *, after: bool, through: bool,
               limit: int | None) -> str:
    return shared.row_select(snow_type, schema, relation, after=after, through=through,
                             limit=limit, text_parameter=TEXT_PARAMETER)


def bound_parameters(after: Sequence[str | None] | None, through: Sequence[str | None] | None
                     ) -> list[str | None]:
    """The bounds' key text in the order the chunk's ``?`` use them (the lexicographic form
    names the first columns again in each term)."""
    params: list[str | None] = []
    for bound in (after, through):
        if bound is not None:
            for i in range(len(bound)):
                params.extend(bound[:i + 1])
    return params


def chunk_merge_statements(schema: TableSchema, target: str, chunk_table: str,
                           excluded_table: str, excluded_raw: str, *, after: bool,
                           through: bool) -> ChunkMergeStatements:
    """The chunk is a table the job staged (typed); the keys the stream changed meanwhile go
    from ``excluded_raw`` (text) to ``excluded_table``."""
    parts = shared.chunk_merge_parts(snow_type, schema, target, chunk_table, excluded_table,
                                     after=after, through=through,
                                     parameter=lambda _: TEXT_PARAMETER)
    keys = list(schema.key_columns)
    return ChunkMergeStatements(
        create_chunk=None,
        fill_chunk=None,
        create_excluded=None,
        fill_excluded=(f"INSERT INTO {excluded_table} SELECT "
                       f"{join([cast(schema.column(k), f'k{i}') for i, k in enumerate(keys)])} "
                       f"FROM {excluded_raw}"),
        delete=f"DELETE FROM {target} AS t WHERE {parts.delete_where}",
        update=parts.update,
        insert=parts.insert,
        clear=(f"DELETE FROM {excluded_table}",),
    )


def copy_into(table: str, stage_path: str) -> str:
    """A staged CSV file of text fields into ``table`` (all VARCHAR): a NULL is told by its own
    flag field and every value starts with ``v`` (see ``load``), so no CSV convention about
    empty fields or NULL words matters."""
    return (f"COPY INTO {table} FROM {stage_path} FILE_FORMAT = (TYPE = CSV "
            "FIELD_OPTIONALLY_ENCLOSED_BY = '\"' ESCAPE_UNENCLOSED_FIELD = NONE "
            "EMPTY_FIELD_AS_NULL = FALSE) PURGE = TRUE")


def insert_loaded(schema: TableSchema, target: str, loaded: str) -> str:
    """Loaded text rows (``n0, c0, n1, c1...``: a NULL flag, then the value) into ``target``."""
    values = []
    for i, column in enumerate(schema.columns):
        # After the leading v; the cast of the CASE (not a CASE of casts: a vectorised engine
        # casts every row's value, a NULL one too).
        values.append(cast(column, f"CASE WHEN n{i} = 't' THEN NULL ELSE SUBSTR(c{i}, 2) END"))
    names = join([quote(c.name) for c in schema.columns])
    return f"INSERT INTO {target} ({names}) SELECT {join(values)} FROM {loaded}"


def loaded_columns(schema: TableSchema) -> list[str]:
    return [f"{kind}{i} VARCHAR" for i in range(len(schema.columns)) for kind in ("n", "c")]


NUMBERS_TABLE = "_rosetta_numbers"


@dataclass(frozen=True)
class KeylessStatements:
    """A batch of a table without a key (see ``keyless_changes``): each distinct row staged
    once with its net count (``ord``: its place). Snowflake has no row identity a DELETE could
    name, so a row with a negative count has all its equal rows counted (``existing``) and
    deleted, then ``existing + count`` copies inserted again; a row with a positive count gets
    ``count`` copies (copies: a join with a table of the numbers 1..n). Equal: NULL-safe in
    every column, which for a family kept as text is its text."""

    create: tuple[str, ...]  # before any batch: raw rows, stage, numbers
    numbers: str
    fill_stage: str
    count_existing: str
    most_copies: str  # the numbers the insert needs
    delete: str
    insert: str
    clear_stage: str


def keyless_statements(schema: TableSchema, target: str, stage: str, raw: str,
                       numbers: str) -> KeylessStatements:
    columns = list(schema.columns)
    names = [quote(c.name) for c in columns]
    equal = " AND ".join(f"t.{n} IS NOT DISTINCT FROM s.{n}" for n in names)
    copies = "CASE WHEN s.count < 0 THEN GREATEST(s.existing + s.count, 0) ELSE s.count END"
    return KeylessStatements(
        create=(
            f"CREATE OR REPLACE TABLE {raw} ("
            + join([f"{value_column(i)} VARCHAR" for i in range(len(columns))])
            + ", ord NUMBER(10, 0), count NUMBER(19, 0))",
            f"CREATE OR REPLACE TABLE {stage} ("
            + join([f"{quote(c.name)} {snow_type(c).sql}" for c in columns])
            + ", ord NUMBER(10, 0), count NUMBER(19, 0), existing NUMBER(19, 0))",
            f"CREATE TABLE IF NOT EXISTS {numbers} (n NUMBER(19, 0) NOT NULL)",
        ),
        numbers=numbers,
        fill_stage=(f"INSERT INTO {stage} SELECT "
                    + join([cast(c, value_column(i)) for i, c in enumerate(columns)])
                    + f", ord, count, 0 FROM {raw}"),
        count_existing=(f"UPDATE {stage} AS s SET existing = x.n FROM (SELECT s.ord, count(*) "
                        f"AS n FROM {stage} AS s JOIN {target} AS t ON {equal} "
                        "WHERE s.count < 0 GROUP BY s.ord) AS x WHERE s.ord = x.ord"),
        most_copies=f"SELECT COALESCE(MAX({copies}), 0), (SELECT COALESCE(MAX(n), 0) FROM "
                    f"{numbers}) FROM {stage} AS s",
        delete=(f"DELETE FROM {target} AS t WHERE EXISTS (SELECT 1 FROM {stage} AS s "
                f"WHERE s.count < 0 AND {equal})"),
        insert=(f"INSERT INTO {target} ({join(names)}) SELECT "
                + join([f"s.{n}" for n in names])
                # DISTINCT: pipelines writing one schema share the numbers table.
                + f" FROM {stage} AS s JOIN (SELECT DISTINCT n FROM {numbers}) AS k "
                f"ON k.n <= {copies}"),
        clear_stage=f"DELETE FROM {stage}",
    )
