"""Every type PostgreSQL ships, through the initial load and the stream, exactly.

The pgoutput engine carries each value as the text the source printed, so the destination
must equal the source row for row, compared as PostgreSQL's own text under the pinned
settings. Run on PostgreSQL 18 (embedded) with default settings, and on a PostgreSQL 15
source and a PostgreSQL 18 destination whose servers are configured to print values
differently from each other and from the defaults.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from rosetta_dagster.core.local_postgres import LocalPostgresCluster, PostgresBinaries
from rosetta_dagster.core.streaming import StreamingSession
from rosetta_dagster.harness import (
    StreamingEnv,
    execute,
    fetch,
    new_streaming_env,
    streaming,
    wait_until,
)
from rosetta_dagster.harness.type_matrix import change_matrix, create_matrix, differences
from rosetta_dagster_tests.conftest import TEST_PASSWORD

SYSTEM_PG15 = Path("/usr/lib/postgresql/15/bin")

# Server settings that change how values are printed and parsed (issue: exact whatever the
# servers' DateStyle, IntervalStyle, TimeZone, float digits and bytea output).
HOSTILE_SOURCE = {"DateStyle": "'SQL, DMY'", "IntervalStyle": "'sql_standard'",
                  "timezone": "'Asia/Kathmandu'", "extra_float_digits": "0",
                  "bytea_output": "'escape'"}
HOSTILE_DESTINATION = {"DateStyle": "'German, MDY'", "IntervalStyle": "'postgres_verbose'",
                       "timezone": "'America/St_Johns'", "extra_float_digits": "-5"}


@pytest.fixture(scope="module")
def hostile_clusters(pg_root: Path) -> Iterator[tuple[LocalPostgresCluster, LocalPostgresCluster]]:
    """A PostgreSQL 15 source and a PostgreSQL 18 destination, each with odd settings."""
    if not (SYSTEM_PG15 / "postgres").exists():
        pytest.fail(f"PostgreSQL 15 server binaries are expected in {SYSTEM_PG15}")
    source = LocalPostgresCluster(pg_root / "pg15-hostile", password=TEST_PASSWORD,
                                  binaries=PostgresBinaries(SYSTEM_PG15, "system"),
                                  settings=HOSTILE_SOURCE).start()
    destination = LocalPostgresCluster(pg_root / "pg18-hostile", password=TEST_PASSWORD,
                                       settings=HOSTILE_DESTINATION).start()
    # Really in force (reset_val: psycopg2 itself switches its own sessions to ISO dates).
    for cluster, expected in ((source, "SQL, DMY"), (destination, "German, MDY")):
        assert fetch(cluster.dsn(), "SELECT reset_val FROM pg_settings WHERE name = 'DateStyle'"
                     ) == [(expected,)]
    yield source, destination
    source.destroy()
    destination.destroy()


@pytest.fixture(params=["pg18", "pg15-hostile-settings"])
def matrix_env(
    request: pytest.FixtureRequest, pg_cluster: LocalPostgresCluster, pg_root: Path
) -> Iterator[StreamingEnv]:
    if request.param == "pg18":
        env = new_streaming_env(pg_cluster, pg_root, "pgoutput")
    else:
        source, destination = request.getfixturevalue("hostile_clusters")
        env = new_streaming_env(source, pg_root, "pgoutput", destination_cluster=destination)
    yield env
    execute(env.cluster.dsn(), "SELECT pg_drop_replication_slot(slot_name) FROM "
            "pg_replication_slots WHERE NOT active AND database = %s", params=(env.source_db,))


def test_every_type_is_exact_through_load_and_stream(matrix_env: StreamingEnv) -> None:
    env = matrix_env
    tables = create_matrix(env.source_url)
    session = StreamingSession(env.pipeline("matrix", tables), offsets_dir=env.offsets_dir)
    with streaming(session):
        wait_until(lambda: not differences(env.source_url, env.destination_url, "replica"),
                   timeout_s=60, message="the initial load to equal the source")
        change_matrix(env.source_url)
        try:
            wait_until(lambda: not differences(env.source_url, env.destination_url, "replica"),
                       timeout_s=60, message="the streamed changes")
        except AssertionError:
            found = differences(env.source_url, env.destination_url, "replica")
            raise AssertionError("destination differs:\n" + "\n".join(found[:40])) from None
    assert session.progress.events_applied > 0
    assert not differences(env.source_url, env.destination_url, "replica")
