"""Config store migrations and repository against real PostgreSQL."""

from __future__ import annotations

import datetime
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg2
import pytest

from rosetta_dagster.core.config_store import (
    BackfillStatus,
    ConfigStore,
    PipelineState,
    PipelineStatus,
    apply_migrations,
    load_migrations,
)
from rosetta_dagster.core.errors import ConfigStoreError

EXPECTED_TABLES = {
    "schema_migrations",
    "apply_skips",
    "notification_log",
    "debezium_offsets",
    "stream_load_states",
    "parked_events",
    "pipeline_failures",
    "pool_events",
    "pool_usage",
    "offset_cleanups",
    "pipelines",
    "pipeline_metadata",
    "backfill_jobs",
    "data_flow_record_monitoring",
    "wal_monitor",
}




def _schema(database_url: str) -> list[tuple[str, str, str]]:
    with psycopg2.connect(database_url) as conn, conn.cursor() as cursor:
        cursor.execute(
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'public' ORDER BY 1, 2"
        )
        rows = cursor.fetchall()
    conn.close()
    return rows


def test_fresh_database_gets_every_table_and_reapplying_is_a_no_op(database_url: str) -> None:
    conn = psycopg2.connect(database_url)
    applied = apply_migrations(conn)
    assert [m.version for m in applied] == [m.version for m in load_migrations()]
    schema = _schema(database_url)
    assert {table for table, _, _ in schema} == EXPECTED_TABLES

    assert apply_migrations(conn) == []
    assert _schema(database_url) == schema
    with conn.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM schema_migrations")
        assert cursor.fetchone()[0] == len(load_migrations())
    conn.close()


def test_concurrent_upgrades_apply_each_migration_once(database_url: str) -> None:
    barrier = threading.Barrier(4)

    def upgrade() -> int:
        conn = psycopg2.connect(database_url)
        barrier.wait()
        try:
            return len(apply_migrations(conn))
        finally:
            conn.close()

    with ThreadPoolExecutor(4) as executor:
        counts = list(executor.map(lambda _: upgrade(), range(4)))
    assert sorted(counts) == [0, 0, 0, len(load_migrations())]


def test_every_timestamp_is_timestamptz(database_url: str) -> None:
    conn = psycopg2.connect(database_url)
    apply_migrations(conn)
    conn.close()
    timestamp_types = {t for _, _, t in _schema(database_url) if t.startswith("timestamp")}
    assert timestamp_types == {"timestamp with time zone"}


def test_pipeline_sync_keeps_the_desired_status(store: ConfigStore) -> None:
    created = store.upsert_pipeline(
        "orders", source="shop", destinations=["warehouse"], tables=["public.orders"]
    )
    assert created.status is PipelineStatus.PAUSE
    assert created.state is PipelineState.PAUSED
    store.set_pipeline_status("orders", "start")
    resynced = store.upsert_pipeline(
        "orders", source="shop", destinations=["warehouse", "lake"], tables=["public.orders"]
    )
    assert resynced.status is PipelineStatus.START
    assert resynced.destinations == ["warehouse", "lake"]
    assert [p.name for p in store.list_pipelines()] == ["orders"]
    assert resynced.created_at.utcoffset().total_seconds() == 0


def test_unknown_pipeline_and_bad_status_are_clear_errors(store: ConfigStore) -> None:
    with pytest.raises(ConfigStoreError, match="Pipeline 'nope' does not exist in the config store."):
        store.set_pipeline_status("nope", PipelineStatus.START)
    store.upsert_pipeline("orders", source="shop", destinations=["w"], tables=["public.orders"])
    with pytest.raises(ConfigStoreError, match="must be START or PAUSE, got 'RUN'"):
        store.set_pipeline_status("orders", "RUN")


def test_pipeline_state_error_and_heartbeat(store: ConfigStore) -> None:
    store.upsert_pipeline("orders", source="shop", destinations=["w"], tables=["public.orders"])
    store.record_pipeline_state("orders", PipelineState.RUNNING, run_id="run-1")
    running = store.get_pipeline("orders")
    assert running.state is PipelineState.RUNNING
    assert running.heartbeat_at is not None and running.last_start_at is not None
    store.heartbeat("orders")
    assert store.get_pipeline("orders").heartbeat_at >= running.heartbeat_at

    store.record_pipeline_state("orders", PipelineState.ERROR, error="Table public.x is missing.")
    failed = store.get_pipeline("orders")
    assert failed.state is PipelineState.ERROR
    assert failed.last_error == "Table public.x is missing."
    assert failed.last_error_at is not None


def test_backfill_jobs_are_claimed_once_with_skip_locked(
    store: ConfigStore, database_url: str
) -> None:
    store.upsert_pipeline("orders", source="shop", destinations=["w"], tables=["public.orders"])
    jobs = [store.create_backfill_job("orders", "public.orders") for _ in range(6)]
    assert all(job.status is BackfillStatus.PENDING for job in jobs)

    # Another claimer holding job 1 locked: it is skipped, not waited for.
    blocker = psycopg2.connect(database_url)
    with blocker.cursor() as cursor:
        cursor.execute("SELECT id FROM backfill_jobs WHERE id = %s FOR UPDATE", (jobs[0].id,))
        claimed = store.claim_pending_backfill_jobs(limit=2)
    blocker.rollback()
    blocker.close()
    assert [job.id for job in claimed] == [jobs[1].id, jobs[2].id]
    assert all(job.status is BackfillStatus.QUEUED for job in claimed)

    barrier = threading.Barrier(3)

    def claim() -> list[int]:
        barrier.wait()
        return [job.id for job in store.claim_pending_backfill_jobs(limit=10)]

    with ThreadPoolExecutor(3) as executor:
        results = list(executor.map(lambda _: claim(), range(3)))
    remaining = [job.id for job in jobs if job.id not in {j.id for j in claimed}]
    assert sorted(sum(results, [])) == remaining  # every job once, none twice
    assert store.claim_pending_backfill_jobs() == []


def test_a_claim_for_some_pipelines_leaves_the_others_jobs_pending(store: ConfigStore) -> None:
    for name in ("orders", "ledger"):
        store.upsert_pipeline(name, source="shop", destinations=["w"], tables=[f"public.{name}"])
    orders, ledger = (store.create_backfill_job(n, f"public.{n}") for n in ("orders", "ledger"))
    assert [j.id for j in store.claim_pending_backfill_jobs(pipelines={"ledger"})] == [ledger.id]
    assert store.get_backfill_job(orders.id).status is BackfillStatus.PENDING
    assert [j.id for j in store.claim_pending_backfill_jobs(pipelines=set())] == []
    assert [j.id for j in store.claim_pending_backfill_jobs()] == [orders.id]


def test_backfill_progress_and_status_lifecycle(store: ConfigStore) -> None:
    store.upsert_pipeline("orders", source="shop", destinations=["w"], tables=["public.orders"])
    job = store.create_backfill_job(
        "orders", "public.orders", [{"column": "id", "operator": ">", "value": 10}]
    )
    assert job.filter == [{"column": "id", "operator": ">", "value": 10}]
    store.set_backfill_status(job.id, BackfillStatus.EXECUTING, run_id="run-9")
    store.update_backfill_progress(job.id, count_record=500, total_record=1000,
                                   resume_position={"id": 510})
    job = store.get_backfill_job(job.id)
    assert (job.count_record, job.total_record, job.resume_position) == (500, 1000, {"id": 510})
    assert (job.attempts, job.run_id) == (1, "run-9")
    done = store.set_backfill_status(job.id, BackfillStatus.COMPLETED)
    assert done.status is BackfillStatus.COMPLETED
    assert [j.id for j in store.list_backfill_jobs(status=BackfillStatus.COMPLETED)] == [job.id]
    with pytest.raises(ConfigStoreError, match="Pipeline 'nope' does not exist"):
        store.create_backfill_job("nope", "public.orders")


def test_batch_counts_keep_a_row_and_a_time_per_batch_and_are_written_once_a_second(
        store: ConfigStore, database_url: str) -> None:
    """A stream of many small batches writes their counts together (not one config-store
    transaction per batch), each batch still its own row with the time it was applied."""
    from rosetta_dagster.core.streaming.flows import FlowRecorder

    store.upsert_pipeline("orders", source="shop", destinations=["w"], tables=["public.orders"])

    def rows() -> list[tuple[str, int, datetime.datetime]]:
        with psycopg2.connect(database_url) as conn, conn.cursor() as cursor:
            cursor.execute("SELECT destination, record_count, created_at FROM "
                           "data_flow_record_monitoring ORDER BY id")
            found = cursor.fetchall()
        conn.close()
        return found

    flows = FlowRecorder(store, "orders", interval_s=3600)
    flows.note([("w", "public.orders", 3), ("lake", "public.orders", 3)])
    time.sleep(0.01)
    flows.note([("w", "public.orders", 5)])
    assert rows() == []  # not due yet
    flows.write()
    written = rows()
    assert [(d, n) for d, n, _ in written] == [("w", 3), ("lake", 3), ("w", 5)]
    assert written[0][2] == written[1][2] < written[2][2]  # each batch's own time
    due = FlowRecorder(store, "orders", interval_s=0)
    due.note([("w", "public.orders", 7)])
    assert [(d, n) for d, n, _ in rows()][-1] == ("w", 7)


def test_flow_records_and_wal_readings(store: ConfigStore, database_url: str) -> None:
    store.upsert_pipeline("orders", source="shop", destinations=["w"], tables=["public.orders"])
    store.record_flows("orders", [("w", "public.orders", 128), ("lake", "public.orders", 128)])
    store.record_wal_reading(source="shop", slot_name="rosetta_orders", status="active",
                             pipeline="orders", current_lsn="0/16B3748",
                             confirmed_flush_lsn="0/16B3700", retained_wal_bytes=72,
                             lag_bytes=72)
    with psycopg2.connect(database_url) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT destination, table_name, record_count FROM "
                       "data_flow_record_monitoring ORDER BY destination")
        assert cursor.fetchall() == [("lake", "public.orders", 128), ("w", "public.orders", 128)]
        cursor.execute("SELECT slot_name, retained_wal_bytes, status, pipeline_id IS NOT NULL "
                       "FROM wal_monitor")
        assert cursor.fetchall() == [("rosetta_orders", 72, "active", True)]
    conn.close()
