"""SQL text that DuckDB and Snowflake destinations share, as pure functions of a table and of
the kind's kept types (golden-text tests, no database). Identifiers are double-quoted
(:func:`quote`); values are always parameters (``?``) or come from the staged batch, never
formatted into the text (DDL, which takes no parameters, gets :func:`literal`).

A batch's net changes (one per key, see ``net_changes``) are staged as PostgreSQL text
(columns ``c0..cN`` by position, so a user's column name never meets the staging), plus:

* ``op``: ``d`` (delete) or ``u`` (insert or update);
* ``l0..lN``: the column's value was left out (unchanged TOAST): the row keeps its value;
* ``keep`` and ``f0..fK``: where left-out values come from: the destination row at the key
  itself, then the destination row at the old key ``f0..fK`` of a moved row.

They are cast into a *stage* of the table's kept types; left-out values are resolved in the
stage (:attr:`BatchStatements.resolve_from_old_key`, then values read back from the source);
then the kind's merge statements delete, update and insert. The position row is updated in the
same transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rosetta_dagster.core.destination.warehouse.types import KeptType
from rosetta_dagster.core.table_schema import Column, TableSchema

KeptTypes = Callable[[Column], KeptType]
# A text parameter, as the kinds write it (Snowflake's parser takes no ``?::`` inside a CAST).
TEXT_PARAMETER = "?::VARCHAR"
POSITIONS_TABLE = "_rosetta_positions"
BACKFILL_CHUNKS = "_rosetta_backfill_chunks"


def quote(*names: str) -> str:
    """A (qualified) identifier, double-quoted: ``"catalog"."schema"."name"``."""
    return ".".join('"' + name.replace('"', '""') + '"' for name in names)


def join(parts: Sequence[str], separator: str = ", ") -> str:
    return separator.join(parts)


def literal(text: str) -> str:
    """A string literal, for DDL (which takes no parameters): quotes doubled."""
    return "'" + text.replace("'", "''") + "'"


def value_column(position: int) -> str:
    return f"c{position}"


def left_out_column(position: int) -> str:
    return f"l{position}"


def from_column(position: int) -> str:
    return f"f{position}"


def cast(kept: KeptTypes, column: Column, expression: str) -> str:
    """A PostgreSQL text value (``expression``) as the column's kept type."""
    return kept(column).cast.format(expression)


def create_table(kept: KeptTypes, schema: TableSchema, target: str) -> str:
    """The destination table, columns in the source's order. No PRIMARY KEY: the merge keeps
    keys unique by construction (and DuckDB checks a unique index eagerly within a transaction:
    a key deleted and inserted again by one batch would be refused)."""
    columns = [f"{quote(c.name)} {kept(c).sql}" for c in schema.columns]
    return f"CREATE TABLE IF NOT EXISTS {target} ({join(columns)})"


@dataclass(frozen=True)
class BatchStatements:
    """Everything that stages and merges one table's batch, built once per schema version."""

    create_stage: str | None  # in the batch's transaction (None: made with the table)
    fill_stage: str  # from the staged text rows
    resolve_from_old_key: str
    unresolved_rows: str  # the key (as stored) and the left-out flags of each
    merge: tuple[str, ...]
    clear_stage: str


@dataclass(frozen=True)
class StageParts:
    """The pieces of a kind's batch statements that do not depend on how it merges."""

    stage_columns: list[str]
    fill_values: list[str]
    resolve_from_old_key: str
    unresolved_rows: str
    updates: list[str]  # ``column = <staged value, or the row's own when left out>``
    match: str  # target ``t`` and stage ``s`` by key


def stage_parts(kept: KeptTypes, schema: TableSchema, target: str, stage: str) -> StageParts:
    keys = schema.key_columns
    columns = list(schema.columns)
    position = {c.name: i for i, c in enumerate(columns)}
    lefts = [left_out_column(i) for i in range(len(columns))]
    froms = [from_column(i) for i in range(len(keys))]
    stage_columns = ([f"{quote(c.name)} {kept(c).sql}" for c in columns]
                     + ["op VARCHAR", "keep BOOLEAN"] + [f"{name} BOOLEAN" for name in lefts]
                     + [f"{name} {kept(schema.column(k)).sql}"
                        for name, k in zip(froms, keys, strict=True)])
    fill_values = ([cast(kept, c, value_column(i)) for i, c in enumerate(columns)]
                   + ["op", "keep"] + lefts
                   + [cast(kept, schema.column(k), name) for name, k in zip(froms, keys, strict=True)])
    match = join([f"t.{quote(k)} = s.{quote(k)}" for k in keys], " AND ")
    any_left_out = join([f"s.{name}" for name in lefts], " OR ")
    kept_here = f"s.keep AND EXISTS (SELECT 1 FROM {target} AS t WHERE {match})"
    pending = f"s.op <> 'd' AND ({any_left_out}) AND NOT ({kept_here})"
    non_key = [c for c in columns if c.name not in keys]
    from_match = join([f"o.{quote(k)} = s.{f}" for k, f in zip(keys, froms, strict=True)],
                      " AND ")
    resolve_sets = ([f"{quote(c.name)} = CASE WHEN s.{left_out_column(position[c.name])} "
                     f"THEN o.{quote(c.name)} ELSE s.{quote(c.name)} END" for c in non_key]
                    + [f"{name} = FALSE" for name in lefts])
    return StageParts(
        stage_columns=stage_columns,
        fill_values=fill_values,
        resolve_from_old_key=(
            f"UPDATE {stage} AS s SET {join(resolve_sets)} FROM {target} AS o "
            f"WHERE {from_match} AND {pending}"),
        unresolved_rows=(f"SELECT {join([f's.{quote(k)}' for k in keys])}, "
                         f"{join([f's.{name}' for name in lefts])} FROM {stage} AS s "
                         f"WHERE {pending}"),
        updates=[f"{quote(c.name)} = CASE WHEN s.{left_out_column(position[c.name])} "
                 f"THEN t.{quote(c.name)} ELSE s.{quote(c.name)} END" for c in non_key],
        match=match,
    )


def key_condition(kept: KeptTypes, schema: TableSchema, alias: str | None = None, *,
                  text_parameter: str = TEXT_PARAMETER) -> str:
    """``k1 = <cast of ?> AND ...``: a row by its key, given as PostgreSQL text parameters."""
    prefix = f"{alias}." if alias else ""
    return join([f"{prefix}{quote(k)} = {cast(kept, schema.column(k), text_parameter)}"
                 for k in schema.key_columns], " AND ")


def fill_left_out(kept: KeptTypes, schema: TableSchema, stage: str, columns: Sequence[str], *,
                  text_parameter: str = TEXT_PARAMETER) -> str:
    """Set a staged row's left-out ``columns`` to values read from the source (text
    parameters, then the key's); the row then leaves nothing out."""
    sets = [f"{quote(name)} = {cast(kept, schema.column(name), text_parameter)}"
            for name in columns]
    sets += [f"{left_out_column(i)} = FALSE" for i in range(len(schema.columns))]
    where = key_condition(kept, schema, text_parameter=text_parameter)
    return f"UPDATE {stage} SET {join(sets)} WHERE {where}"


def delete_staged(kept: KeptTypes, schema: TableSchema, stage: str, *,
                  text_parameter: str = TEXT_PARAMETER) -> str:
    """Make a staged row a delete of its key (key parameters): its row is gone from the
    source, whose own delete follows."""
    clear = join([f"{left_out_column(i)} = FALSE" for i in range(len(schema.columns))])
    where = key_condition(kept, schema, text_parameter=text_parameter)
    return f"UPDATE {stage} SET op = 'd', {clear} WHERE {where}"


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


def resync_statements(kept: KeptTypes, schema: TableSchema, target: str, stage: str,
                      keys_table: str) -> ResyncStatements:
    keys = schema.key_columns
    key_list = join([quote(k) for k in keys])
    match = join([f"k.{quote(k)} = t.{quote(k)}" for k in keys], " AND ")
    return ResyncStatements(
        create_keys=(f"CREATE TABLE IF NOT EXISTS {keys_table} ("
                     + join([f"{quote(k)} {kept(schema.column(k)).sql}" for k in keys]) + ")"),
        clear_keys=f"DELETE FROM {keys_table}",
        record_keys=f"INSERT INTO {keys_table} SELECT {key_list} FROM {stage} WHERE op <> 'd'",
        delete_unrecorded=(f"DELETE FROM {target} AS t WHERE NOT EXISTS "
                           f"(SELECT 1 FROM {keys_table} AS k WHERE {match})"),
        drop_keys=f"DROP TABLE IF EXISTS {keys_table}",
    )


def row_select(kept: KeptTypes, schema: TableSchema, relation: str, *, after: bool,
               through: bool, limit: int | None, text_parameter: str = TEXT_PARAMETER) -> str:
    """The parity reader's rows in key order: key columns, then every column; ``after`` /
    ``through``: ``key > (?)`` / ``key <= (?)`` with the key's text as parameters."""
    keys = join([quote(k) for k in schema.key_columns])
    key_row = f"({keys})" if len(schema.key_columns) > 1 else keys
    bounds = ", ".join(cast(kept, schema.column(k), text_parameter) for k in schema.key_columns)
    bound_row = f"({bounds})" if len(schema.key_columns) > 1 else bounds
    conditions = ["TRUE"]
    if after:
        conditions.append(f"{key_row} > {bound_row}")
    if through:
        conditions.append(f"{key_row} <= {bound_row}")
    statement = (f"SELECT {keys}, {join([quote(c.name) for c in schema.columns])} "
                 f"FROM {relation} WHERE {join(conditions, ' AND ')} ORDER BY {keys}")
    return statement if limit is None else f"{statement} LIMIT {int(limit)}"


def key_beyond(keys: Sequence[str], alias: str, bound: Sequence[str], *, after: bool) -> str:
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
    a table of keys)."""

    create_chunk: str | None  # None: the chunk is staged in a table already
    fill_chunk: str | None
    create_excluded: str | None
    fill_excluded: str  # from the staged key text (k0..kK)
    delete: str  # FALSE without bounds: nothing is deleted
    update: str | None
    insert: str
    clear: tuple[str, ...]  # in the same transaction, after the merge


@dataclass(frozen=True)
class ChunkMergeParts:
    in_range: str
    delete_where: str  # after ``DELETE FROM target AS t WHERE``
    update: str | None
    insert: str


def chunk_merge_parts(kept: KeptTypes, schema: TableSchema, target: str, chunk_table: str,
                      excluded_table: str, *, after: bool, through: bool,
                      parameter: Callable[[int], str]) -> ChunkMergeParts:
    """``after`` / ``through``: whether the chunk's bounds are known: the delete then takes the
    key text of ``after``, then of ``through`` (``parameter(n)``: the n-th, from 1, as text). A job with a
    row filter is refused before it stages anything: every row in the range is the job's."""
    keys = list(schema.key_columns)
    conditions = []
    number = 0
    for known, is_after in ((after, True), (through, False)):
        if known:
            bound = [cast(kept, schema.column(k), parameter(number + i + 1))
                     for i, k in enumerate(keys)]
            number += len(keys)
            conditions.append(key_beyond(keys, "t", bound, after=is_after))
    in_range = " AND ".join(conditions) if conditions else "FALSE"
    match = " AND ".join(f"x.{quote(k)} = t.{quote(k)}" for k in keys)
    staged_match = " AND ".join(f"x.{quote(k)} = s.{quote(k)}" for k in keys)
    columns = [quote(c.name) for c in schema.columns]
    non_key = [quote(c.name) for c in schema.columns if c.name not in keys]
    from_excluded = f"NOT EXISTS (SELECT 1 FROM {excluded_table} AS x WHERE {match})"
    update = None
    if non_key:
        differs = " OR ".join(f"t.{c} IS DISTINCT FROM s.{c}" for c in non_key)
        update = (f"UPDATE {target} AS t SET {join([f'{c} = s.{c}' for c in non_key])} "
                  f"FROM {chunk_table} AS s WHERE "
                  f"{' AND '.join(f't.{quote(k)} = s.{quote(k)}' for k in keys)} "
                  f"AND ({differs}) AND {from_excluded}")
    return ChunkMergeParts(
        in_range=in_range,
        delete_where=(f"{in_range} AND NOT EXISTS (SELECT 1 FROM {chunk_table} AS x WHERE "
                      f"{match}) AND {from_excluded}"),
        update=update,
        insert=(f"INSERT INTO {target} ({join(columns)}) SELECT "
                f"{join([f's.{c}' for c in columns])} FROM {chunk_table} AS s WHERE NOT EXISTS "
                f"(SELECT 1 FROM {target} AS x WHERE {staged_match}) AND NOT EXISTS "
                f"(SELECT 1 FROM {excluded_table} AS x WHERE {staged_match})"),
    )
