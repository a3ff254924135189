"""Golden text of the statements a PostgreSQL destination runs to apply a batch (no database).

The expected texts are compared, never executed.
"""
# ruff: noqa: S608

from __future__ import annotations

from psycopg2 import sql

from rosetta_dagster.core.destination.postgres.statements import (
    batch_statements,
    chunk_merge_statements,
    fill_left_out,
    keyless_statements,
    render,
    resync_statements,
)
from rosetta_dagster.core.pipeline_config import TableRef
from rosetta_dagster.core.table_schema import (
    Column,
    RowIdentity,
    TableSchema,
    TypeRef,
    UserType,
    row_identity,
)

# A composite key, a name that needs quoting twice over, a user type (lives in the destination's
# schema).
SCHEMA = TableSchema(
    TableRef("public", "Order Lines"),
    (Column("order", "bigint", "int8", False, -1), Column("line", "text", "text", False, -1),
     Column('we"ird', "text", "text", False, -1),
     Column("m", "public.mood", "mood", False, -1,
            type_ref=TypeRef("public.mood", UserType("mood", "e", ("a",))))),
    ("order", "line"),
)
TARGET = sql.Identifier("replica", "Order Lines")
STAGE = "_rosetta_stage_7"
BATCH = batch_statements(SCHEMA, TARGET, "replica", STAGE)
KEPT = ('NOT (s."_rosetta_keep" AND EXISTS (SELECT 1 FROM "replica"."Order Lines" AS t WHERE '
        '"t"."order" = "s"."order" AND "t"."line" = "s"."line"))')


def test_the_stage_holds_the_columns_and_where_left_out_values_come_from() -> None:
    assert render(BATCH.create_stage) == (
        'CREATE TEMP TABLE IF NOT EXISTS "_rosetta_stage_7" ("order" bigint, "line" text, '
        '"we""ird" text, "m" "replica"."mood", "_rosetta_op" text NOT NULL, '
        '"_rosetta_unchanged" text[], "_rosetta_keep" boolean NOT NULL, "_rosetta_from_1" bigint, '
        '"_rosetta_from_2" text) ON COMMIT PRESERVE ROWS')
    assert render(BATCH.copy_stage) == (
        'COPY "_rosetta_stage_7" ("order", "line", "we""ird", "m", "_rosetta_op", '
        '"_rosetta_unchanged", "_rosetta_keep", "_rosetta_from_1", "_rosetta_from_2") FROM STDIN')
    assert render(BATCH.copy_direct) == (
        'COPY "replica"."Order Lines" ("order", "line", "we""ird", "m") FROM STDIN')


def test_one_merge_deletes_updates_and_inserts_keeping_left_out_values() -> None:
    assert render(BATCH.merge) == (
        'MERGE INTO "replica"."Order Lines" AS t USING "_rosetta_stage_7" AS s '
        'ON "t"."order" = "s"."order" AND "t"."line" = "s"."line" '
        """WHEN MATCHED AND s."_rosetta_op" = 'd' THEN DELETE """
        'WHEN MATCHED THEN UPDATE SET '
        """"we""ird" = CASE WHEN 'we"ird' = ANY(s."_rosetta_unchanged") THEN t."we""ird" """
        'ELSE s."we""ird" END, '
        """"m" = CASE WHEN 'm' = ANY(s."_rosetta_unchanged") THEN t."m" ELSE s."m" END """
        """WHEN NOT MATCHED AND s."_rosetta_op" <> 'd' THEN INSERT ("order", "line", "we""ird", "m") """
        'VALUES (s."order", s."line", s."we""ird", s."m")')
    assert render(BATCH.merge_one).startswith(
        'MERGE INTO "replica"."Order Lines" AS t USING (SELECT * FROM "_rosetta_stage_7" '
        'WHERE ROW("order", "line") = ROW(%s, %s)) AS s ON ')


def test_left_out_values_come_from_the_old_key_then_the_source() -> None:
    assert render(BATCH.resolve_from_old_key) == (
        'UPDATE "_rosetta_stage_7" AS s SET '
        """"we""ird" = CASE WHEN 'we"ird' = ANY(s."_rosetta_unchanged") THEN o."we""ird" """
        'ELSE s."we""ird" END, '
        """"m" = CASE WHEN 'm' = ANY(s."_rosetta_unchanged") THEN o."m" ELSE s."m" END, """
        '"_rosetta_unchanged" = NULL FROM "replica"."Order Lines" AS o '
        'WHERE "o"."order" = "s"."_rosetta_from_1" AND "o"."line" = "s"."_rosetta_from_2" '
        """AND s."_rosetta_unchanged" IS NOT NULL AND s."_rosetta_op" <> 'd' AND """ + KEPT)
    assert render(BATCH.unresolved_rows) == (
        'SELECT s."order"::text, s."line"::text, s."_rosetta_unchanged" FROM "_rosetta_stage_7" '
        """AS s WHERE s."_rosetta_unchanged" IS NOT NULL AND s."_rosetta_op" <> 'd' AND """ + KEPT)
    assert render(fill_left_out(SCHEMA, STAGE, ['we"ird', "m"])) == (
        'UPDATE "_rosetta_stage_7" SET "we""ird" = %s, "m" = %s, "_rosetta_unchanged" = NULL '
        'WHERE "order" = %s AND "line" = %s')


def test_a_resnapshot_records_keys_and_deletes_the_rest() -> None:
    resync = resync_statements(SCHEMA, TARGET, "replica",
                               sql.Identifier("replica", "_rosetta_resync_x"), STAGE)
    assert render(resync.create_keys) == (
        'CREATE TABLE IF NOT EXISTS "replica"."_rosetta_resync_x" ("order" bigint, "line" text, '
        'PRIMARY KEY ("order", "line"))')
    assert render(resync.record_keys) == (
        'INSERT INTO "replica"."_rosetta_resync_x" ("order", "line") SELECT "order", "line" '
        """FROM "_rosetta_stage_7" WHERE "_rosetta_op" <> 'd' ON CONFLICT DO NOTHING""")
    assert render(resync.delete_unrecorded) == (
        'DELETE FROM "replica"."Order Lines" AS t WHERE NOT EXISTS (SELECT 1 FROM '
        '"replica"."_rosetta_resync_x" AS k WHERE "k"."order" = "t"."order" AND '
        '"k"."line" = "t"."line")')


def test_a_table_of_key_columns_only_updates_nothing() -> None:
    keys_only = TableSchema(TableRef("public", "k"), (Column("id", "integer", "int4", False, -1),),
                            ("id",))
    merge = render(batch_statements(keys_only, sql.Identifier("replica", "k"), "replica", "s").merge)
    assert "WHEN MATCHED THEN DO NOTHING" in merge


CHUNK = sql.Identifier("replica", "_rosetta_backfill_3_2")
EXCLUDED = sql.Identifier("_rosetta_excluded_7")
IN_RANGE = ('ROW("t"."order", "t"."line") > ROW(%s::bigint, %s::text) AND '
            'ROW("t"."order", "t"."line") <= ROW(%s::bigint, %s::text)')


def test_a_backfill_chunk_replaces_its_key_range_except_the_keys_the_stream_changed() -> None:
    merge = chunk_merge_statements(
        SCHEMA, TARGET, "replica", CHUNK, EXCLUDED, bounds=(["1", "a"], ["9", "z"]),
        row_filter=(sql.SQL("t.m <> %s"), ["a"]), any_excluded=True)
    assert merge.range_params == ["1", "a", "9", "z"] and merge.filter_params == ["a"]
    assert render(merge.create_excluded) == (
        'CREATE TEMP TABLE IF NOT EXISTS "_rosetta_excluded_7" ("order" bigint, "line" text) '
        'ON COMMIT DELETE ROWS')
    assert render(merge.occupied) == (
        'SELECT EXISTS (SELECT 1 FROM "replica"."Order Lines" AS t WHERE ' + IN_RANGE + ')')
    not_excluded = ('NOT EXISTS (SELECT 1 FROM "_rosetta_excluded_7" AS x WHERE '
                    'x."order" = "t"."order" AND x."line" = "t"."line")')
    assert render(merge.delete) == (
        'DELETE FROM "replica"."Order Lines" AS t WHERE ' + IN_RANGE + ' AND (t.m <> %s) AND '
        'NOT EXISTS (SELECT 1 FROM "replica"."_rosetta_backfill_3_2" AS x WHERE '
        'x."order" = "t"."order" AND x."line" = "t"."line") AND ' + not_excluded)
    assert merge.update is not None
    assert render(merge.update) == (
        'UPDATE "replica"."Order Lines" AS t SET "we""ird" = s."we""ird", "m" = s."m" '
        'FROM "replica"."_rosetta_backfill_3_2" AS s WHERE t."order" = s."order" AND '
        't."line" = s."line" AND ' + IN_RANGE + ' AND NOT (ROW("t"."order", "t"."line", '
        '"t"."we""ird", "t"."m")::record *= ROW("s"."order", "s"."line", "s"."we""ird", '
        '"s"."m")::record) AND ' + not_excluded)
    assert render(merge.insert) == (
        'INSERT INTO "replica"."Order Lines" ("order", "line", "we""ird", "m") SELECT s."order", '
        's."line", s."we""ird", s."m" FROM "replica"."_rosetta_backfill_3_2" AS s WHERE '
        'NOT EXISTS (SELECT 1 FROM "replica"."Order Lines" AS x WHERE x."order" = "s"."order" '
        'AND x."line" = "s"."line" AND ' + IN_RANGE.replace('"t"', '"x"') + ') AND '
        'NOT EXISTS (SELECT 1 FROM "_rosetta_excluded_7" AS x WHERE x."order" = "s"."order" '
        'AND x."line" = "s"."line")')
    assert render(merge.insert_into_empty) == (
        'INSERT INTO "replica"."Order Lines" ("order", "line", "we""ird", "m") SELECT s."order", '
        's."line", s."we""ird", s."m" FROM "replica"."_rosetta_backfill_3_2" AS s WHERE TRUE '
        'AND NOT EXISTS (SELECT 1 FROM "_rosetta_excluded_7" AS x WHERE '
        'x."order" = "s"."order" AND x."line" = "s"."line")')


def test_a_chunk_of_unknown_bounds_is_confined_to_its_keys() -> None:
    merge = chunk_merge_statements(SCHEMA, TARGET, "replica", CHUNK, EXCLUDED, bounds=None,
                                   row_filter=(sql.SQL("TRUE"), []), any_excluded=False)
    assert merge.range_params == []
    assert render(merge.insert).endswith('AND x."line" = "s"."line" AND TRUE)')
    assert render(merge.insert_into_empty).endswith("WHERE TRUE")


KEYLESS = TableSchema(
    TableRef("public", "log"),
    (Column("at", "timestamptz", "timestamptz", False, -1),
     Column("doc", "json", "json", False, -1)),
    (), identity=RowIdentity.FULL_ROW)


def test_a_keyless_batch_removes_equal_rows_by_count_and_adds_copies() -> None:
    statements = keyless_statements(KEYLESS, sql.Identifier("replica", "log"), "replica", STAGE)
    assert render(statements.create_stage) == (
        'CREATE TEMP TABLE IF NOT EXISTS "_rosetta_stage_7" ("at" timestamptz, "doc" json, '
        '"_rosetta_count" integer NOT NULL) ON COMMIT PRESERVE ROWS')
    assert render(statements.copy_stage) == (
        'COPY "_rosetta_stage_7" ("at", "doc", "_rosetta_count") FROM STDIN')
    # Equal: the whole row's text (json has no equality operator; NULL equals NULL).
    assert render(statements.delete) == (
        'DELETE FROM "replica"."log" AS t USING (SELECT m.row_id FROM (SELECT d.ctid AS row_id, '
        's."_rosetta_count" AS wanted, row_number() OVER (PARTITION BY s.ctid) AS n '
        'FROM "replica"."log" AS d JOIN "_rosetta_stage_7" AS s ON '
        """coalesce("d"."at"::text, '') = coalesce("s"."at"::text, '') AND """
        'ROW("d"."at", "d"."doc")::text IS NOT DISTINCT FROM ROW("s"."at", "s"."doc")::text '
        'WHERE s."_rosetta_count" < 0) AS m WHERE m.n <= -m.wanted) AS found '
        'WHERE t.ctid = found.row_id')
    assert render(statements.insert) == (
        'INSERT INTO "replica"."log" ("at", "doc") SELECT s."at", s."doc" FROM '
        '"_rosetta_stage_7" AS s CROSS JOIN LATERAL generate_series(1, s."_rosetta_count") '
        'WHERE s."_rosetta_count" > 0')


def test_the_key_is_the_replica_identity() -> None:
    assert row_identity("d", ["id"], [], False) == (RowIdentity.PRIMARY_KEY, ("id",))
    assert row_identity("f", ["id"], [], False) == (RowIdentity.PRIMARY_KEY, ("id",))
    # An identity index that covers the primary key: the primary key.
    assert row_identity("i", ["id"], ["id", "status"], False) == (RowIdentity.PRIMARY_KEY,
                                                                   ("id",))
    assert row_identity("i", ["id"], ["email"], False) == (RowIdentity.UNIQUE_INDEX, ("email",))
    assert row_identity("i", [], ["email", "region"], False) == (RowIdentity.UNIQUE_INDEX,
                                                                 ("email", "region"))
    assert row_identity("f", [], [], False) == (RowIdentity.FULL_ROW, ())
    for no_identity in (("d", []), ("n", ["id"]), ("i", [])):  # "i": its index was dropped
        assert row_identity(no_identity[0], no_identity[1], [], False) is None
    assert row_identity("n", [], [], True) == (RowIdentity.INSERTS_ONLY, ())
