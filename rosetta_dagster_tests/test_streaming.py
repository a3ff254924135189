"""End-to-end streaming through the real Debezium engine into a real destination."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from rosetta_dagster.core.local_postgres import LocalPostgresCluster
from rosetta_dagster.core.streaming import StreamingSession
from rosetta_dagster_tests.streaming_support import (
    StreamingEnv,
    execute,
    fetch,
    new_streaming_env,
    streaming,
    wait_until,
)


@pytest.fixture
def env(pg_cluster: LocalPostgresCluster, pg_root: Path) -> Iterator[StreamingEnv]:
    environment = new_streaming_env(pg_cluster, pg_root)
    yield environment
    execute(environment.cluster.dsn(), "SELECT pg_drop_replication_slot(slot_name) FROM "
            "pg_replication_slots WHERE NOT active AND database = %s", params=(environment.source_db,))


def test_existing_rows_inserts_updates_deletes_converge(env: StreamingEnv) -> None:
    execute(
        env.source_url,
        "CREATE TABLE public.orders (id bigint PRIMARY KEY, customer text, amount numeric(12,2))",
        "INSERT INTO public.orders SELECT g, 'c' || g, g * 1.5 FROM generate_series(1, 500) g",
    )
    session = StreamingSession(env.pipeline("e2e", ["public.orders"]), offsets_dir=env.offsets_dir)
    with streaming(session):
        wait_until(lambda: env.converged("public.orders"), message="the snapshot")
        execute(
            env.source_url,
            "INSERT INTO public.orders SELECT g, 'n' || g, g FROM generate_series(501, 800) g",
            "UPDATE public.orders SET amount = amount + 1 WHERE id % 3 = 0",
            "DELETE FROM public.orders WHERE id % 7 = 0",
            "UPDATE public.orders SET customer = NULL WHERE id = 1",
        )
        wait_until(lambda: env.converged("public.orders"), message="the changes")
    assert fetch(env.destination_url, "SELECT count(*) FROM replica.orders") == [(800 - 114,)]
    assert os.path.getsize(env.offsets_dir / "e2e.dat") > 0
