"""A Snowflake destination, run end to end against ``fakesnow`` — an emulator of Snowflake's
SQL on DuckDB, served over Snowflake's HTTP protocol to the real ``snowflake-connector-python``
(not Snowflake itself: the live test at the end runs against an account when ``SNOWFLAKE_*``
variables name one). Every type family through the initial load, the stream and a backfill on
both engines and through Debezium's snapshot, key updates that leave TOASTed values untouched,
a TRUNCATE, added and retyped columns, random change sequences with restarts, kill -9 of a
stream process, password and key-pair authentication, the parity checks, and what it refuses.

Each destination row is rendered back to PostgreSQL's row text and compared with the source's
``ROW(t.*)::text`` under the pinned settings (NULL is an empty field, '' a quoted one).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from psycopg2 import sql

from rosetta_dagster.core.config_store import ConfigStore, PipelineStatus
from rosetta_dagster.core.destination.postgres.reader import PostgresTableReader
from rosetta_dagster.core.destination.snowflake.connection import cursor
from rosetta_dagster.core.destination.snowflake.reader import SnowflakeTableReader
from rosetta_dagster.core.destination.snowflake.statements import (
    batch_statements,
    bound_parameters,
    chunk_merge_statements,
    columns_statements,
    keyless_statements,
    quote,
    schema_columns,
)
from rosetta_dagster.core.destination.snowflake.types import snow_type
from rosetta_dagster.core.destination.warehouse.reader import row_text
from rosetta_dagster.core.errors import RosettaError
from rosetta_dagster.core.health.parity import content_parity
from rosetta_dagster.core.pipeline_config import (
    Destination,
    SnowflakeAccount,
    TableRef,
)
from rosetta_dagster.core.pipeline_config.loading import load_config
from rosetta_dagster.core.pipeline_config.records import PipelineConfigError
from rosetta_dagster.core.streaming import StreamingSession
from rosetta_dagster.core.table_schema import Column, TableSchema
from rosetta_dagster.harness import (
    StreamingEnv,
    drop_slots,
    execute,
    run_requested_backfill,
    streaming,
    wait_until,
)
from rosetta_dagster.harness.random_changes import SEQUENCE_LOG, SEQUENCE_TABLE, random_change
from rosetta_dagster.harness.snowflake import (
    converge,
    existing_tables,
    snowflake_differences,
    snowflake_pipeline,
    snowflake_rows,
)
from rosetta_dagster.harness.type_matrix import (
    FULL_TABLE,
    INDEX_TABLE,
    change_matrix,
    create_matrix,
    families_for,
    pinned_connection,
    source_schemas,
)


def test_a_key_update_keeps_the_toasted_values_in_the_snowflake_emulator(
    env: StreamingEnv, store: ConfigStore, emulated: Destination
) -> None:
    """UPDATEs that change the key and leave TOASTed text and bytea untouched, also after an
    update of those values in the same batch, and a row moved twice: Snowflake keeps them."""
    execute(env.source_url, "CREATE TABLE public.docs (id int PRIMARY KEY, n int, "
            "body text, blob bytea); ALTER TABLE public.docs ALTER body SET STORAGE EXTERNAL, "
            "ALTER blob SET STORAGE EXTERNAL")
    execute(env.source_url, "INSERT INTO public.docs SELECT i, 0, repeat(md5(i::text), 400), "
            "decode(repeat(md5(i::text), 300), 'hex') FROM generate_series(1, 20) i")
    pipeline = snowflake_pipeline(env, emulated, "docs", ["public.docs"])
    store.sync_pipeline(pipeline)
    store.set_pipeline_status("docs", PipelineStatus.START)
    schemas = source_schemas(env, ["public.docs"])
    session = StreamingSession(pipeline, offsets_dir=env.offsets_dir, config_store=store)
    with streaming(session):
        wait_until(lambda: not snowflake_differences(env, emulated, schemas), 60,
                   "the initial load")
        execute(env.source_url, "UPDATE public.docs SET id = id + 100 WHERE id <= 5")
        execute(env.source_url, "BEGIN; UPDATE public.docs SET body = 'new ' || repeat('x', 9000) "
                "WHERE id = 6; UPDATE public.docs SET id = 206 WHERE id = 6; COMMIT")
        execute(env.source_url, "UPDATE public.docs SET id = 300 WHERE id = 101; "
                "UPDATE public.docs SET id = 301 WHERE id = 300; UPDATE public.docs SET n = 7")
        wait_until(lambda: not snowflake_differences(env, emulated, schemas), 60,
                   "the key updates")
    assert session.progress.unchanged_toast_values > 0


def test_deletes_truncate_added_and_retyped_columns_in_the_snowflake_emulator(
    env: StreamingEnv, store: ConfigStore, emulated: Destination
) -> None:
    """A TRUNCATE between inserts of one batch, deletes, columns added with hostile defaults
    (rows that existed read the default, as on the source) and one without, then a column
    whose type changed on the source (rewritten without a change event: re-copied by the
    backfill the stream requests)."""
    execute(env.source_url, "CREATE TABLE public.items (id int PRIMARY KEY, name text, "
            "code varchar(4))",
            "INSERT INTO public.items SELECT i, 'item ' || i, i::text FROM generate_series(1, 50) i")
    pipeline = snowflake_pipeline(env, emulated, "items", ["public.items"])
    store.sync_pipeline(pipeline)
    store.set_pipeline_status("items", PipelineStatus.START)
    session = StreamingSession(pipeline, offsets_dir=env.offsets_dir, config_store=store)

    def differing() -> list[str]:
        return snowflake_differences(env, emulated, source_schemas(env, ["public.items"]))

    with streaming(session):
        wait_until(lambda: not differing(), 60, "the initial load")
        execute(env.source_url, "DELETE FROM public.items WHERE id % 3 = 0")
        execute(env.source_url, "BEGIN; INSERT INTO public.items VALUES (100, 'gone'); "
                "TRUNCATE public.items; INSERT INTO public.items VALUES (1, 'again', '1'), "
                "(2, NULL, '22'); COMMIT")
        wait_until(lambda: not differing(), 60, "the truncate")
        execute(env.source_url, "ALTER TABLE public.items ADD COLUMN qty int DEFAULT 7, "
                "ADD COLUMN note text, ADD COLUMN at timestamptz DEFAULT '-infinity', "
                "ADD COLUMN born date DEFAULT '0044-03-15 BC', ADD COLUMN ratio float8 "
                "DEFAULT '-0', ADD COLUMN amount numeric DEFAULT 'NaN', "
                "ADD COLUMN grid int[] DEFAULT '[0:1][-1:0]={{1,NULL},{3,4}}'",
                "INSERT INTO public.items VALUES (3, 'three', '333', 3, "
                "'a \"note\", with (parens)', NULL, NULL, NULL, NULL, NULL)",
                "UPDATE public.items SET note = '' WHERE id = 1")
        wait_until(lambda: not differing(), 60, "the added columns")
        execute(env.source_url, "ALTER TABLE public.items ALTER COLUMN code TYPE int "
                "USING length(code), ALTER COLUMN qty TYPE text USING 'q' || qty",
                "INSERT INTO public.items (id, name, code, qty) VALUES (5, 'five', 55, 'x')")
        run_requested_backfill(store, pipeline, 1, "the stream to request a backfill")
        wait_until(lambda: not differing(), 60, "the rows the source rewrote")


@pytest.mark.parametrize("engine", ["debezium"])
def test_a_table_without_a_key_from_debezium_is_refused_by_snowflake(
    env: StreamingEnv, emulated: Destination
) -> None:
    """Snowflake compares the rows of a table without a key by their PostgreSQL text, which
    only the pgoutput engine sends as such: refused in one sentence before anything is
    written."""
    execute(env.source_url, "CREATE TABLE public.log (at int, msg text)",
            "ALTER TABLE public.log REPLICA IDENTITY FULL")
    pipeline = snowflake_pipeline(env, emulated, "logs", ["public.log"])
    with pytest.raises(RosettaError) as refused:
        StreamingSession(pipeline, offsets_dir=env.offsets_dir).run()
    assert str(refused.value) == (
        "Pipeline logs: public.log has no key, and destination dst is Snowflake, which compares "
        "the rows of such a table by their PostgreSQL text: it takes them from the pgoutput "
        "engine only; nothing was written.")
    with cursor(emulated) as cur:
        assert existing_tables(cur, emulated) == set()


@pytest.mark.parametrize("engine", ["pgoutput"])  # Debezium: refused (the test above)
def test_a_table_without_a_key_is_a_multiset_in_the_snowflake_emulator(
    env: StreamingEnv, store: ConfigStore, emulated: Destination
) -> None:
    """REPLICA IDENTITY FULL without a key: duplicates stay duplicates, an UPDATE or DELETE
    of one of them affects one row (NULL-safe, also for json, point and arrays), many copies
    inserted at once, a TRUNCATE, and the content parity check compares the multisets."""
    execute(env.source_url,
            "CREATE TABLE public.log (at int, msg text, doc json, p point, tags text[], b bytea)",
            "ALTER TABLE public.log REPLICA IDENTITY FULL",
            "INSERT INTO public.log VALUES (1, 'a', '{\"k\": 1}', '(1,2)', '{x,NULL}', '\\x00'), "
            "(1, 'a', '{\"k\": 1}', '(1,2)', '{x,NULL}', '\\x00'), (2, NULL, NULL, NULL, NULL, "
            "NULL), (2, NULL, NULL, NULL, NULL, NULL), (3, '', '[]', '(0,0)', '{}', '\\x')")
    pipeline = snowflake_pipeline(env, emulated, "logs", ["public.log"])
    store.sync_pipeline(pipeline)
    store.set_pipeline_status("logs", PipelineStatus.START)
    (schema,) = source_schemas(env, ["public.log"])
    renders = [snow_type(c).render for c in schema.columns]

    def multisets() -> tuple[list[str], list[str]]:
        conn = pinned_connection(env.source_url)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT ROW(t.*)::text FROM public.log AS t")
                source = sorted(row[0] for row in cur.fetchall())
        finally:
            conn.close()
        with cursor(emulated) as cur:
            if "log" not in existing_tables(cur, emulated):
                return source, []
            rows = cur.execute('SELECT * FROM "replica"."log"').fetchall()
        return source, sorted(row_text([None if v is None else render(v)
                                        for render, v in zip(renders, row, strict=True)])
                              for row in rows)

    with streaming(StreamingSession(pipeline, offsets_dir=env.offsets_dir, config_store=store)):
        wait_until(lambda: multisets()[0] == multisets()[1], 60, "the initial load")
        execute(env.source_url,
                "UPDATE public.log SET msg = 'one of two' WHERE ctid = (SELECT min(ctid) FROM "
                "public.log WHERE at = 1)",
                "DELETE FROM public.log WHERE ctid = (SELECT min(ctid) FROM public.log "
                "WHERE at = 2)",
                "INSERT INTO public.log SELECT * FROM public.log WHERE at = 3",
                "UPDATE public.log SET tags = '{{a,b},{c,NULL}}' WHERE at = 3 AND ctid = "
                "(SELECT max(ctid) FROM public.log WHERE at = 3)",
                "INSERT INTO public.log SELECT 4, 'many', NULL, NULL, NULL, NULL "
                "FROM generate_series(1, 25)",
                "DELETE FROM public.log WHERE ctid IN (SELECT ctid FROM public.log "
                "WHERE at = 4 LIMIT 10)")
        try:
            wait_until(lambda: multisets()[0] == multisets()[1], 60, "the changes")
        except AssertionError:
            raise AssertionError(f"source != Snowflake: {multisets()}") from None
        conn = pinned_connection(env.source_url)
        try:
            with cursor(emulated) as cur:
                outcome = content_parity(PostgresTableReader(conn), SnowflakeTableReader(cur),
                                         schema, sql.Identifier("replica", "log"), 2, 5)
        finally:
            conn.close()
        assert outcome.passed, outcome.description
        execute(env.source_url, "BEGIN; TRUNCATE public.log; INSERT INTO public.log (at) "
                "VALUES (9), (9); COMMIT")
        wait_until(lambda: multisets()[0] == multisets()[1], 60, "the truncate")


def test_snowflake_statements_golden() -> None:
    """A table with an odd name: the stage's fill, the merge (left-out values from the row at
    the key, then a DELETE and an INSERT), and a two-column key's chunk range with its
    parameters repeated in the order the text uses them."""
    schema = TableSchema(TableRef("public", 'we"ird'), (
        Column("id", "integer", "int4", False, -1),
        Column("doc", "text", "text", False, -1),
        Column("at", "timestamp with time zone", "timestamptz", False, -1)), ("id",))
    statements = batch_statements(schema, quote("replica", 'we"ird'), quote("_stage"),
                                  quote("_raw"))
    assert statements.create_stage is None
    assert statements.fill_stage == (
        'INSERT INTO "_stage" SELECT CAST(c0 AS NUMBER(10, 0)), c1, c2, op, keep, l0, l1, l2, '
        'CAST(f0 AS NUMBER(10, 0)) FROM "_raw"')
    assert statements.merge == (
        'UPDATE "_stage" AS s SET "doc" = CASE WHEN s.l1 THEN t."doc" ELSE s."doc" END, '
        '"at" = CASE WHEN s.l2 THEN t."at" ELSE s."at" END FROM "replica"."we""ird" AS t '
        "WHERE t.\"id\" = s.\"id\" AND s.op <> 'd'",
        'DELETE FROM "replica"."we""ird" AS t WHERE EXISTS (SELECT 1 FROM "_stage" AS s '
        'WHERE t."id" = s."id")',
        'INSERT INTO "replica"."we""ird" ("id", "doc", "at") SELECT s."id", s."doc", s."at" '
        "FROM \"_stage\" AS s WHERE s.op <> 'd'")
    keyed = TableSchema(TableRef("public", "lines"), (
        Column("order", "bigint", "int8", False, -1),
        Column("line", "integer", "int4", False, -1),
        Column("qty", "integer", "int4", False, -1)), ("order", "line"))
    chunk = chunk_merge_statements(keyed, '"r"."lines"', '"r"."_c"', '"r"."_x"', '"r"."_xr"',
                                   after=True, through=False)
    assert chunk.delete == (
        'DELETE FROM "r"."lines" AS t WHERE ((t."order" > CAST(CAST(? AS VARCHAR) AS NUMBER(19, 0))) '
        'OR (t."order" = CAST(CAST(? AS VARCHAR) AS NUMBER(19, 0)) AND '
        't."line" > CAST(CAST(? AS VARCHAR) AS NUMBER(10, 0)))) AND NOT EXISTS '
        '(SELECT 1 FROM "r"."_c" AS x WHERE x."order" = t."order" AND x."line" = t."line") '
        'AND NOT EXISTS (SELECT 1 FROM "r"."_x" AS x WHERE x."order" = t."order" AND '
        'x."line" = t."line")')
    assert bound_parameters(["7", "2"], None) == ["7", "7", "2"]
    keyless = keyless_statements(TableSchema(TableRef("public", "log"), (
        Column("at", "integer", "int4", False, -1), Column("msg", "text", "text", False, -1)), ()),
        '"r"."log"', '"r"."_s"', '"r"."_raw"', '"r"."_n"')
    assert keyless.count_existing == (
        'UPDATE "r"."_s" AS s SET existing = x.n FROM (SELECT s.ord, count(*) AS n FROM "r"."_s" '
        'AS s JOIN "r"."log" AS t ON t."at" IS NOT DISTINCT FROM s."at" AND t."msg" IS NOT '
        'DISTINCT FROM s."msg" WHERE s.count < 0 GROUP BY s.ord) AS x WHERE s.ord = x.ord')
    assert keyless.insert == (
        'INSERT INTO "r"."log" ("at", "msg") SELECT s."at", s."msg" FROM "r"."_s" AS s JOIN '
        '(SELECT DISTINCT n FROM "r"."_n") AS k ON k.n <= CASE WHEN s.count < 0 THEN '
        "GREATEST(s.existing + s.count, 0) ELSE s.count END")
    assert chunk.fill_excluded == (
        'INSERT INTO "r"."_x" SELECT CAST(k0 AS NUMBER(19, 0)), CAST(k1 AS NUMBER(10, 0)) '
        'FROM "r"."_xr"')
    # A stream's prepare reads the schema's catalog and column records once for every table.
    assert schema_columns('re"plica') == (
        "SELECT table_name, column_name, data_type FROM information_schema.columns WHERE "
        "table_schema = ?", ['re"plica'])
    assert columns_statements('re"plica').read_all == (
        'SELECT table_name, column_name, source_type FROM "re""plica"."_rosetta_columns"')


def test_a_pipeline_file_with_a_snowflake_destination(tmp_path: Path) -> None:
    """``type: snowflake`` with a password or a key pair (each a ${VAR} reference), refused
    in one sentence without either, with both, or with a literal secret."""
    def write(auth: str) -> Path:
        file = tmp_path / "rosetta.yaml"
        file.write_text(f"""
sources:
  src: {{host: 127.0.0.1, database: app, user: u, password: "${{PW}}"}}
destinations:
  wh: {{type: snowflake, account: myorg-acct, user: ROSETTA, database: ANALYTICS,
        warehouse: LOAD_WH, role: LOADER, schema: replica{auth}}}
pipelines:
  p: {{source: src, destinations: [wh], tables: [public.t]}}
""")
        return file

    environ = {"PW": "x", "SF_PW": "secret", "SF_PASS": "phrase"}
    destination = load_config(write(', password: "${SF_PW}"'), environ).pipeline("p").destinations[0]
    assert destination.kind == "snowflake" and destination.password == "secret"
    assert destination.snowflake == SnowflakeAccount(account="myorg-acct", warehouse="LOAD_WH",
                                                     role="LOADER")
    assert "secret" not in repr(destination)
    keyed = load_config(write(', private_key_file: /keys/rsa.p8, private_key_passphrase: '
                              '"${SF_PASS}"'), environ).pipeline("p").destinations[0]
    assert keyed.snowflake is not None and keyed.snowflake.private_key_file == "/keys/rsa.p8"
    assert keyed.snowflake.private_key_passphrase == "phrase" and keyed.password is None
    assert "phrase" not in repr(keyed)
    for auth, message in (("", "needs exactly one of 'password' and 'private_key_file'"),
                          (', password: "${SF_PW}", private_key_file: /k',
                           "needs exactly one of 'password' and 'private_key_file'"),
                          (", password: hunter2", "must be an ${ENV_VAR} reference"),
                          (", password: \"${SF_PW}\", warehous: X", "is not a Snowflake setting")):
        with pytest.raises(PipelineConfigError, match=message.replace("$", r"\$")):
            load_config(write(auth), environ)


def test_a_failed_connection_is_one_sentence_without_the_secret(emulated: Destination) -> None:
    """A connection that fails (here: nothing listens; the emulator takes any password, so a
    wrong one cannot be shown) says which destination, account and user, never the
    password."""
    unreachable = dataclasses.replace(emulated, port=1, password="hunter2-secret")
    with pytest.raises(RosettaError) as failed:
        with cursor(unreachable):
            pass
    assert str(failed.value).startswith("Destination dst: could not connect to Snowflake "
                                        "account fakesnow as fake (")
    assert "hunter2" not in str(failed.value)


def test_a_connection_reaches_the_account_endpoint_and_nothing_else(
    emulated: Destination,
) -> None:
    """The connector's login probes cloud metadata endpoints (AWS, Azure, GCP) unless told not
    to: each probe waits up to its timeout, longer where the addresses are dropped, on every
    connection. Every socket a connection opens (Python's audit events, all threads) goes to
    the destination's endpoint."""
    addresses: list[object] = []
    recording = threading.Event()

    def audit(event: str, args: tuple[object, ...]) -> None:
        if recording.is_set() and event == "socket.connect":
            addresses.append(args[1])

    sys.addaudithook(audit)  # cannot be removed: inert once recording is cleared
    recording.set()
    try:
        with cursor(emulated) as cur:
            cur.execute("SELECT 1")
    finally:
        recording.clear()
    endpoint = (emulated.host, emulated.port)
    assert addresses and all(isinstance(address, tuple) and address[:2] == endpoint
                             for address in addresses), addresses


SEEDS = [int(seed) for seed in os.environ.get("ROSETTA_SNOWFLAKE_SEEDS", "20261205").split(",")]


@pytest.mark.parametrize("seed", SEEDS)
def test_random_change_sequences_leave_the_snowflake_emulator_exact(
    env: StreamingEnv, store: ConfigStore, emulated: Destination, seed: int
) -> None:
    """Transactions of random inserts, updates that leave TOASTed values untouched, key updates,
    deletes, TRUNCATEs and added columns with hostile values (and, with pgoutput, changes of
    duplicate rows of a table without a key), applied in batches of 1, 3 or 16, the stream
    stopped and restarted between them: Snowflake ends exactly equal to the source, and is
    compared after every restart too."""
    rnd = random.Random(seed)
    keyless = env.engine == "pgoutput"  # a table without a key from pgoutput only
    execute(env.source_url, SEQUENCE_TABLE, SEQUENCE_LOG)
    tables = ["public.seq", *(["public.seqlog"] if keyless else [])]
    base = snowflake_pipeline(env, emulated, "seq", tables)
    pipeline = dataclasses.replace(base, settings=dataclasses.replace(
        base.settings, max_batch_size=rnd.choice((1, 3, 16)), offset_flush_interval_ms=100))
    store.sync_pipeline(pipeline)
    store.set_pipeline_status("seq", PipelineStatus.START)
    keys: set[int] = set()
    added: list[str] = []

    def differing() -> list[str]:
        seq, *log = source_schemas(env, tables)
        found = snowflake_differences(env, emulated, [seq])
        for schema in log:
            with conn.cursor() as cur:
                cur.execute("SELECT ROW(t.*)::text FROM public.seqlog AS t")
                expected = sorted(row[0] for row in cur.fetchall())
            conn.commit()
            renders = [snow_type(c).render for c in schema.columns]
            with cursor(emulated) as cur:
                rows = (cur.execute('SELECT * FROM "replica"."seqlog"').fetchall()
                        if "seqlog" in existing_tables(cur, emulated) else [])
            if expected != sorted(row_text([None if v is None else render(v) for render, v
                                            in zip(renders, row, strict=True)]) for row in rows):
                found.append(f"seqlog differs: source {expected}")
        return found

    conn = pinned_connection(env.source_url)
    try:
        for _run in range(3):
            with streaming(StreamingSession(pipeline, offsets_dir=env.offsets_dir,
                                            config_store=store)):
                for _transaction in range(rnd.randint(4, 10)):
                    with conn.cursor() as cur:
                        for _change in range(rnd.randint(1, 6)):
                            cur.execute(*random_change(rnd, keys, added, keyless))
                    conn.commit()
                    with conn.cursor() as cur:
                        cur.execute("SELECT id FROM public.seq")
                        keys = {row[0] for row in cur.fetchall()}
                    conn.commit()
                try:
                    wait_until(lambda: not differing(), 60,
                               f"Snowflake to equal the source (seed {seed})")
                except AssertionError:
                    raise AssertionError(f"seed {seed}: Snowflake differs:\n" + "\n".join(
                        differing()[:20])) from None
    finally:
        conn.close()


def test_kill_9_mid_batch_then_restart_converges_in_the_snowflake_emulator(
    env: StreamingEnv, pg_root: Path, emulated: Destination
) -> None:
    """``rosetta stream`` (a process of its own, reaching the emulator over the network with a
    password from the environment) killed with -9 while it applies inserts, updates, deletes
    and key updates; restarted, Snowflake equals the source; ``rosetta validate``'s parity
    checks pass; the password is in no log."""
    execute(env.source_url,
            "CREATE TABLE public.events (id bigint PRIMARY KEY, payload text, v int)",
            "INSERT INTO public.events SELECT g, md5(g::text), 0 FROM generate_series(1, 500) g")
    config_db = f"cfg_{env.source_db}"
    env.cluster.create_database(config_db)
    workdir = pg_root / f"snow-{env.source_db}"
    workdir.mkdir()
    endpoint = {"host": "127.0.0.1", "port": env.cluster.port, "user": env.cluster.superuser,
                "password": "${TEST_PG_PASSWORD}"}
    assert emulated.snowflake is not None
    document = {
        "sources": {"src": {**endpoint, "database": env.source_db}},
        "destinations": {"wh": {
            "type": "snowflake", "account": emulated.snowflake.account, "user": emulated.user,
            "password": "${TEST_SF_PASSWORD}", "database": emulated.database,
            "schema": "replica", "host": emulated.host, "port": emulated.port,
            "protocol": "http"}},
        "pipelines": {"snow": {"source": "src", "destinations": ["wh"],
                               "tables": ["public.events"],
                               "streaming": {"engine": env.engine, "max_batch_size": 512,
                                             "heartbeat_interval_ms": 1000}}},
    }
    pipeline_file = workdir / "rosetta.yaml"
    pipeline_file.write_text(yaml.safe_dump(document))
    process_env = {**env.pipeline_env(pipeline_file, env.cluster.dsn(config_db)),
                   "TEST_SF_PASSWORD": emulated.password or ""}
    schemas = source_schemas(env, ["public.events"])

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "rosetta_dagster.cli", "stream", "snow"],
                                cwd=workdir, env=process_env,
                                stdout=(workdir / "stream.log").open("ab"),
                                stderr=subprocess.STDOUT)

    def rows() -> int:
        with cursor(emulated) as cur:
            return len(snowflake_rows(cur, emulated, schemas[0]))

    def tail() -> str:
        return "\n".join((workdir / "stream.log").read_text().splitlines()[-30:])

    stream = start()
    try:
        wait_until(lambda: rows() == 500, 120, "the initial load")
        killed = threading.Event()

        def load() -> None:
            for start_id in range(501, 4_001, 500):
                if start_id > 2_000:
                    killed.wait(180)
                execute(env.source_url,
                        "INSERT INTO public.events SELECT g, md5(g::text), 1 "
                        "FROM generate_series(%s, %s + 499) g", params=(start_id, start_id))
                execute(env.source_url,
                        "UPDATE public.events SET v = v + 1 WHERE id %% 10 = 0 AND id < %s",
                        "DELETE FROM public.events WHERE id %% 97 = 0 AND id < %s",
                        "UPDATE public.events SET id = -id WHERE id %% 89 = 0 AND id > 0 "
                        "AND id < %s", params=(start_id,))

        loader = threading.Thread(target=load)
        loader.start()
        wait_until(lambda: rows() > 1000, 120, "progress")
        stream.send_signal(signal.SIGKILL)
        stream.wait(10)
        killed.set()
        loader.join()
        stream = start()
        try:
            wait_until(lambda: not snowflake_differences(env, emulated, schemas), 180,
                       "convergence after the kill")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- stream.log (tail) ---\n{tail()}") from None
        validate = subprocess.run(
            [sys.executable, "-m", "rosetta_dagster.cli", "validate", "--json"], cwd=workdir,
            env=process_env, capture_output=True, text=True, timeout=300)
        report = json.loads(validate.stdout)
        parity = {row["check"]: row for row in report["checks"]
                  if row["check"] in ("row_count_parity", "content_parity")}
        assert set(parity) == {"row_count_parity", "content_parity"}, report["checks"]
        assert all(row["passed"] for row in parity.values()), parity
    finally:
        stream.send_signal(signal.SIGTERM)
        stream.wait(60)
    assert stream.returncode == 0, tail()
    log = (workdir / "stream.log").read_text()
    assert env.cluster.password not in log and (emulated.password or "x") not in log


def test_key_pair_authentication_reaches_the_snowflake_emulator(
    tmp_path: Path, emulated: Destination
) -> None:
    """A destination with an encrypted PEM private key and its passphrase connects (the
    connector signs with the key); a wrong passphrase, or a file that is not a key, is one
    sentence that names the file, not the passphrase."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = tmp_path / "rosetta.p8"
    pem.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"right-phrase")))
    assert emulated.snowflake is not None

    def with_key(path: Path, passphrase: str) -> Destination:
        assert emulated.snowflake is not None
        return dataclasses.replace(emulated, password=None, snowflake=dataclasses.replace(
            emulated.snowflake, private_key_file=str(path), private_key_passphrase=passphrase))

    with cursor(with_key(pem, "right-phrase")) as cur:
        assert cur.execute("SELECT 1").fetchone() == (1,)
    with pytest.raises(RosettaError) as wrong:
        with cursor(with_key(pem, "wrong-phrase")):
            pass
    assert str(wrong.value).startswith(f"Destination dst: its private key file {pem} is not a "
                                       "usable PEM key")
    assert "wrong-phrase" not in str(wrong.value)
    not_a_key = tmp_path / "notes.txt"
    not_a_key.write_text("hello")
    with pytest.raises(RosettaError, match="is not a usable PEM key"):
        with cursor(with_key(not_a_key, "x")):
            pass


SNAPSHOT_SAMPLE = ("int", "bigint", "text", "bytea", "uuid", "bool", "date", "numeric",
                   "timestamptz", "int_array", "composite")


@pytest.mark.parametrize("engine", ["debezium"])
def test_a_debezium_snapshot_loads_the_snowflake_emulator_and_a_re_snapshot_removes_deleted_rows(
    env: StreamingEnv, emulated: Destination
) -> None:
    """``initial_load: debezium``: the type matrix snapshotted by the engine into Snowflake,
    then streamed; the slot is dropped while stopped and rows are deleted, updated and inserted
    meanwhile: the re-snapshot records the keys it writes (key tables made before each batch's
    transaction) and then deletes the rows it did not write."""
    # A sample of the families (each family's values through the engine's snapshot are
    # proven on PostgreSQL and DuckDB; here: the re-snapshot's key tables and reconciliation).
    families = tuple(f for f in families_for(env.engine) if f.name in SNAPSHOT_SAMPLE)
    tables = [t for t in create_matrix(env.source_url, families, env.engine)
              if t not in (f"public.{FULL_TABLE}", f"public.{INDEX_TABLE}")]
    base = snowflake_pipeline(env, emulated, "snap", tables)
    pipeline = dataclasses.replace(base, settings=dataclasses.replace(
        base.settings, initial_load="debezium"))
    schemas = source_schemas(env, tables)

    with streaming(StreamingSession(pipeline, offsets_dir=env.offsets_dir)):
        converge(env, emulated, schemas, "the snapshot")
        change_matrix(env.source_url, families)
        converge(env, emulated, schemas, "the streamed changes")
    drop_slots(env)
    conn = pinned_connection(env.source_url)
    with conn.cursor() as cur:
        for table in tables:
            cur.execute(f"DELETE FROM {table} WHERE id % 2 = 0")  # noqa: S608
            cur.execute(f"UPDATE {table} SET n = n + 100")  # noqa: S608
    conn.close()
    with streaming(StreamingSession(pipeline, offsets_dir=env.offsets_dir)):
        converge(env, emulated, schemas, "the re-snapshot")
    with cursor(emulated) as cur:
        left = cur.execute("SELECT count(*) FROM information_schema.tables WHERE "
                           "STARTSWITH(table_name, '_rosetta_resync_')").fetchone()
    assert left == (0,)
