"""The SQL a DuckDB destination runs, as pure functions of a table (golden-text tests, no
database). Identifiers are double-quoted here (:func:`quote`); values are always parameters
(``?``) or come from the staged batch, never formatted into the text.

A batch's net changes (one per key, see ``net_changes``) arrive as a pandas DataFrame of
PostgreSQL text (columns ``c0..cN`` by position, so a user's column name never meets pandas),
plus:

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

from collections.abc import Sequence
from dataclasses import dataclass

from rosetta_dagster.core.destination.duckdb.types import duck_type
from rosetta_dagster.core.table_schema import Column, TableSchema

POSITIONS_TABLE = "_rosetta_positions"


def quote(*names: str) -> str:
    """A (qualified) identifier, double-quoted: ``"catalog"."schema"."name"`` (a table is
    always named with its catalog, the database file's: a schema may have the same name)."""
    return ".".join('"' + name.replace('"', '""') + '"' for name in names)


def _join(parts: Sequence[str], separator: str = ", ") -> str:
    return separator.join(parts)


def value_column(position: int) -> str:
    return f"c{position}"


def left_out_column(position: int) -> str:
    return f"l{position}"


def from_column(position: int) -> str:
    return f"f{position}"


def cast(column: Column, expression: str) -> str:
    """A PostgreSQL text value (``expression``, a VARCHAR) as the column's DuckDB type."""
    return duck_type(column).cast.format(expression)


def create_table(schema: TableSchema, target: str) -> str:
    """The destination table, columns in the source's order. No PRIMARY KEY: DuckDB checks a
    unique index eagerly within a transaction (a key deleted and inserted again by one batch
    would be refused), and the MERGE keeps keys unique by construction."""
    columns = [f"{quote(c.name)} {duck_type(c).sql}" for c in schema.columns]
    return f"CREATE TABLE IF NOT EXISTS {target} ({_join(columns)})"


def literal(text: str) -> str:
    """A string literal, for DDL (DuckDB takes no parameters there): quotes doubled."""
    return "'" + text.replace("'", "''") + "'"


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


@dataclass(frozen=True)
class BatchStatements:
    """Everything that stages and merges one table's batch, built once per schema version."""

    create_stage: str
    fill_stage: str  # from the DataFrame registered as ``batch``
    resolve_from_old_key: str
    unresolved_rows: str  # the key (as stored) and the left-out flags of each
    merge: str
    clear_stage: str


def batch_statements(schema: TableSchema, target: str, stage: str) -> BatchStatements:
    keys = schema.key_columns
    columns = list(schema.columns)
    position = {c.name: i for i, c in enumerate(columns)}
    lefts = [left_out_column(i) for i in range(len(columns))]
    froms = [from_column(i) for i in range(len(keys))]
    stage_columns = ([f"{quote(c.name)} {duck_type(c).sql}" for c in columns]
                     + ["op VARCHAR", "keep BOOLEAN"] + [f"{name} BOOLEAN" for name in lefts]
                     + [f"{name} {duck_type(schema.column(k)).sql}"
                        for name, k in zip(froms, keys, strict=True)])
    fill_values = ([cast(c, value_column(i)) for i, c in enumerate(columns)] + ["op", "keep"]
                   + lefts + [cast(schema.column(k), name)
                              for name, k in zip(froms, keys, strict=True)])
    match = _join([f"t.{quote(k)} = s.{quote(k)}" for k in keys], " AND ")
    any_left_out = _join([f"s.{name}" for name in lefts], " OR ")
    kept = f"s.keep AND EXISTS (SELECT 1 FROM {target} AS t WHERE {match})"
    pending = f"s.op <> 'd' AND ({any_left_out}) AND NOT ({kept})"
    non_key = [c for c in columns if c.name not in keys]
    from_match = _join([f"o.{quote(k)} = s.{f}" for k, f in zip(keys, froms, strict=True)],
                       " AND ")
    resolve_sets = ([f"{quote(c.name)} = CASE WHEN s.{left_out_column(position[c.name])} "
                     f"THEN o.{quote(c.name)} ELSE s.{quote(c.name)} END" for c in non_key]
                    + [f"{name} = FALSE" for name in lefts])
    updates = [f"{quote(c.name)} = CASE WHEN s.{left_out_column(position[c.name])} "
               f"THEN t.{quote(c.name)} ELSE s.{quote(c.name)} END" for c in non_key]
    when_matched_update = (f"WHEN MATCHED THEN UPDATE SET {_join(updates)}" if updates
                           else "WHEN MATCHED THEN DO NOTHING")
    column_list = _join([quote(c.name) for c in columns])
    return BatchStatements(
        create_stage=f"CREATE TEMP TABLE IF NOT EXISTS {stage} ({_join(stage_columns)})",
        fill_stage=f"INSERT INTO {stage} SELECT {_join(fill_values)} FROM batch",
        resolve_from_old_key=(
            f"UPDATE {stage} AS s SET {_join(resolve_sets)} FROM {target} AS o "
            f"WHERE {from_match} AND {pending}"),
        unresolved_rows=(f"SELECT {_join([f's.{quote(k)}' for k in keys])}, "
                         f"{_join([f's.{name}' for name in lefts])} FROM {stage} AS s "
                         f"WHERE {pending}"),
        merge=(f"MERGE INTO {target} AS t USING {stage} AS s ON ({match}) "
               f"WHEN MATCHED AND s.op = 'd' THEN DELETE {when_matched_update} "
               f"WHEN NOT MATCHED AND s.op <> 'd' THEN INSERT ({column_list}) "
               f"VALUES ({_join([f's.{quote(c.name)}' for c in columns])})"),
        clear_stage=f"DELETE FROM {stage}",
    )


def key_condition(schema: TableSchema, alias: str | None = None) -> str:
    """``k1 = <cast of ?> AND ...``: a row by its key, given as PostgreSQL text parameters."""
    prefix = f"{alias}." if alias else ""
    return _join([f"{prefix}{quote(k)} = {cast(schema.column(k), '?::VARCHAR')}"
                  for k in schema.key_columns], " AND ")


def fill_left_out(schema: TableSchema, stage: str, columns: Sequence[str]) -> str:
    """Set a staged row's left-out ``columns`` to values read from the source (text
    parameters, then the key's); the row then leaves nothing out."""
    sets = [f"{quote(name)} = {cast(schema.column(name), '?::VARCHAR')}" for name in columns]
    sets += [f"{left_out_column(i)} = FALSE" for i in range(len(schema.columns))]
    return f"UPDATE {stage} SET {_join(sets)} WHERE {key_condition(schema)}"


def delete_staged(schema: TableSchema, stage: str) -> str:
    """Make a staged row a delete of its key (key parameters): its row is gone from the
    source, whose own delete follows."""
    clear = _join([f"{left_out_column(i)} = FALSE" for i in range(len(schema.columns))])
    return f"UPDATE {stage} SET op = 'd', {clear} WHERE {key_condition(schema)}"


@dataclass(frozen=True)
class ResyncStatements:
    """A re-snapshot through the engine (``initial_load: debezium``): the keys it writes are
    recorded in a table beside the target (kept across a crash), and at its end the rows whose
    key it did not write (deleted on the source meanwhile) are deleted."""

    create_keys: str
    clear_keys: str
    record_keys: str  # from the batch's stage, before it is cleared
    delete_unrecorded: str
    drop_keys: str


def resync_statements(schema: TableSchema, target: str, stage: str, keys_table: str
                      ) -> ResyncStatements:
    keys = schema.key_columns
    key_list = _join([quote(k) for k in keys])
    match = _join([f"k.{quote(k)} = t.{quote(k)}" for k in keys], " AND ")
    return ResyncStatements(
        create_keys=(f"CREATE TABLE IF NOT EXISTS {keys_table} ("
                     + _join([f"{quote(k)} {duck_type(schema.column(k)).sql}" for k in keys])
                     + ")"),
        clear_keys=f"DELETE FROM {keys_table}",
        record_keys=f"INSERT INTO {keys_table} SELECT {key_list} FROM {stage} WHERE op <> 'd'",
        delete_unrecorded=(f"DELETE FROM {target} AS t WHERE NOT EXISTS "
                           f"(SELECT 1 FROM {keys_table} AS k WHERE {match})"),
        drop_keys=f"DROP TABLE IF EXISTS {keys_table}",
    )


def positions_statements(catalog: str, schema_name: str) -> tuple[str, str]:
    """The positions table (one row per pipeline) and its creation."""
    table = quote(catalog, schema_name, POSITIONS_TABLE)
    return table, (f"CREATE TABLE IF NOT EXISTS {table} (pipeline VARCHAR PRIMARY KEY, "
                   "slot_name VARCHAR NOT NULL, position UBIGINT NOT NULL, loads VARCHAR NOT NULL, "
                   "updated_at TIMESTAMPTZ NOT NULL DEFAULT now())")


def row_select(schema: TableSchema, relation: str, *, after: bool, through: bool,
               limit: int | None) -> str:
    """The parity reader's rows in key order: key columns, then every column; ``after`` /
    ``through``: ``key > (?)`` / ``key <= (?)`` with the key's text as parameters."""
    keys = _join([quote(k) for k in schema.key_columns])
    key_row = f"({keys})" if len(schema.key_columns) > 1 else keys
    bounds = ", ".join(cast(schema.column(k), "?::VARCHAR") for k in schema.key_columns)
    bound_row = f"({bounds})" if len(schema.key_columns) > 1 else bounds
    conditions = ["TRUE"]
    if after:
        conditions.append(f"{key_row} > {bound_row}")
    if through:
        conditions.append(f"{key_row} <= {bound_row}")
    statement = (f"SELECT {keys}, {_join([quote(c.name) for c in schema.columns])} "
                 f"FROM {relation} WHERE {_join(conditions, ' AND ')} ORDER BY {keys}")
    return statement if limit is None else f"{statement} LIMIT {int(limit)}"


BACKFILL_CHUNKS = "_rosetta_backfill_chunks"


def _key_beyond(keys: Sequence[str], alias: str, bound: Sequence[str], *, after: bool) -> str:
    """``alias``'s key after (``key > bound``) or through (``key <= bound``) a bound, in key
    order: lexicographic over the key's columns (``bound``: an SQL expression per column)."""
    terms = []
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        operator = ">" if after else ("<=" if last else "<")
        equal = [f"{alias}.{quote(k)} = {b}" for k, b in zip(keys[:i], bound, strict=False)]
        terms.append("(" + " AND ".join([*equal, f"{alias}.{quote(key)} {operator} {bound[i]}"])
                     + ")")
    return "(" + " OR ".join(terms) + ")"


@dataclass(frozen=True)
class ChunkMergeStatements:
    """What makes the destination's rows in a backfill chunk's key range equal the chunk
    (``core.backfill.chunk_merge``), except the keys the stream changed meanwhile (``excluded``,
    a temporary table)."""

    create_chunk: str
    fill_chunk: str  # a spooled CSV (its path as the parameter) into the chunk table
    create_excluded: str
    fill_excluded: str  # from the DataFrame registered as ``excluded_keys`` (k0..kN text)
    delete: str  # FALSE without bounds: nothing is deleted
    update: str | None
    insert: str


def chunk_merge_statements(schema: TableSchema, target: str, chunk_table: str,
                           excluded_table: str, *, after: bool, through: bool
                           ) -> ChunkMergeStatements:
    """``after`` / ``through``: whether the chunk's bounds are known: ``delete`` then takes
    the key text of ``after``, then of ``through`` (``$1``...). A job with a row filter is
    refused before it stages anything (see ``staging``): every row in the range is the job's."""
    keys = list(schema.key_columns)
    key_types = [duck_type(schema.column(k)) for k in keys]
    conditions = []
    number = 0
    for known, is_after in ((after, True), (through, False)):
        if known:
            # Numbered parameters: the lexicographic form uses each more than once.
            bound = [cast(schema.column(k), f"${number + i + 1}::VARCHAR")
                     for i, k in enumerate(keys)]
            number += len(keys)
            conditions.append(_key_beyond(keys, "t", bound, after=is_after))
    in_range = " AND ".join(conditions) if conditions else "FALSE"
    match = " AND ".join(f"x.{quote(k)} = t.{quote(k)}" for k in keys)
    staged_match = " AND ".join(f"x.{quote(k)} = s.{quote(k)}" for k in keys)
    columns = [quote(c.name) for c in schema.columns]
    non_key = [quote(c.name) for c in schema.columns if c.name not in keys]
    from_excluded = f"NOT EXISTS (SELECT 1 FROM {excluded_table} AS x WHERE {match})"
    update = None
    if non_key:
        differs = " OR ".join(f"t.{c} IS DISTINCT FROM s.{c}" for c in non_key)
        update = (f"UPDATE {target} AS t SET {_join([f'{c} = s.{c}' for c in non_key])} "
                  f"FROM {chunk_table} AS s WHERE "
                  f"{' AND '.join(f't.{quote(k)} = s.{quote(k)}' for k in keys)} "
                  f"AND ({differs}) AND {from_excluded}")
    names = [f"k{i}" for i in range(len(keys))]
    return ChunkMergeStatements(
        create_chunk=(f"CREATE OR REPLACE TEMP TABLE {chunk_table} ("
                      f"{_join([f'{quote(c.name)} {duck_type(c).sql}' for c in schema.columns])})"),
        fill_chunk=csv_insert(schema, chunk_table),
        create_excluded=(f"CREATE OR REPLACE TEMP TABLE {excluded_table} ("
                         f"{_join([f'{quote(k)} {t.sql}' for k, t in zip(keys, key_types, strict=True)])})"),
        fill_excluded=(f"INSERT INTO {excluded_table} SELECT "
                       f"{_join([cast(schema.column(k), n) for k, n in zip(keys, names, strict=True)])} "
                       "FROM excluded_keys"),
        delete=(f"DELETE FROM {target} AS t WHERE {in_range} AND NOT EXISTS "
                f"(SELECT 1 FROM {chunk_table} AS x WHERE {match}) AND {from_excluded}"),
        update=update,
        insert=(f"INSERT INTO {target} ({_join(columns)}) SELECT "
                f"{_join([f's.{c}' for c in columns])} FROM {chunk_table} AS s WHERE NOT EXISTS "
                f"(SELECT 1 FROM {target} AS x WHERE {staged_match}) AND NOT EXISTS "
                f"(SELECT 1 FROM {excluded_table} AS x WHERE {staged_match})"),
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
                      f"{_join([f'{quote(c.name)} {duck_type(c).sql}' for c in columns])}, "
                      "ord INTEGER, count INTEGER)"),
        fill_stage=(f"INSERT INTO {stage} SELECT "
                    f"{_join([cast(c, value_column(i)) for i, c in enumerate(columns)])}, "
                    "ord, count FROM batch"),
        delete=(f"DELETE FROM {target} WHERE rowid IN (SELECT row_id FROM (SELECT t.rowid AS "
                "row_id, s.count AS wanted, row_number() OVER (PARTITION BY s.ord ORDER BY "
                f"t.rowid) AS n FROM {target} AS t JOIN {stage} AS s ON {equal} "
                "WHERE s.count < 0) WHERE n <= -wanted)"),
        insert=(f"INSERT INTO {target} ({_join(names)}) SELECT {_join(names)} FROM (SELECT "
                f"{_join(names)}, unnest(range(count)) FROM {stage} WHERE count > 0)"),
        clear_stage=f"DELETE FROM {stage}",
    )
