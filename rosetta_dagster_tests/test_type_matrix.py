"""Every type PostgreSQL ships, through the initial load and the stream, exactly.

The pgoutput engine carries each value as the text the source printed, so the destination
must equal the source row for row, compared as PostgreSQL's own text under the pinned
settings. Run on PostgreSQL 18 (embedded) with default settings, and on a PostgreSQL 15
source and a PostgreSQL 18 destination whose servers are configured to print values
differently from each other and from the defaults.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from psycopg2 import sql

from rosetta_dagster.core.backfill import BackfillRunner
from rosetta_dagster.core.config_store import ConfigStore, PipelineStatus
from rosetta_dagster.core.local_postgres import LocalPostgresCluster, PostgresBinaries
from rosetta_dagster.core.streaming import StreamingSession
from rosetta_dagster.core.table_schema import SchemaError
from rosetta_dagster.harness import (
    StreamingEnv,
    drop_slots,
    execute,
    fetch,
    new_streaming_env,
    streaming,
    wait_until,
    wait_until_tables_equal,
)
from rosetta_dagster.harness.type_matrix import (
    FULL_TABLE,
    INDEX_TABLE,
    change_matrix,
    create_matrix,
    differences,
    families_for,
    matrix_comparison,
    matrix_tables,
    pinned_connection,
    rows_as_text,
    type_table,
)
from rosetta_dagster_tests.conftest import TEST_PASSWORD

SYSTEM_PG15 = Path("/usr/lib/postgresql/15/bin")
TYPE_TABLE_START, TYPE_TABLE_END = "<!-- type table: start -->", "<!-- type table: end -->"

# (source, destination) server settings that change how values are printed and parsed: two
# combinations (exact whatever the servers' DateStyle, IntervalStyle, TimeZone, float digits
# and bytea output).
HOSTILE_SETTINGS = {
    "sql-dmy": ({"DateStyle": "'SQL, DMY'", "IntervalStyle": "'sql_standard'",
                 "timezone": "'Asia/Kathmandu'", "extra_float_digits": "0",
                 "bytea_output": "'escape'"},
                {"DateStyle": "'German, MDY'", "IntervalStyle": "'postgres_verbose'",
                 "timezone": "'America/St_Johns'", "extra_float_digits": "-5"}),
    "iso-mdy": ({"DateStyle": "'ISO, MDY'", "IntervalStyle": "'iso_8601'",
                 "timezone": "'Pacific/Chatham'", "bytea_output": "'hex'"},
                {"DateStyle": "'Postgres, DMY'", "IntervalStyle": "'sql_standard'",
                 "timezone": "'Asia/Kathmandu'", "extra_float_digits": "1",
                 "bytea_output": "'escape'"}),
}


Clusters = tuple[LocalPostgresCluster, LocalPostgresCluster]


@pytest.fixture(scope="module")
def hostile_pairs(pg_root: Path) -> Iterator[dict[str, Clusters]]:
    """Started on first use, one pair per settings combination, shared by the module."""
    pairs: dict[str, Clusters] = {}
    yield pairs
    for source, destination in pairs.values():
        source.destroy()
        destination.destroy()


def _hostile_pair(pairs: dict[str, Clusters], pg_root: Path, name: str) -> Clusters:
    """A PostgreSQL 15 source and a PostgreSQL 18 destination, each with odd settings."""
    if name in pairs:
        return pairs[name]
    if not (SYSTEM_PG15 / "postgres").exists():
        pytest.fail(f"PostgreSQL 15 server binaries are expected in {SYSTEM_PG15}")
    source_settings, destination_settings = HOSTILE_SETTINGS[name]
    source = LocalPostgresCluster(pg_root / f"pg15-{name}", password=TEST_PASSWORD,
                                  binaries=PostgresBinaries(SYSTEM_PG15, "system"),
                                  settings=source_settings).start()
    destination = LocalPostgresCluster(pg_root / f"pg18-{name}", password=TEST_PASSWORD,
                                       settings=destination_settings).start()
    pairs[name] = (source, destination)
    # Really in force (reset_val: psycopg2 itself switches its own sessions to ISO dates).
    for cluster, settings in ((source, source_settings), (destination, destination_settings)):
        assert fetch(cluster.dsn(), "SELECT reset_val FROM pg_settings WHERE name = 'DateStyle'"
                     ) == [(settings["DateStyle"].strip("'"),)]
    return pairs[name]


@pytest.fixture(params=sorted(HOSTILE_SETTINGS))
def hostile_clusters(
    request: pytest.FixtureRequest, hostile_pairs: dict[str, Clusters], pg_root: Path
) -> Clusters:
    return _hostile_pair(hostile_pairs, pg_root, request.param)


@pytest.fixture(params=["pg18", "pg15-hostile-settings"])
def matrix_env(
    request: pytest.FixtureRequest, pg_cluster: LocalPostgresCluster, pg_root: Path, engine: str
) -> Iterator[StreamingEnv]:
    if request.param == "pg18":
        env = new_streaming_env(pg_cluster, pg_root, engine)
    else:
        source, destination = _hostile_pair(request.getfixturevalue("hostile_pairs"), pg_root,
                                            "sql-dmy")
        env = new_streaming_env(source, pg_root, engine, destination_cluster=destination)
    yield env
    execute(env.cluster.dsn(), "SELECT pg_drop_replication_slot(slot_name) FROM "
            "pg_replication_slots WHERE NOT active AND database = %s", params=(env.source_db,))


def _damage(env: StreamingEnv, tables: list[str]) -> None:
    """What an incident leaves on the destination: rows missing, rows wrong (NULL), and rows
    the source never had (copies of hostile values under new keys)."""
    for table in tables:
        name = sql.Identifier("replica", table.split(".")[1])
        if table == f"public.{FULL_TABLE}":  # no key: one of two equal rows lost, a ghost
            execute(env.destination_url, sql.SQL(
                "DELETE FROM {0} WHERE ctid IN (SELECT min(ctid) FROM {0} GROUP BY n "
                "HAVING count(*) > 1); UPDATE {0} SET n = NULL WHERE n = 1; "
                "INSERT INTO {0} (n) VALUES (-5)").format(name))
            continue
        value = "n" if table == f"public.{INDEX_TABLE}" else "v"
        execute(env.destination_url,
                sql.SQL("DELETE FROM {} WHERE id % 4 = 1").format(name),
                sql.SQL("UPDATE {} SET {} = NULL WHERE id % 4 = 2").format(
                    name, sql.Identifier(value)),
                sql.SQL("INSERT INTO {0} (id, n) SELECT id + 5000, n FROM {0} "
                        "WHERE id < 4").format(name))


def test_every_type_is_exact_through_load_and_stream(
    matrix_env: StreamingEnv, store: ConfigStore
) -> None:
    """Initial load, streamed changes, a repairing backfill of every table and a re-sync after
    a dropped slot, each leaving the destination equal to the source row by row, as text: each
    family in a table of its own, and all of them in a table keyed by a replica identity index
    and in a REPLICA IDENTITY FULL table without a key (a multiset of rows)."""
    env = matrix_env
    families = families_for(env.engine)
    tables = create_matrix(env.source_url, families, env.engine)
    pipeline = env.pipeline("matrix", tables)
    store.sync_pipeline(pipeline)
    store.set_pipeline_status("matrix", PipelineStatus.START)
    session = StreamingSession(pipeline, offsets_dir=env.offsets_dir, config_store=store)

    def differing() -> list[str]:
        return differences(env.source_url, env.destination_url, "replica", families)

    def converge(what: str, timeout_s: float = 60) -> None:
        wait_until_tables_equal(matrix_tables(families), matrix_comparison(
            env.source_url, env.destination_url, "replica"), timeout_s, what)

    with streaming(session):
        converge("the initial load")
        change_matrix(env.source_url, families)
        converge("the streamed changes")
        # Backfill: chunks of 3 rows, so chunk bounds and the compare/delete run on every type;
        # four jobs at a time, as the backfill sensor runs them (one run per job).
        _damage(env, tables)
        jobs = [store.create_backfill_job("matrix", table).id for table in tables]
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(lambda job: BackfillRunner(pipeline, store, job, chunk_rows=3,
                                                     chunk_timeout_s=60).run(), jobs))
        assert not differing(), "after the backfills:\n" + "\n".join(differing()[:40])
    assert session.progress.events_applied > 0
    # Re-sync: the slot is dropped while stopped and the destination damaged again.
    execute(env.cluster.dsn(), "SELECT pg_drop_replication_slot(slot_name) FROM "
            "pg_replication_slots WHERE NOT active AND database = %s", params=(env.source_db,))
    _damage(env, tables)
    with streaming(StreamingSession(pipeline, offsets_dir=env.offsets_dir, config_store=store)):
        converge("the re-sync", 120)
    assert not differing()
    # The restart compared every destination column's type with the source's: none differed
    # (a difference would have altered the column and requested one more backfill).
    assert len(store.list_backfill_jobs(pipeline="matrix")) == len(tables)
    if env.engine == "pgoutput" and env.destination_cluster is None:
        # Every family ran through both engines: the type table (docs/design.md) must say what ran.
        design = (Path(__file__).resolve().parent.parent / "docs" / "design.md").read_text()
        table = design.split(TYPE_TABLE_START)[1].split(TYPE_TABLE_END)[0].strip()
        expected = type_table(env.source_url)
        assert table == expected, ("The type table in docs/design.md is out of date; it should "
                                   f"read:\n{expected}")


@pytest.mark.parametrize("engine", ["debezium"])
def test_every_type_is_exact_through_the_engines_snapshot(env: StreamingEnv) -> None:
    """``initial_load: debezium``: the type matrix loaded by Debezium's own snapshot, and
    again after a dropped slot with the destination damaged (the re-snapshot reconciles).
    Its snapshot read '4713-01-01 BC' as 4713-01-01 (AD), silently, in a row with no other
    value out of its ordinary range: dates of a snapshot are read from the source."""
    families = families_for(env.engine)
    tables = create_matrix(env.source_url, families, env.engine)
    # A table without a key needs initial_load: copy (refused otherwise).
    execute(env.source_url, f"DROP TABLE public.{FULL_TABLE}")
    tables.remove(f"public.{FULL_TABLE}")
    pipeline = env.pipeline("snapshotted", tables, initial_load="debezium")

    def converge(what: str) -> None:
        wait_until_tables_equal(matrix_tables(families), matrix_comparison(
            env.source_url, env.destination_url, "replica"), 90, what)

    with streaming(StreamingSession(pipeline, offsets_dir=env.offsets_dir)):
        converge("the snapshot")
        change_matrix(env.source_url, families)
        converge("the streamed changes")
    execute(env.cluster.dsn(), "SELECT pg_drop_replication_slot(slot_name) FROM "
            "pg_replication_slots WHERE NOT active AND database = %s", params=(env.source_db,))
    _damage(env, tables)
    with streaming(StreamingSession(pipeline, offsets_dir=env.offsets_dir)):
        converge("the re-snapshot")


@pytest.mark.parametrize("engine", ["debezium"])
def test_a_date_key_is_refused_for_the_engines_snapshot(env: StreamingEnv) -> None:
    """A date key read without its era could not be read back from the source by."""
    execute(env.source_url, "CREATE TABLE public.days (day date PRIMARY KEY, n int)")
    pipeline = env.pipeline("days", ["public.days"], initial_load="debezium")
    with pytest.raises(SchemaError) as refused:
        StreamingSession(pipeline, offsets_dir=env.offsets_dir).run()
    assert str(refused.value) == (
        "Pipeline days loads with initial_load: debezium, whose snapshot reads a date without "
        "its era (a BC date as AD), and public.days.day is a key column of type date, which "
        "the stream could not then read back from the source; use initial_load: copy, so "
        "nothing was written.")
    assert fetch(env.source_url, "SELECT count(*) FROM pg_publication") == [(0,)]


SETTINGS_SENSITIVE = """
CREATE TABLE public.sensitive (id int PRIMARY KEY, tstz timestamptz, ts timestamp, d date,
    t time, iv interval, r real, f double precision, n numeric(20,6), b bytea, j jsonb,
    ia int[], ta text[], tsa timestamptz[], tt timetz, iva interval[])
"""
SENSITIVE_ROW = ("INSERT INTO public.sensitive VALUES (%s, '2024-03-31 23:30:00.123456+05:45', "
                 "'2024-12-25 08:00:00', '2024-02-29', '13:14:15.5', '1 day -02:00:03.25', "
                 "1.1, 0.30000000000000004, 12345.678901, '\\x00ff7f5c', "
                 "'{\"k\": [1.5, \"x\"]}', '{1,2,3}', '{a,\"b c\"}', "
                 "'{\"2000-01-01 00:00:00+00\"}', '10:00:00.25+02', "
                 "'{\"1 mon -2 days\",\"3 hours\"}')")


@pytest.mark.parametrize("engine", ["debezium", "pgoutput"])
def test_exact_and_truthful_whatever_the_servers_settings(
    hostile_clusters: tuple[LocalPostgresCluster, LocalPostgresCluster], pg_root: Path, engine: str,
    store: ConfigStore, database_url: str, tmp_path: Path,
) -> None:
    """Ordinary values of the types whose text depends on settings, streamed between servers
    that print them differently, repaired by a backfill; `rosetta validate` passes the
    identical replica and fails one changed value."""
    source, destination = hostile_clusters
    env = new_streaming_env(source, pg_root, engine, destination_cluster=destination)
    conn = pinned_connection(env.source_url)
    with conn.cursor() as cursor:
        cursor.execute(SETTINGS_SENSITIVE)
        for key in (1, 2, 3):
            cursor.execute(SENSITIVE_ROW, (key,))
    name = f"settings_{engine}"
    path = env.write_pipeline_file(tmp_path / "rosetta.yaml", name, ["public.sensitive"],
                                   {"heartbeat_interval_ms": 1000})
    document = yaml.safe_load(path.read_text())
    document["operations"] = {"parity_window_seconds": 1}
    path.write_text(yaml.safe_dump(document))
    pipeline = env.pipeline(name, ["public.sensitive"])
    store.sync_pipeline(pipeline)
    store.set_pipeline_status(name, PipelineStatus.START)

    def equal() -> bool:
        return rows_as_text(env.source_url, "public", "sensitive") == rows_as_text(
            env.destination_url, "replica", "sensitive")

    def validate() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "rosetta_dagster.cli", "validate"],
                              env=env.pipeline_env(path, database_url), capture_output=True,
                              text=True, timeout=120)

    try:
        with streaming(StreamingSession(pipeline, offsets_dir=env.offsets_dir, config_store=store)):
            wait_until(equal, 60, "the initial load")
            with conn.cursor() as cursor:
                cursor.execute(SENSITIVE_ROW, (4,))
                cursor.execute("UPDATE public.sensitive SET tstz = tstz + interval '1 minute', "
                               "iv = iv * 2, f = f / 3, b = b || '\\x01', tsa = tsa || tstz "
                               "WHERE id <= 2")
                cursor.execute("DELETE FROM public.sensitive WHERE id = 3")
            wait_until(equal, 60, "the streamed changes")
            # Damaged behind the stream's back, repaired by a backfill of the whole table.
            execute(env.destination_url, "DELETE FROM replica.sensitive WHERE id = 1",
                    "UPDATE replica.sensitive SET iv = '0' WHERE id = 2")
            job = store.create_backfill_job(name, "public.sensitive", [])
            BackfillRunner(pipeline, store, job.id, chunk_timeout_s=60).run()
            assert equal()
            wait_until(lambda: store.get_pipeline(name).source_position_at is not None, 20,
                       "a heartbeat with the source position")
            healthy = validate()
            assert healthy.returncode == 0, healthy.stdout + healthy.stderr
            execute(env.destination_url, "UPDATE replica.sensitive SET f = f + 1e-15 WHERE id = 2")
            broken = validate()
            assert broken.returncode == 1, broken.stdout + broken.stderr
            assert ("content_parity: Rows differ in key range [1, 4]; first differing key 2."
                    in broken.stdout), broken.stdout
    finally:
        conn.close()
        drop_slots(env)
