"""The SQL a PostgreSQL destination runs to apply a batch, as pure functions of a table.

Nothing here touches a database: each function returns statements (``psycopg2.sql``
compositions; identifiers quoted, values left as parameters) that the applier executes. The
golden-text tests render them and compare the text.

A batch's net changes (one per key, see ``net_changes``) are COPYed into a temporary *stage*
table that has the table's columns plus:

* ``_rosetta_op``: ``d`` (delete) or ``u`` (insert or update);
* ``_rosetta_unchanged``: the columns whose value the change left out (unchanged TOAST);
* ``_rosetta_keep`` and ``_rosetta_from_<n>``: where those values come from (the destination
  row at the key itself, then the destination row at the old key of a moved row).

Left-out values are resolved in the stage first (:func:`resolve_from_old_key`, then
:func:`unresolved_rows` and :func:`fill_left_out` with values read from the source); then one
``MERGE`` deletes, updates and inserts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from psycopg2 import sql

from rosetta_dagster.core.destination.postgres.ddl import destination_type
from rosetta_dagster.core.table_schema import TableSchema, key_range

OP = "_rosetta_op"
UNCHANGED = "_rosetta_unchanged"
KEEP = "_rosetta_keep"


def from_column(position: int) -> str:
    """The stage column holding the ``position``-th (0-based) key column of a moved row's old
    key."""
    return f"_rosetta_from_{position + 1}"


def render(statement: sql.Composable) -> str:
    """A statement's text without a connection (identifiers double-quoted, string literals
    single-quoted, placeholders as ``%s``): what the golden-text tests compare. The applier
    executes the compositions themselves; psycopg2 quotes them with the server's rules."""
    if isinstance(statement, sql.Composed):
        return "".join(render(part) for part in statement.seq)
    if isinstance(statement, sql.SQL):
        return statement.string
    if isinstance(statement, sql.Identifier):
        return ".".join('"' + name.replace('"', '""') + '"' for name in statement.strings)
    if isinstance(statement, sql.Literal):
        value = statement.wrapped
        if isinstance(value, str):
            return "'" + value.replace("'", "''") + "'"
        return str(value)
    if isinstance(statement, sql.Placeholder):
        return "%s" if statement.name is None else f"%({statement.name})s"
    raise TypeError(f"cannot render {statement!r}")


def _join(parts: Sequence[sql.Composable], separator: str = ", ") -> sql.Composed:
    return sql.SQL(separator).join(parts)


def _key_match(schema: TableSchema, left: str, right: str,
               right_columns: Sequence[str] | None = None) -> sql.Composed:
    """``left.k1 = right.k1 AND ...`` (``right_columns``: other names on the right side)."""
    names = right_columns or schema.key_columns
    return _join([sql.SQL("{}.{} = {}.{}").format(sql.Identifier(left), sql.Identifier(k),
                                                   sql.Identifier(right), sql.Identifier(r))
                  for k, r in zip(schema.key_columns, names, strict=True)], " AND ")


@dataclass(frozen=True)
class BatchStatements:
    """Everything that stages and merges one table's batch, built once per schema version."""

    create_stage: sql.Composed
    copy_stage: sql.Composed
    merge: sql.Composed
    merge_one: sql.Composed  # one staged row, its key as parameters (finds a refused row)
    copy_direct: sql.Composed  # new rows straight into the table
    resolve_from_old_key: sql.Composed
    unresolved_rows: sql.Composed
    clear_stage: sql.Composed  # small batches: DELETE (no new relation file)
    truncate_stage: sql.Composed


def _stage_clearing(stage: sql.Identifier) -> dict[str, sql.Composed]:
    """Emptying a stage after its batch: DELETE (small) or TRUNCATE (large), see the applier."""
    return {"clear_stage": sql.SQL("DELETE FROM {}").format(stage),
            "truncate_stage": sql.SQL("TRUNCATE {}").format(stage)}


def batch_statements(schema: TableSchema, target: sql.Identifier, target_schema: str,
                     stage_name: str) -> BatchStatements:
    stage = sql.Identifier(stage_name)
    keys = schema.key_columns
    columns = [sql.Identifier(c.name) for c in schema.columns]
    column_list = _join(columns)
    from_columns = [from_column(i) for i in range(len(keys))]
    stage_columns = [
        sql.SQL("{} {}").format(sql.Identifier(c.name), destination_type(c, target_schema))
        for c in schema.columns
    ] + [sql.SQL("{} text NOT NULL").format(sql.Identifier(OP)),
         sql.SQL("{} text[]").format(sql.Identifier(UNCHANGED)),
         sql.SQL("{} boolean NOT NULL").format(sql.Identifier(KEEP))] + [
        sql.SQL("{} {}").format(sql.Identifier(name),
                                destination_type(schema.column(key), target_schema))
        for name, key in zip(from_columns, keys, strict=True)]
    bookkeeping = _join([sql.Identifier(n) for n in (OP, UNCHANGED, KEEP, *from_columns)])
    updates = [
        sql.SQL("{0} = CASE WHEN {1} = ANY(s.{2}) THEN t.{0} ELSE s.{0} END").format(
            sql.Identifier(c.name), sql.Literal(c.name), sql.Identifier(UNCHANGED))
        for c in schema.columns if c.name not in keys
    ]
    when_matched_update = (sql.SQL("WHEN MATCHED THEN UPDATE SET {}").format(_join(updates))
                           if updates else sql.SQL("WHEN MATCHED THEN DO NOTHING"))

    def merge_using(rows: sql.Composable) -> sql.Composed:
        return sql.SQL(
            "MERGE INTO {target} AS t USING {rows} AS s ON {match} "
            "WHEN MATCHED AND s.{op} = 'd' THEN DELETE "
            "{when_matched_update} "
            "WHEN NOT MATCHED AND s.{op} <> 'd' THEN INSERT ({columns}) VALUES ({values})"
        ).format(target=target, rows=rows, match=_key_match(schema, "t", "s"),
                 op=sql.Identifier(OP), when_matched_update=when_matched_update,
                 columns=column_list, values=_join([sql.SQL("s.{}").format(c) for c in columns]))

    # A staged row whose left-out values the destination row at its own key holds.
    kept = sql.SQL("s.{keep} AND EXISTS (SELECT 1 FROM {target} AS t WHERE {match})").format(
        keep=sql.Identifier(KEEP), target=target, match=_key_match(schema, "t", "s"))
    pending = sql.SQL("s.{unchanged} IS NOT NULL AND s.{op} <> 'd' AND NOT ({kept})").format(
        unchanged=sql.Identifier(UNCHANGED), op=sql.Identifier(OP), kept=kept)
    non_key = [c.name for c in schema.columns if c.name not in keys]
    resolve_from_old_key = sql.SQL(
        "UPDATE {stage} AS s SET {sets} FROM {target} AS o WHERE {moved} AND {pending}"
    ).format(
        stage=stage, target=target,
        sets=_join([sql.SQL("{0} = CASE WHEN {1} = ANY(s.{2}) THEN o.{0} ELSE s.{0} END").format(
            sql.Identifier(name), sql.Literal(name), sql.Identifier(UNCHANGED))
            for name in non_key] + [sql.SQL("{} = NULL").format(sql.Identifier(UNCHANGED))]),
        moved=_key_match(schema, "o", "s", from_columns), pending=pending)
    unresolved_rows = sql.SQL("SELECT {keys}, s.{unchanged} FROM {stage} AS s WHERE {pending}"
                              ).format(keys=_join([sql.SQL("s.{}::text").format(sql.Identifier(k))
                                                   for k in keys]),
                                       unchanged=sql.Identifier(UNCHANGED), stage=stage,
                                       pending=pending)
    return BatchStatements(
        create_stage=sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} ({}) ON COMMIT PRESERVE ROWS"
                             ).format(stage, _join(stage_columns)),
        copy_stage=sql.SQL("COPY {} ({}, {}) FROM STDIN").format(stage, column_list, bookkeeping),
        merge=merge_using(stage),
        merge_one=merge_using(sql.SQL("(SELECT * FROM {} WHERE ROW({}) = ROW({}))").format(
            stage, _join([sql.Identifier(k) for k in keys]),
            _join([sql.Placeholder()] * len(keys)))),
        copy_direct=sql.SQL("COPY {} ({}) FROM STDIN").format(target, column_list),
        resolve_from_old_key=resolve_from_old_key,
        unresolved_rows=unresolved_rows,
        **_stage_clearing(stage),
    )


COUNT = "_rosetta_count"


@dataclass(frozen=True)
class KeylessStatements:
    """A batch of a table without a key (see ``keyless_changes``): each distinct row staged
    once with its net count; ``delete`` removes that many equal destination rows per row of
    negative count (equal: the same text in every column, NULL equal to NULL, so types
    without an equality operator compare too), ``insert`` adds that many copies of each row
    of positive count."""

    create_stage: sql.Composed
    copy_stage: sql.Composed
    # Statistics of the stage: the planner then hashes its few rows and probes the table once
    # (without them it sorts the whole table for a merge join, ~8x slower on 100k rows).
    analyze_stage: sql.Composed
    copy_direct: sql.Composed  # a batch that only adds rows: straight into the table
    delete: sql.Composed
    insert: sql.Composed
    clear_stage: sql.Composed
    truncate_stage: sql.Composed


def row_text(schema: TableSchema, alias: str) -> sql.Composed:
    """The row's columns as one text value (``ROW(...)::text``): equal exactly when every
    column prints the same (NULL is an empty field, '' a quoted one); hashable, so finding a
    batch's rows is one hash join over the table."""
    return sql.SQL("ROW({})::text").format(_join(
        [sql.SQL("{}.{}").format(sql.Identifier(alias), sql.Identifier(c))
         for c in schema.column_names]))


# Types whose text is cheap to print: a probe column of one of them finds candidate rows.
_CHEAP_TEXT = ("int2", "int4", "int8", "text", "varchar", "bpchar", "uuid", "date", "bool")


def _probe(schema: TableSchema, alias: str) -> sql.Composed:
    """One column's text (NULL as ''), the hash join's key: cheap to compute on every row of
    the table, unlike the whole row's text, which is compared only for the rows it matches
    (``IS NOT DISTINCT FROM``: not a hash key; a false match costs time, never a wrong row)."""
    column = next((c for c in schema.columns if c.base_type in _CHEAP_TEXT and not c.is_array),
                  schema.columns[0])
    return sql.SQL("coalesce({}.{}::text, '')").format(sql.Identifier(alias),
                                                      sql.Identifier(column.name))


def keyless_statements(schema: TableSchema, target: sql.Identifier, target_schema: str,
                       stage_name: str) -> KeylessStatements:
    stage = sql.Identifier(stage_name)
    count = sql.Identifier(COUNT)
    column_list = _join([sql.Identifier(c) for c in schema.column_names])
    stage_columns = [
        sql.SQL("{} {}").format(sql.Identifier(c.name), destination_type(c, target_schema))
        for c in schema.columns] + [sql.SQL("{} integer NOT NULL").format(count)]
    return KeylessStatements(
        create_stage=sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} ({}) ON COMMIT PRESERVE ROWS"
                             ).format(stage, _join(stage_columns)),
        copy_stage=sql.SQL("COPY {} ({}, {}) FROM STDIN").format(stage, column_list, count),
        analyze_stage=sql.SQL("ANALYZE {}").format(stage),
        copy_direct=sql.SQL("COPY {} ({}) FROM STDIN").format(target, column_list),
        delete=sql.SQL(
            "DELETE FROM {target} AS t USING (SELECT m.row_id FROM (SELECT d.ctid AS row_id, "
            "s.{count} AS wanted, row_number() OVER (PARTITION BY s.ctid) AS n "
            "FROM {target} AS d JOIN {stage} AS s ON {d_probe} = {s_probe} "
            "AND {d_row} IS NOT DISTINCT FROM {s_row} "
            "WHERE s.{count} < 0) AS m WHERE m.n <= -m.wanted) AS found "
            "WHERE t.ctid = found.row_id"
        ).format(target=target, stage=stage, count=count, d_row=row_text(schema, "d"),
                 s_row=row_text(schema, "s"), d_probe=_probe(schema, "d"),
                 s_probe=_probe(schema, "s")),
        insert=sql.SQL(
            "INSERT INTO {target} ({columns}) SELECT {values} FROM {stage} AS s "
            "CROSS JOIN LATERAL generate_series(1, s.{count}) WHERE s.{count} > 0"
        ).format(target=target, columns=column_list, stage=stage, count=count,
                 values=_join([sql.SQL("s.{}").format(sql.Identifier(c))
                               for c in schema.column_names])),
        **_stage_clearing(stage),
    )


def replace_with_chunk(schema: TableSchema, target: sql.Identifier, chunk: sql.Identifier
                       ) -> tuple[sql.Composed, sql.Composed]:
    """A table without a key backfilled whole: every row deleted, then the staged chunk's
    rows inserted (in the stream's transaction, see ``staging.replace_table``)."""
    columns = _join([sql.Identifier(c) for c in schema.column_names])
    return (sql.SQL("DELETE FROM {}").format(target),
            sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {}").format(target, columns, columns,
                                                                   chunk))


def delete_staged(schema: TableSchema, stage_name: str) -> sql.Composed:
    """Make a staged row a delete of its key (key parameters): its row is gone from the source,
    whose own delete follows; until then no older value stays to be copied by a later change."""
    return sql.SQL("UPDATE {stage} SET {op} = 'd', {unchanged} = NULL WHERE {match}").format(
        stage=sql.Identifier(stage_name), op=sql.Identifier(OP),
        unchanged=sql.Identifier(UNCHANGED),
        match=_join([sql.SQL("{} = %s").format(sql.Identifier(k)) for k in schema.key_columns],
                    " AND "))


def fill_left_out(schema: TableSchema, stage_name: str, columns: Sequence[str]) -> sql.Composed:
    """Set a staged row's left-out ``columns`` to values read from the source (text
    parameters, then the key's); the row then leaves nothing out."""
    return sql.SQL("UPDATE {stage} SET {sets}, {unchanged} = NULL WHERE {match}").format(
        stage=sql.Identifier(stage_name),
        sets=_join([sql.SQL("{} = %s").format(sql.Identifier(c)) for c in columns]),
        unchanged=sql.Identifier(UNCHANGED),
        match=_join([sql.SQL("{} = %s").format(sql.Identifier(k)) for k in schema.key_columns],
                    " AND "))


@dataclass(frozen=True)
class ResyncStatements:
    """A re-snapshot's key table: the keys the snapshot delivered, recorded beside the
    destination table; when the snapshot ends, rows whose key it did not deliver are deleted."""

    keys_table: sql.Identifier
    create_keys: sql.Composed
    truncate_keys: sql.Composed
    record_keys: sql.Composed  # from the stage, in the batch's transaction
    delete_unrecorded: sql.Composed
    drop_keys: sql.Composed


def resync_statements(schema: TableSchema, target: sql.Identifier, target_schema: str,
                      keys_table: sql.Identifier, stage_name: str) -> ResyncStatements:
    key_columns = _join([sql.Identifier(k) for k in schema.key_columns])
    return ResyncStatements(
        keys_table=keys_table,
        create_keys=sql.SQL("CREATE TABLE IF NOT EXISTS {} ({}, PRIMARY KEY ({}))").format(
            keys_table,
            _join([sql.SQL("{} {}").format(sql.Identifier(k),
                                           destination_type(schema.column(k), target_schema))
                   for k in schema.key_columns]),
            key_columns),
        truncate_keys=sql.SQL("TRUNCATE {}").format(keys_table),
        record_keys=sql.SQL(
            "INSERT INTO {keys} ({columns}) SELECT {columns} FROM {stage} WHERE {op} <> 'd' "
            "ON CONFLICT DO NOTHING"
        ).format(keys=keys_table, columns=key_columns, stage=sql.Identifier(stage_name),
                 op=sql.Identifier(OP)),
        delete_unrecorded=sql.SQL(
            "DELETE FROM {target} AS t WHERE NOT EXISTS (SELECT 1 FROM {keys} AS k WHERE {match})"
        ).format(target=target, keys=keys_table, match=_key_match(schema, "k", "t")),
        drop_keys=sql.SQL("DROP TABLE {}").format(keys_table),
    )


@dataclass(frozen=True)
class ChunkMergeStatements:
    """What makes a destination's rows in a backfill chunk's key range equal the staged chunk
    (see ``core.backfill``), except the keys the stream changed while the chunk was read
    (the *excluded* keys, a temporary table loaded by COPY).

    Parameters: ``occupied`` and ``update`` take ``range_params``; ``delete`` takes
    ``range_params`` then ``filter_params``; ``insert`` takes ``range_params`` (its
    ``not present`` test) and ``insert_into_empty`` none.
    """

    create_excluded: sql.Composed
    copy_excluded: sql.Composed
    occupied: sql.Composed  # does the destination have any row in the range?
    delete: sql.Composed  # rows in the range the chunk does not have
    update: sql.Composed | None  # staged rows that differ (None: the key is every column)
    insert: sql.Composed  # staged rows the destination lacks
    insert_into_empty: sql.Composed  # the same when the range holds no row
    range_params: list[str | None]
    filter_params: list[object]


def chunk_merge_statements(
    schema: TableSchema, target: sql.Identifier, target_schema: str, stage: sql.Identifier,
    excluded: sql.Identifier, *,
    bounds: tuple[Sequence[str | None] | None, Sequence[str | None] | None] | None,
    row_filter: tuple[sql.Composable, Sequence[object]], any_excluded: bool,
) -> ChunkMergeStatements:
    """``bounds``: the chunk's ``after < key <= through`` as key text (None: unknown, which
    confines every statement to the staged keys and deletes nothing); ``row_filter``: the
    job's filter on alias ``t``; ``any_excluded``: whether the excluded table has rows."""
    keys = [sql.Identifier(k) for k in schema.key_columns]
    type_of = lambda c: destination_type(c, target_schema)  # noqa: E731

    def in_range(alias: str) -> tuple[sql.Composable, list[str | None]]:
        # The chunk's key range lets every statement use the primary key's index instead of
        # scanning a table that grows chunk by chunk.
        if bounds is None:
            return sql.SQL("TRUE"), []
        return key_range(schema, *bounds, type_of, alias)

    def absent(alias: str, other: sql.Composable,
               extra: sql.Composable | None = None) -> sql.Composed:
        return sql.SQL("NOT EXISTS (SELECT 1 FROM {} AS x WHERE {}{})").format(
            other, _join([sql.SQL("x.{0} = {1}.{0}").format(k, sql.Identifier(alias))
                          for k in keys], " AND "),
            extra if extra is not None else sql.SQL(""))

    def image(alias: str) -> sql.Composed:
        return sql.SQL("ROW({})::record").format(_join(
            [sql.SQL("{}.{}").format(sql.Identifier(alias), sql.Identifier(c))
             for c in schema.column_names]))

    t_range, range_params = in_range("t")
    x_range, _ = in_range("x")
    filter_sql, filter_params = row_filter
    columns = _join([sql.Identifier(c) for c in schema.column_names])
    values = _join([sql.SQL("s.{}").format(sql.Identifier(c)) for c in schema.column_names])
    not_excluded = (sql.SQL(" AND {}").format(absent("s", excluded)) if any_excluded
                    else sql.SQL(""))
    updates = [c for c in schema.column_names if c not in schema.key_columns]
    update = None
    if updates:
        # Binary image comparison: works for types without an equality operator (json,
        # point, ...) and tells -0 from 0 and 1.0 from 1.00.
        update = sql.SQL(
            "UPDATE {target} AS t SET {sets} FROM {stage} AS s WHERE {match} AND {keys} "
            "AND NOT ({t_image} *= {s_image}) AND {not_excluded}").format(
                target=target, stage=stage, keys=t_range,
                sets=_join([sql.SQL("{0} = s.{0}").format(sql.Identifier(c)) for c in updates]),
                match=_join([sql.SQL("t.{0} = s.{0}").format(k) for k in keys], " AND "),
                t_image=image("t"), s_image=image("s"), not_excluded=absent("t", excluded))
    return ChunkMergeStatements(
        create_excluded=sql.SQL(
            "CREATE TEMP TABLE IF NOT EXISTS {} ({}) ON COMMIT DELETE ROWS").format(
                excluded, _join([sql.SQL("{} {}").format(sql.Identifier(k),
                                                         type_of(schema.column(k)))
                                 for k in schema.key_columns])),
        copy_excluded=sql.SQL("COPY {} FROM STDIN").format(excluded),
        occupied=sql.SQL("SELECT EXISTS (SELECT 1 FROM {} AS t WHERE {})").format(
            target, t_range),
        delete=sql.SQL(
            "DELETE FROM {target} AS t WHERE {keys} AND ({filter}) AND {not_staged} "
            "AND {not_excluded}").format(
                target=target, keys=t_range, filter=filter_sql, not_staged=absent("t", stage),
                not_excluded=absent("t", excluded)),
        update=update,
        insert=sql.SQL("INSERT INTO {target} ({columns}) SELECT {values} FROM {stage} AS s "
                       "WHERE {not_present}{not_excluded}").format(
            target=target, columns=columns, values=values, stage=stage,
            not_present=absent("s", target, sql.SQL(" AND {}").format(x_range)),
            not_excluded=not_excluded),
        insert_into_empty=sql.SQL("INSERT INTO {target} ({columns}) SELECT {values} FROM "
                                  "{stage} AS s WHERE TRUE{not_excluded}").format(
            target=target, columns=columns, values=values, stage=stage,
            not_excluded=not_excluded),
        range_params=range_params,
        filter_params=list(filter_params),
    )
