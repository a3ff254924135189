"""xml values keep their exact text (declaration included) through load, stream, backfill and
the parity check, on both engines. PostgreSQL 15 from the system on both sides: the embedded
PostgreSQL 18 is built without libxml and stores no xml value."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import psycopg2.errors
import pytest
from psycopg2 import sql

from rosetta_dagster.core.backfill import BackfillRunner
from rosetta_dagster.core.config_store import ConfigStore, PipelineStatus
from rosetta_dagster.core.destination.postgres.reader import PostgresTableReader
from rosetta_dagster.core.health import content_parity
from rosetta_dagster.core.local_postgres import LocalPostgresCluster, PostgresBinaries
from rosetta_dagster.core.pipeline_config import TableRef
from rosetta_dagster.core.streaming import StreamingSession
from rosetta_dagster.core.table_schema import SchemaError, read_table_schema
from rosetta_dagster.harness import (
    StreamingEnv,
    drop_slots,
    execute,
    new_streaming_env,
    streaming,
    wait_until,
)
from rosetta_dagster.harness.type_matrix import pinned_connection
from rosetta_dagster_tests.conftest import TEST_PASSWORD

SYSTEM_PG15 = Path("/usr/lib/postgresql/15/bin")

# Each kept as written: the output function (logical decoding, COPY) drops or rewrites them.
DOCUMENTS = (
    '<?xml version="1.0"?>\n<doc/>',
    "<?xml version='1.0'   ?><a>it's \"q\" \\ 🐘</a>",
    '<?xml version="1.0" encoding="UTF-8"?><b>ü</b>',
    '<?xml version="1.0" standalone="yes"?><c/>',
    "<plain/>",
    "text <b>content</b> fragment",
)


@pytest.fixture(scope="module")
def pg15(pg_root: Path) -> Iterator[LocalPostgresCluster]:
    if not (SYSTEM_PG15 / "postgres").exists():
        pytest.fail(f"PostgreSQL 15 server binaries are expected in {SYSTEM_PG15}")
    cluster = LocalPostgresCluster(pg_root / "pg15-xml", password=TEST_PASSWORD,
                                   binaries=PostgresBinaries(SYSTEM_PG15, "system")).start()
    yield cluster
    cluster.destroy()


@pytest.fixture
def xml_env(pg15: LocalPostgresCluster, pg_root: Path, engine: str) -> Iterator[StreamingEnv]:
    environment = new_streaming_env(pg15, pg_root, engine)
    yield environment
    shutil.rmtree(environment.offsets_dir, ignore_errors=True)
    drop_slots(environment)


def _texts(url: str, schema: str) -> list[tuple[object, ...]]:
    conn = pinned_connection(url)
    with conn.cursor() as cursor:
        cursor.execute(sql.SQL("SELECT id, n, x::text, dx::text FROM {} ORDER BY id").format(
            sql.Identifier(schema, "docs")))
        rows = cursor.fetchall()
    conn.close()
    return rows


def _insert(url: str, first_id: int) -> None:
    conn = pinned_connection(url)
    with conn.cursor() as cursor:
        for offset, document in enumerate((*DOCUMENTS, None)):
            cursor.execute("INSERT INTO public.docs VALUES (%s, 0, %s, %s)",
                           (first_id + offset, document, document))
    conn.close()


def test_xml_keeps_its_declaration_through_load_stream_backfill_and_parity(
    xml_env: StreamingEnv, store: ConfigStore
) -> None:
    env = xml_env
    execute(env.source_url, "CREATE DOMAIN public.dxml AS xml",
            "CREATE TABLE public.docs (id int PRIMARY KEY, n int, x xml, dx public.dxml)")
    _insert(env.source_url, 1)
    pipeline = env.pipeline("xml", ["public.docs"])
    store.sync_pipeline(pipeline)
    store.set_pipeline_status("xml", PipelineStatus.START)

    def exact() -> bool:
        try:
            return _texts(env.source_url, "public") == _texts(env.destination_url, "replica")
        except psycopg2.errors.UndefinedTable:
            return False  # not created yet

    with streaming(StreamingSession(pipeline, offsets_dir=env.offsets_dir, config_store=store)):
        wait_until(exact, 60, "the initial load")
        _insert(env.source_url, 101)
        execute(env.source_url, "UPDATE public.docs SET n = n + 1",  # xml left untouched
                "UPDATE public.docs SET x = dx, dx = x WHERE id % 2 = 0")
        wait_until(exact, 60, "the streamed changes")
        assert ('<?xml version="1.0"?>\n<doc/>',) in [r[2:3] for r in _texts(
            env.destination_url, "replica")]

        # Only the declaration differs: the parity check sees it ...
        execute(env.destination_url, "UPDATE replica.docs SET x = '<doc/>' WHERE id = 1")
        source, target = pinned_connection(env.source_url), pinned_connection(env.destination_url)
        schema = read_table_schema(source, TableRef("public", "docs"), "source")
        readers = PostgresTableReader(source), PostgresTableReader(target)
        outcome = content_parity(*readers, schema, sql.Identifier("replica", "docs"),
                                 1000, 0)
        assert not outcome.passed and outcome.metadata["first_differing_key"] == "1"
        # ... and a backfill repairs it.
        job = store.create_backfill_job("xml", "public.docs")
        BackfillRunner(pipeline, store, job.id, chunk_timeout_s=60).run()
        wait_until(exact, 30, "the backfill")
        assert content_parity(*readers, schema, sql.Identifier("replica", "docs"),
                              1000, 0).passed
        source.close()
        target.close()


def test_xml_inside_an_array_or_composite_is_refused_before_anything_is_written(
    xml_env: StreamingEnv,
) -> None:
    env = xml_env
    execute(env.source_url, "CREATE TYPE public.page AS (title text, body xml)",
            "CREATE TABLE public.pages (id int PRIMARY KEY, parts xml[], page public.page, "
            "fine xml)")
    session = StreamingSession(env.pipeline("nested", ["public.pages"]),
                               offsets_dir=env.offsets_dir)
    with pytest.raises(SchemaError) as refused:
        session.prepare()
    message = str(refused.value)
    assert "public.pages.parts (xml[])" in message and "public.pages.page (page)" in message
    assert "fine" not in message and "exclude_columns" in message
